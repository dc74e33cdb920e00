#!/usr/bin/env bash
# Installs PyTorch for the benchmark peers if python3 cannot import it:
# the CPU-only wheel from download.pytorch.org (a tenth of the download),
# or PyPI's wheel where that index cannot be reached (it brings CUDA
# libraries the CPU benchmarks never load).
set -euo pipefail
python3 -c 'import torch' 2>/dev/null && exit 0
python3 -m pip install --quiet --retries 1 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu \
  || { echo "download.pytorch.org unreachable: installing torch from PyPI" >&2; python3 -m pip install --quiet torch; }
