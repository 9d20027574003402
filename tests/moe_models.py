"""Grouped-matmul MoE test models, faithful to two real libraries, and float64 NumPy
references that serve every row with its own adapter merged in (issue #22).

Shared by `tests/test_moe_models.py` (no test file imports another). The models
are pure JAX over a flat parameter dict, written with the same primitives, in the
same order, as the libraries they mirror: per-row adapters have to carry each
token's row id through exactly these reshapes, sorts, gathers and scatters to the
`ragged_dot`.

- `easydel_moe`: EasyDeL's `standard_moe` path (Qwen3-MoE / Mixtral), from
  erfanzar/EasyDeL @ 090a03b2e0b3606bd38e0e3fcfdc640cd7e6e246:
  `easydel/layers/moe/_moe_module.py` (`BaseMoeModule._moe_call_standard`,
  `_replicate_and_sort_tokens`), `easydel/layers/moe/_communication_utils.py`
  (`sort_activations`, a `custom_vjp` around `inputs[sort_indices, ...]`;
  `get_experts_location`), `easydel/modules/qwen3_moe/modeling_qwen3_moe.py`
  (`Qwen3MoeMLPStack`: `down(act(gate(x)) * up(x))`, each a grouped matmul of
  `easydel/layers/linears/_linear_moe.py`, `lax.ragged_dot` on XLA).
  Routing: softmax over the experts, top-k, renormalised by the sum when
  `normalize` (Qwen3-MoE's `norm_topk_prob`, Mixtral). EasyDeL at that commit
  takes `lax.top_k` of the logits and divides the selected values by their sum
  (`normalize_selected_weights`); softmax is monotone, so the same experts are
  selected, and the renormalised softmax is what Hugging Face's Qwen3-MoE and
  Mixtral compute. The routing weights' formula does not touch the row ids' path.
- `maxtext_moe`: MaxText's sparse-matmul path (`RoutedMoE.permute`,
  `sparse_matmul`'s `gmm` with `jax.lax.ragged_dot`, `unpermute`, and `get_topk`:
  top-k of the logits, softmax over the k, `/= sum` when `norm_topk_prob`) in two
  versions of AI-Hypercomputer/maxtext, chosen by `sort`:
  - `"take"`: `MaxText/layers/moe.py` @ 81c79260b8fde3aeb4144926d3869964a5a9aa2f
    (2025-08): `jnp.take(inputs_2d, argsort(flat) // k, axis=0)` and
    `jnp.take(intermediate, jnp.argsort(sorted_selected_experts), axis=0)`;
  - `"repeat"`: `src/maxtext/layers/moe.py` @
    e591f30cbbf217ed67ef71263ec0538239f9c3b8 (today's): `_sort_activations(
    jnp.repeat(inputs_2d, k, axis=0), sorted_selected_experts)` (a `custom_vjp`
    around `inputs[sort_indices, ...]`) and the same to unsort.
  Both then reshape the weights to `(-1, k)`, the outputs to `(N, k, -1)`, combine
  with `einsum("BKE,BK -> BE")` and reshape to `(batch, seq, -1)`.

The decoder block around either (`decoder`): RMSNorm, causal multi-head
attention with `q`/`k`/`v`/`o` projections (RoPE optional), a residual, RMSNorm,
the MoE block, a residual. It takes `x: (B, T, D)`; the MoE blocks flatten to
`(B*T, D)` inside, as both libraries do.

The references (`reference_moe`, `reference_decoder`) never call `lorax_arrays`:
each token `(b, t)` with adapter `i = indices[b, t]` (indices broadcast from
scalar or `(B,)`) uses the weights `W + scale · A_i @ B_i` merged in float64
NumPy (`-1`: the base weights), with explicit loops over tokens and experts and
the top-k taken in NumPy.
"""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import lorax_arrays as lx

ATTENTION = ("q", "k", "v", "o")
EXPERTS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Config:
    d: int = 8  # d_model
    f: int = 6  # expert intermediate
    e: int = 4  # experts
    k: int = 2  # experts per token
    heads: int = 2
    head_dim: int = 4
    normalize: bool = True  # renormalise the top-k weights (norm_topk_prob)
    rope: bool = True
    eps: float = 1e-6


CONFIG = Config()


