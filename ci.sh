#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this file).
# Works on a fresh Debian machine with Rust: it installs what the tests
# need, builds once into one target folder and runs every test.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL=0

# rustfmt and clippy come with rustup's default profile; add them if this
# toolchain was installed without them.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

echo "== formatting"
cargo fmt --all -- --check

echo "== lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

mkdir -p target
log=target/ci-tests.log
: > "$log"
status=0
echo "== tests"
cargo test --workspace --all-targets --locked --no-fail-fast 2>&1 | tee -a "$log" || status=1

echo "== tests with Hugging Face tokenizer support (--features hf-tokenizer)"
cargo test -p worker --all-targets --features hf-tokenizer --locked --no-fail-fast 2>&1 | tee -a "$log" || status=1

# One closing line over every test binary above.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit $status
