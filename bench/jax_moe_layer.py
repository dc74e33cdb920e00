"""The peer for `switchyard bench layer`: the same MoE layer in JAX.

Router softmax, top-k with renormalised gates, dropless SwiGLU experts,
gated combine, the Switch aux loss and the z-loss; forward and backward
(jax.value_and_grad) under jax.jit on CPU. Two dispatch strategies are
timed and the faster one is reported, so the peer gets its best case:
`ragged_dot` grouped matmuls (dropless, the same semantics as switchyard)
and a capacity-padded einsum (capacity = tokens*k/E, the classic
GShard/Switch layout).

Usage: python3 jax_moe_layer.py '{"d_model":512,"ffn_hidden":1024,"n_experts":8,"top_k":2,"tokens":4096}'
Prints one JSON object with tokens_per_s.
"""
import json
import sys
import time

case = json.loads(sys.argv[1])
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

D, F, E, K, N = case["d_model"], case["ffn_hidden"], case["n_experts"], case["top_k"], case["tokens"]

keys = jax.random.split(jax.random.PRNGKey(0), 6)
params = {
    "router": 0.02 * jax.random.normal(keys[0], (E, D), jnp.float32),
    "w1": 0.02 * jax.random.normal(keys[1], (E, D, F), jnp.float32),
    "w3": 0.02 * jax.random.normal(keys[2], (E, D, F), jnp.float32),
    "w2": 0.02 * jax.random.normal(keys[3], (E, F, D), jnp.float32),
}
x = jax.random.normal(keys[4], (N, D), jnp.float32)
probe = jax.random.normal(keys[5], (N, D), jnp.float32)


def route(p, x):
    logits = x @ p["router"].T
    probs = jax.nn.softmax(logits, axis=-1)
    gates, idx = jax.lax.top_k(probs, K)
    gates = gates / gates.sum(-1, keepdims=True)
    counts = jnp.bincount(idx.reshape(-1), length=E)
    aux = E * jnp.sum(counts / (N * K) * probs.mean(0))
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return gates, idx, counts, aux, z


def moe_ragged(p, x):
    gates, idx, counts, aux, z = route(p, x)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // K
    xs = x[token]
    h1 = jax.lax.ragged_dot(xs, p["w1"], counts)
    h3 = jax.lax.ragged_dot(xs, p["w3"], counts)
    y = jax.lax.ragged_dot(jax.nn.silu(h1) * h3, p["w2"], counts)
    g = gates.reshape(-1)[order]
    out = jnp.zeros_like(x).at[token].add(y * g[:, None])
    return out, aux, z


def moe_capacity(p, x):
    gates, idx, counts, aux, z = route(p, x)
    cap = max(1, (N * K + E - 1) // E)
    flat = idx.reshape(-1)
    onehot = jax.nn.one_hot(flat, E, dtype=jnp.int32)
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    keep = pos < cap
    slot = jnp.where(keep, flat * cap + pos, E * cap)  # overflow row is dropped
    token = jnp.arange(N * K) // K
    buf = jnp.zeros((E * cap + 1, D), x.dtype).at[slot].set(x[token])[:-1].reshape(E, cap, D)
    h1 = jnp.einsum("ecd,edf->ecf", buf, p["w1"])
    h3 = jnp.einsum("ecd,edf->ecf", buf, p["w3"])
    y = jnp.einsum("ecf,efd->ecd", jax.nn.silu(h1) * h3, p["w2"]).reshape(E * cap, D)
    y = jnp.concatenate([y, jnp.zeros((1, D), y.dtype)])[slot]
    g = jnp.where(keep, gates.reshape(-1), 0.0)
    out = jnp.zeros_like(x).at[token].add(y * g[:, None])
    return out, aux, z


def timed(layer):
    def loss(p, x):
        out, aux, z = layer(p, x)
        return jnp.sum(out * probe) + 0.01 * aux + 0.001 * z

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(params, x))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


results = {}
for name, layer in [("ragged_dot", moe_ragged), ("capacity_einsum", moe_capacity)]:
    try:
        results[name] = timed(layer)
    except Exception as e:  # an older JAX without ragged_dot, for example
        print(f"{name}: {e}", file=sys.stderr)
best = min(results, key=results.get)
print(json.dumps({"tokens_per_s": N / results[best], "strategy": best, "jax": jax.__version__,
                  "seconds": results}))
