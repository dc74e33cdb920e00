#!/usr/bin/env bash
# `switchyard bench alltoall` with its peer installed: OpenMPI (apt) if
# anything to build with MPI is missing, mpi4py and numpy (pip) if python3 cannot import them,
# then the benchmark on the MPI backend (release build with --features mpi).
#   scripts/bench-alltoall.sh [--ranks N] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t need < <(scripts/missing-mpi-packages.sh)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -c 'import mpi4py, numpy' 2>/dev/null; then
  python3 -m pip install --quiet mpi4py numpy
fi
cargo run --release --quiet --features mpi -- bench alltoall --backend mpi "$@"
