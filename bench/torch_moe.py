"""The MoE layer as the PyTorch peers write it (bench/torch_moe_layer.py,
bench/torch_train_step.py): router softmax, top-k with renormalised gates,
dropless SwiGLU experts with tokens sorted by expert and one matmul triple
per expert (the usual eager implementation), the gated combine, the
Switch aux loss and the z-loss."""
import torch
import torch.nn.functional as F


def moe(x, router, w1, w3, w2, k):
    """x [N, D], router [E, D], w1/w3 [E, F, D], w2 [E, D, F] -> (out [N, D], aux, z)."""
    n, e_count = x.shape[0], router.shape[0]
    logits = (x @ router.t()).float()
    probs = torch.softmax(logits, dim=-1)
    gates, idx = torch.topk(probs, k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=e_count)
    out = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        rows = token[start:start + c]
        xe = x[rows]
        h = F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
        g = gates.reshape(-1)[order[start:start + c]].unsqueeze(1)
        out = out.index_add(0, rows, ((h @ w2[e].t()) * g).to(out.dtype))
        start += c
    aux = e_count * torch.sum(counts.float() / (n * k) * probs.mean(0))
    z = torch.mean(torch.logsumexp(logits, dim=-1) ** 2)
    return out, aux, z
