"""The PyTorch peer of `switchyard bench attention`: causal
`scaled_dot_product_attention` forward and backward in fp32 on one
sequence, best of a few repetitions, and the process's resident peak over
its size once the inputs exist.

Usage: python3 bench/torch_attention.py SEQ HEADS HEAD_DIM
Prints {"seconds": s, "tokens_per_s": x, "peak_extra_mib": m}.
"""
import json
import sys
import time

import torch


def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024.0
    return 0.0


def main():
    seq, heads, hd = (int(a) for a in sys.argv[1:4])
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, hd, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, heads, seq, hd)
    base = status_mib("VmRSS:")

    def run():
        for t in (q, k, v):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(dout)

    run()
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < 2 or (time.perf_counter() - start < 3.0 and reps < 20):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
        reps += 1
    print(json.dumps({"seconds": best, "tokens_per_s": seq / best, "peak_extra_mib": status_mib("VmHWM:") - base}))


if __name__ == "__main__":
    main()