def init_params(cfg: Config = CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights, one flat dict (the paths the rules match)."""
    r = np.random.default_rng(seed)
    d, f, e, hd = cfg.d, cfg.f, cfg.e, cfg.heads * cfg.head_dim

    def normal(*shape, fan_in):
        return (r.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

    return {
        "attn_norm": (1 + 0.1 * r.normal(size=(d,))).astype(np.float32),
        "q": normal(d, hd, fan_in=d),
        "k": normal(d, hd, fan_in=d),
        "v": normal(d, hd, fan_in=d),
        "o": normal(hd, d, fan_in=hd),
        "mlp_norm": (1 + 0.1 * r.normal(size=(d,))).astype(np.float32),
        "router": normal(d, e, fan_in=d / 4),  # a decisive router
        "gate": normal(e, d, f, fan_in=d),
        "up": normal(e, d, f, fan_in=d),
        "down": normal(e, f, d, fan_in=f),
    }


def rules(attention: bool = True) -> list[lx.LoraRule]:
    # Ranks chosen so that no factor stack, seen as `(E, d, n·r)` by the
    # expert-grouped form (3 adapters), has the shape of an expert weight.
    """Expert weights `(E, d, f)` stacked over the experts; attention 2-D."""
    out = [
        lx.LoraRule("^(gate|up)$", 4, stack_axes=0, in_axes=1, out_axes=2),
        lx.LoraRule("^down$", 3, alpha=6.0, stack_axes=0, in_axes=1, out_axes=2),
    ]
    if attention:
        out.append(lx.LoraRule("^[qkvo]$", 2, alpha=3.0))
    return out


def make_adapter(params, rule_list, seed: int) -> lx.Adapter:
    """`lx.init_adapter`'s layout, with random non-zero normal factors (`b` starts
    at zero in a fresh adapter, which would test nothing); `a` over `sqrt(d_in)`
    keeps the adapted model's activations of order one."""
    fresh = lx.init_adapter(params, rule_list, key=jax.random.key(seed))
    r = np.random.default_rng(1000 + seed)
    weights = {}
    for path, (a, b) in fresh.weights.items():
        d_in = np.shape(a)[-2]
        a_new = r.normal(size=np.shape(a)) / np.sqrt(d_in)
        b_new = r.normal(size=np.shape(b))
        weights[path] = (a_new.astype(np.float32), b_new.astype(np.float32))
    return eqx.tree_at(lambda ad: ad.weights, fresh, weights)


# --- the models (JAX) ---


@jax.custom_vjp
def sort_activations(inputs, sort_indices):
    """EasyDeL's `sort_activations_custom` / MaxText's `_sort_activations_custom`:
    `inputs[sort_indices, ...]`, its backward pass the inverse permutation."""
    return inputs[sort_indices, ...]


def _sort_fwd(inputs, sort_indices):
    return inputs[sort_indices, ...], sort_indices


def _sort_bwd(sort_indices, grads):
    return grads[jnp.argsort(sort_indices), ...], None


sort_activations.defvjp(_sort_fwd, _sort_bwd)


def _swiglu_experts(p, sorted_inputs, group_sizes):
    """Qwen3MoeMLPStack / MaxText gmm: `down(silu(gate(x)) * up(x))`, each one
    `lax.ragged_dot` over the tokens grouped by expert."""
    w0 = jax.lax.ragged_dot(sorted_inputs, p["gate"], group_sizes)
    w1 = jax.lax.ragged_dot(sorted_inputs, p["up"], group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(w0) * w1, p["down"], group_sizes)


def easydel_moe(p, hidden_state, cfg: Config = CONFIG):
    """`BaseMoeModule._moe_call_standard` with `Qwen3MoeMLPStack` experts;
    `hidden_state: (B, S, H)` -> `(B, S, H)`."""
    batch_size, seq_len, hidden_size = hidden_state.shape
    hidden_state_flat = hidden_state.reshape(-1, hidden_size)
    router_logits = hidden_state_flat @ p["router"]  # the gate layer
    router_probs = jax.nn.softmax(router_logits, axis=-1)
    selected_weights, selected_experts = jax.lax.top_k(router_probs, cfg.k)
    if cfg.normalize and cfg.k > 1:  # normalize_selected_weights
        total = selected_weights.sum(axis=-1, keepdims=True)
        selected_weights = selected_weights / jnp.maximum(total, 1e-8)
    # _replicate_and_sort_tokens
    k = selected_experts.shape[-1]
    flat_idx = selected_experts.reshape(-1)
    sorted_by_expert = jnp.argsort(flat_idx)
    replicated = jnp.repeat(hidden_state_flat, k, axis=0)
    sorted_inputs = sort_activations(replicated, sorted_by_expert)
    group_sizes = jnp.bincount(flat_idx, length=cfg.e)
    # expert_layer(sorted_inputs, group_sizes, sorted_experts)
    out_sorted = _swiglu_experts(p, sorted_inputs, group_sizes)
    out_unsorted = sort_activations(out_sorted, jnp.argsort(sorted_by_expert))
    out_unflat = out_unsorted.reshape(batch_size * seq_len, cfg.k, hidden_size)
    output = jnp.sum(out_unflat * selected_weights[..., None], axis=1)
    return output.reshape(batch_size, seq_len, hidden_size)


