#!/usr/bin/env bash
# `switchyard bench layer` with its JAX peer installed: pip installs jax
# (CPU) if python3 cannot import it, then runs the benchmark in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import jax' 2>/dev/null; then
  python3 -m pip install --quiet 'jax>=0.4.31'
fi
cargo run --release --quiet -- bench layer "$@"
