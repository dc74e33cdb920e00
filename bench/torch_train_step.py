"""A PyTorch peer for `switchyard bench step`: whole training steps of the
same model, on the same threads.

The model of docs/model.md at its default settings (dense GQA attention
with RoPE, pre-RMSNorm blocks, softmax top-k router with renormalised
gates, dropless SwiGLU experts, untied head), written the way a PyTorch
user would: scaled_dot_product_attention for the core, tokens sorted by
expert and one matmul triple per expert (bench/torch_moe.py),
cross-entropy plus the Switch aux loss and the z-loss, gradient
accumulation over the micro-batches of the global batch, gradient
clipping and torch.optim.AdamW (fused=False: the CPU default).

Modes: "eager" (fp32), "autocast" (bf16 matmuls under torch.autocast,
fp32 weights), "compile" and "compile_autocast" (the same under
torch.compile, default backend: inductor; its compilation runs in the
warm-up steps, which are not timed).

Usage: python3 torch_train_step.py '{"vocab":256, ..., "modes":["eager"]}'
(the keys of switchyard's [model], [optim] and [train] sections that the
model uses; `switchyard bench step` writes them). Prints one JSON object:
{"torch": version, "threads": n, "tokens_per_step": n,
 "modes": {mode: {"tokens_per_s": x, "step_s": s} or {"error": text}}}.
"""
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from torch_moe import moe

cfg = json.loads(sys.argv[1])
V, D, L = cfg["vocab"], cfg["d_model"], cfg["n_layers"]
H, HKV, FF = cfg["n_heads"], cfg["n_kv_heads"], cfg["ffn_hidden"]
E, K, S = cfg["n_experts"], cfg["top_k"], cfg["seq_len"]
MB, GB = cfg["micro_batch_size"], cfg["global_batch_size"]
HD = D // H


def rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["norm_eps"]) * w


def rope_tables():
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, HD, 2).float() / HD))
    angles = torch.outer(torch.arange(S).float(), inv)
    return torch.cos(angles).repeat(1, 2), torch.sin(angles).repeat(1, 2)


COS, SIN = rope_tables()


def rope(x):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * COS + rotated * SIN


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        std = cfg["init_std"]
        p = lambda *shape: torch.nn.Parameter(std * torch.randn(*shape))
        self.attn_norm = torch.nn.Parameter(torch.ones(D))
        self.wq, self.wk, self.wv, self.wo = p(H * HD, D), p(HKV * HD, D), p(HKV * HD, D), p(D, H * HD)
        self.ffn_norm = torch.nn.Parameter(torch.ones(D))
        self.router = p(E, D)
        self.w1, self.w3, self.w2 = p(E, FF, D), p(E, FF, D), p(E, D, FF)

    def attention(self, x):
        b = x.shape[0]
        q = (x @ self.wq.t()).view(b, S, H, HD).transpose(1, 2)
        k = (x @ self.wk.t()).view(b, S, HKV, HD).transpose(1, 2)
        v = (x @ self.wv.t()).view(b, S, HKV, HD).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // HKV, dim=1), v.repeat_interleave(H // HKV, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, S, H * HD) @ self.wo.t()

    def moe(self, x):
        out, aux, z = moe(x.reshape(-1, D), self.router, self.w1, self.w3, self.w2, K)
        return out.reshape(x.shape), aux, z

    def forward(self, x):
        x = x + self.attention(rms_norm(x, self.attn_norm))
        y, aux, z = self.moe(rms_norm(x, self.ffn_norm))
        return x + y, aux, z


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Parameter(cfg["init_std"] * torch.randn(V, D))
        self.blocks = torch.nn.ModuleList(Block() for _ in range(L))
        self.norm = torch.nn.Parameter(torch.ones(D))
        self.head = torch.nn.Parameter(cfg["init_std"] * torch.randn(V, D))

    def forward(self, tokens, targets):
        x = self.embed[tokens]
        aux_sum, z_sum = 0.0, 0.0
        for block in self.blocks:
            x, aux, z = block(x)
            aux_sum, z_sum = aux_sum + aux, z_sum + z
        logits = rms_norm(x, self.norm) @ self.head.t()
        ce = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1))
        return ce + cfg["aux_loss_coef"] * aux_sum + cfg["z_loss_coef"] * z_sum


def measure(mode, steps, warmup):
    torch.manual_seed(0)
    model = Model()
    optim = torch.optim.AdamW(
        model.parameters(),
        lr=cfg["lr"],
        betas=(cfg["beta1"], cfg["beta2"]),
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
    )
    loss_of = torch.compile(model) if mode.startswith("compile") else model
    bf16 = mode.endswith("autocast")
    accumulation = GB // MB
    data = torch.randint(0, V, (accumulation, MB, S + 1))

    def step():
        optim.zero_grad(set_to_none=True)
        for micro in data:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(micro[:, :-1], micro[:, 1:]) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optim.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    return {"tokens_per_s": GB * S / mean, "step_s": mean}


report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens_per_step": GB * S, "modes": {}}
for mode in cfg["modes"]:
    # Compilation happens in the first steps, and again while dynamo
    # settles on dynamic shapes for the experts' varying row counts.
    warmup = 6 if mode.startswith("compile") else 2
    try:
        report["modes"][mode] = measure(mode, cfg["steps"], warmup)
    except Exception as e:  # a mode that cannot run here is a row with its reason
        report["modes"][mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    print(f"torch {mode}: {report['modes'][mode]}", file=sys.stderr)
print(json.dumps(report))
