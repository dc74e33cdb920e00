#!/usr/bin/env bash
# `switchyard bench kernels` with what it compares installed: oneDNN (apt,
# libdnnl2: the kernels of bf16 products) and PyTorch (pip, CPU) as the peer.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p | grep -q 'libdnnl\.so\.2 '; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libdnnl2 >/dev/null
fi
scripts/install-torch.sh
cargo run --release --quiet -- bench kernels "$@"
