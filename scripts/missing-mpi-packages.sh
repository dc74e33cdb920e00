#!/usr/bin/env bash
# Prints the Debian packages still missing to build and run switchyard with
# `--features mpi`, one per line (nothing when all are there), so callers
# can install them together with their own after one `apt-get update`.
# libclang is looked for by its exact names: bindgen needs libclang.so, and
# libclang-cpp (which some images carry) does not serve.
set -euo pipefail
command -v mpirun >/dev/null 2>&1 || echo openmpi-bin
[ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || [ -e /usr/include/mpi.h ] \
  || compgen -G '/usr/lib/*/openmpi/include/mpi.h' >/dev/null || echo libopenmpi-dev
command -v pkg-config >/dev/null 2>&1 || echo pkg-config
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null \
  || compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null \
  || compgen -G '/usr/lib/*/libclang.so*' >/dev/null \
  || compgen -G '/usr/lib/*/libclang-[0-9]*.so*' >/dev/null \
  || echo libclang-dev
