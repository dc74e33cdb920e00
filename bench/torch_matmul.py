"""PyTorch's matrix products on the same shapes as `switchyard bench kernels`.

Usage: python3 bench/torch_matmul.py '<json list of {"kind","m","k","n"}>' SECONDS
Prints one JSON object: {"torch": version, "threads": n, "results": [{"fp32": GFLOP/s, "bf16": GFLOP/s}, ...]}.
Each product is laid out as switchyard's (row-major, nt: B stored [n,k]; tn:
A stored [k,m]) and timed for SECONDS after a warm-up; bf16 is what
autocast runs (bf16 factors, the product returned in bf16: PyTorch's own
matmul, via oneDNN on CPU).
"""
import json
import sys
import time

import torch


def factors(kind, m, k, n, dtype):
    a = torch.randn(k, m, dtype=dtype) if kind == "tn" else torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, k, dtype=dtype) if kind == "nt" else torch.randn(k, n, dtype=dtype)
    if kind == "nt":
        return lambda: a @ b.t()
    if kind == "tn":
        return lambda: a.t() @ b
    return lambda: a @ b


def rate(kind, m, k, n, dtype, seconds):
    run = factors(kind, m, k, n, dtype)
    for _ in range(3):
        run()
    count, start = 0, time.perf_counter()
    best = float("inf")
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
        count += 1
    return 2.0 * m * k * n / best / 1e9


def main():
    shapes = json.loads(sys.argv[1])
    seconds = float(sys.argv[2])
    results = []
    with torch.no_grad():
        for s in shapes:
            args = (s["kind"], s["m"], s["k"], s["n"])
            results.append({"fp32": rate(*args, torch.float32, seconds), "bf16": rate(*args, torch.bfloat16, seconds)})
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
