#!/usr/bin/env bash
# `switchyard bench layer` with its peers installed: pip installs jax and
# torch (CPU) if python3 cannot import them, oneDNN (the kernels of bf16
# products) comes from apt if missing, then the benchmark runs in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import jax' 2>/dev/null; then
  python3 -m pip install --quiet 'jax>=0.4.31'
fi
scripts/install-torch.sh
if ! ldconfig -p | grep -q 'libdnnl\.so\.2 '; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libdnnl2 >/dev/null
fi
cargo run --release --quiet -- bench layer "$@"
