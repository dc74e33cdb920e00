#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this file).
# It installs what the tests need on a fresh Debian machine with Rust,
# then builds once and runs every test.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0

echo "== checks: formatting"
cargo fmt --all -- --check

echo "== build (all targets, one target folder)"
cargo build --workspace --all-targets --locked

echo "== tests"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/ci-tests.log