def maxtext_moe(p, inputs, cfg: Config = CONFIG, sort: str = "repeat"):
    """`RoutedMoE`'s sparse-matmul path (gate, `permute`, gmm, `unpermute`);
    `inputs: (B, S, D)` -> `(B, S, D)`. `sort`: `"take"` (MaxText 2025-08) or
    `"repeat"` (today's), see the module docstring."""
    # GateLogit (a DenseGeneral over the last axis): (B, S, E)
    gate_logits = jax.lax.dot_general(inputs, p["router"], (((2,), (0,)), ((), ())))
    # permute
    inputs_shape = inputs.shape
    bsz_times_seq_len = inputs_shape[0] * inputs_shape[1]
    inputs_2d = jnp.reshape(inputs, (bsz_times_seq_len, inputs_shape[2]))
    # get_topk
    weights, selected_experts = jax.lax.top_k(gate_logits, cfg.k)
    weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1)
    if cfg.normalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    flatten_selected_experts = jnp.ravel(selected_experts)
    sorted_selected_experts = jnp.argsort(flatten_selected_experts)
    if sort == "take":
        sorted_indices = sorted_selected_experts // cfg.k
        sorted_inputs = jnp.take(inputs_2d, indices=sorted_indices, axis=0)
    elif sort == "repeat":
        replicated_inputs_2d = jnp.repeat(inputs_2d, cfg.k, axis=0)
        sorted_inputs = sort_activations(replicated_inputs_2d, sorted_selected_experts)
    else:
        raise ValueError(sort)
    group_size = jnp.bincount(flatten_selected_experts, length=cfg.e)
    # sparse_matmul: gmm(x, w0), gmm(x, w1), apply_ffn_activation, gmm(., wo)
    intermediate = _swiglu_experts(p, sorted_inputs, group_size)
    # unpermute
    revert = jnp.argsort(sorted_selected_experts)
    if sort == "take":
        unsort_intermediate = jnp.take(intermediate, indices=revert, axis=0)
    else:
        unsort_intermediate = sort_activations(intermediate, revert)
    reshaped_weights = jnp.reshape(weights, (-1, cfg.k))
    reshaped_intermediate = jnp.reshape(
        unsort_intermediate, (reshaped_weights.shape[0], cfg.k, -1)
    )
    output = jnp.einsum("BKE,BK -> BE", reshaped_intermediate, reshaped_weights)
    return output.reshape(inputs_shape[0], inputs_shape[1], -1)


STYLES = {
    "easydel": easydel_moe,
    "maxtext-take": functools.partial(maxtext_moe, sort="take"),
    "maxtext-repeat": functools.partial(maxtext_moe, sort="repeat"),
}


def rms_norm(x, w, eps):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * w


