"""A PyTorch peer for `switchyard bench layer`: the same MoE layer.

Router softmax, top-k with renormalised gates, dropless SwiGLU experts
(tokens sorted by expert, one matmul triple per expert: the usual eager
implementation), gated combine, the Switch aux loss and the z-loss;
forward and backward (autograd), timed in eager fp32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)` (bf16 matmuls on oneDNN,
fp32 weights), best of the repetitions after warm-up.

Usage: python3 torch_moe_layer.py '{"d_model":512,"ffn_hidden":1024,"n_experts":8,"top_k":2,"tokens":4096}'
Prints one JSON object: {"torch": version, "threads": n, "fp32": tokens/s, "bf16": tokens/s}.
"""
import json
import sys
import time

import torch

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
    logits = (x @ router.t()).float()
    probs = torch.softmax(logits, dim=-1)
    gates, idx = torch.topk(probs, K, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // K
    counts = torch.bincount(flat, minlength=E)
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        rows = token[start:start + c]
        xe = x[rows]
        h = torch.nn.functional.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
        ye = h @ w2[e].t()
        g = gates.reshape(-1)[order[start:start + c]].unsqueeze(1)
        out = out.index_add(0, rows, (ye * g).to(out.dtype))
        start += c
    aux = E * torch.sum(counts.float() / (N * K) * probs.mean(0))
    z = torch.mean(torch.logsumexp(logits, dim=-1) ** 2)
    return out, aux, z


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


print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "fp32": tokens_per_s(False), "bf16": tokens_per_s(True)}))
