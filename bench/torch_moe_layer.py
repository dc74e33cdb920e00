"""A PyTorch peer for `switchyard bench layer`: the same MoE layer.

bench/torch_moe.py's layer (router softmax, top-k with renormalised
gates, dropless SwiGLU experts by sorted tokens, gated combine, the
Switch aux loss and the z-loss), forward and backward (autograd), timed
in eager fp32 and under `torch.autocast("cpu", dtype=torch.bfloat16)`
(bf16 matmuls on oneDNN, fp32 weights), best of the repetitions after
warm-up.

Usage: python3 torch_moe_layer.py '{"d_model":512,"ffn_hidden":1024,"n_experts":8,"top_k":2,"tokens":4096}' [--fp32-only]
Prints one JSON object: {"torch": version, "threads": n, "fp32": tokens/s, "bf16": tokens/s}
("bf16": null with --fp32-only, for CPUs without bf16 units, where
autocast's bf16 is emulated and slow).
"""
import json
import sys
import time

import torch

from torch_moe import moe

case = json.loads(sys.argv[1])
D, F, E, K, N = case["d_model"], case["ffn_hidden"], case["n_experts"], case["top_k"], case["tokens"]
torch.manual_seed(0)
router = (0.02 * torch.randn(E, D)).requires_grad_()
w1 = (0.02 * torch.randn(E, F, D)).requires_grad_()
w3 = (0.02 * torch.randn(E, F, D)).requires_grad_()
w2 = (0.02 * torch.randn(E, D, F)).requires_grad_()
x = torch.randn(N, D).requires_grad_()
probe = torch.randn(N, D)


def layer(x):
    return moe(x, router, w1, w3, w2, K)


def step(bf16):
    for p in (router, w1, w2, w3, x):
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, aux, z = layer(x)
        loss = (out.float() * probe).sum() + 0.01 * aux + 0.001 * z
    loss.backward()


def tokens_per_s(bf16, seconds=2.0):
    for _ in range(3):
        step(bf16)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step(bf16)
        best = min(best, time.perf_counter() - t)
    return N / best


fp32_only = "--fp32-only" in sys.argv[2:]
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "fp32": tokens_per_s(False), "bf16": None if fp32_only else tokens_per_s(True)}))