def rope(x, positions):
    """Rotary embedding, half-split (Llama / Qwen): `x: (B, T, H, hd)`."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions[:, None].astype(jnp.float32) * freq  # (T, half)
    cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(p, x, cfg: Config = CONFIG):
    """Causal multi-head self-attention, `x: (B, T, D)`."""
    b, t, _ = x.shape
    q = (x @ p["q"]).reshape(b, t, cfg.heads, cfg.head_dim)
    k = (x @ p["k"]).reshape(b, t, cfg.heads, cfg.head_dim)
    v = (x @ p["v"]).reshape(b, t, cfg.heads, cfg.head_dim)
    if cfg.rope:
        pos = jnp.arange(t)
        q, k = rope(q, pos), rope(k, pos)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
    return out @ p["o"]


def decoder(p, x, cfg: Config = CONFIG, style: str = "easydel"):
    """One pre-norm decoder block, `x: (B, T, D)` -> `(B, T, D)`."""
    h = x + attention(p, rms_norm(x, p["attn_norm"], cfg.eps), cfg)
    return h + STYLES[style](p, rms_norm(h, p["mlp_norm"], cfg.eps), cfg)


# --- the float64 NumPy references ---


def merged_weights(params, adapters, i: int) -> dict[str, np.ndarray]:
    """float64 weights with adapter `i` merged (`-1`: the base): `W + scale ·
    A @ B`, over the expert stack for the expert weights."""
    out = {k: np.asarray(v, np.float64) for k, v in params.items()}
    if i < 0:
        return out
    ad = adapters[i]
    for path, (a, b) in ad.weights.items():
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.ndim == 3:  # (E, d, r) @ (E, r, f), expert by expert
            delta = np.stack([a[e] @ b[e] for e in range(a.shape[0])])
        else:
            delta = a @ b
        out[path] = out[path] + float(ad.scale(path)) * delta
    return out


def per_token(indices, b: int, t: int) -> np.ndarray:
    """Indices broadcast to `(B, T)`: scalar, per request `(B,)`, per token."""
    idx = np.asarray(indices)
    if idx.ndim == 1:
        idx = idx[:, None]
    return np.broadcast_to(idx, (b, t)).astype(np.int64)


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _moe_token(w, x, cfg: Config):
    """One token through the MoE block with its own weights `w`; also the gap
    between the k-th and (k+1)-th routing probability (float32 could pick a
    different expert when it is tiny)."""
    z = x @ w["router"]
    prob = np.exp(z - z.max())
    prob /= prob.sum()
    order = np.argsort(-prob, kind="stable")
    top = order[: cfg.k]
    gap = prob[order[cfg.k - 1]] - prob[order[cfg.k]] if cfg.k < cfg.e else 1.0
    weight = prob[top]
    if cfg.normalize:
        weight = weight / weight.sum()
    y = np.zeros(cfg.d)
    for e, g in zip(top, weight):
        h = _silu(x @ w["gate"][e]) * (x @ w["up"][e])
        y += g * (h @ w["down"][e])
    return y, gap


def reference_moe(params, adapters, indices, x, cfg: Config = CONFIG):
    """The MoE block, `x: (B, T, D)`, each token with its adapter merged; returns
    `(y, smallest top-k gap)`."""
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    idx = per_token(indices, b, t)
    merged = {i: merged_weights(params, adapters, i) for i in np.unique(idx)}
    y = np.zeros_like(x)
    gaps = []
    for bi in range(b):
        for ti in range(t):
            y[bi, ti], gap = _moe_token(merged[idx[bi, ti]], x[bi, ti], cfg)
            gaps.append(gap)
    return y, min(gaps)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_np(x, t_pos):
    """`x: (H, hd)` at position `t_pos`, half-split as `rope`."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (np.arange(half) / half))
    cos, sin = np.cos(t_pos * freq), np.sin(t_pos * freq)
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_decoder(params, adapters, indices, x, cfg: Config = CONFIG):
    """`decoder` in float64 NumPy, token by token with the token's own merged
    weights (keys and values of token `s` use token `s`'s adapter, as the
    model's projections do); returns `(y, smallest top-k gap)`."""
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    hn, hd = cfg.heads, cfg.head_dim
    idx = per_token(indices, b, t)
    merged = {i: merged_weights(params, adapters, i) for i in np.unique(idx)}
    y = np.zeros_like(x)
    gaps = []
    for bi in range(b):
        q = np.zeros((t, hn, hd))
        k = np.zeros((t, hn, hd))
        v = np.zeros((t, hn, hd))
        for ti in range(t):
            w = merged[idx[bi, ti]]
            xn = _rms(x[bi, ti], w["attn_norm"], cfg.eps)
            q[ti] = (xn @ w["q"]).reshape(hn, hd)
            k[ti] = (xn @ w["k"]).reshape(hn, hd)
            v[ti] = (xn @ w["v"]).reshape(hn, hd)
            if cfg.rope:
                q[ti], k[ti] = _rope_np(q[ti], ti), _rope_np(k[ti], ti)
        for ti in range(t):
            w = merged[idx[bi, ti]]
            att = np.zeros((hn, hd))
            for h in range(hn):  # causal: keys 0..ti
                logits = np.array([q[ti, h] @ k[si, h] for si in range(ti + 1)])
                logits /= np.sqrt(hd)
                pr = np.exp(logits - logits.max())
                pr /= pr.sum()
                att[h] = sum(pr[si] * v[si, h] for si in range(ti + 1))
            hid = x[bi, ti] + att.reshape(-1) @ w["o"]
            out, gap = _moe_token(w, _rms(hid, w["mlp_norm"], cfg.eps), cfg)
            y[bi, ti] = hid + out
            gaps.append(gap)
    return y, min(gaps)
