"""Small Flax NNX model families, written the way the real ones are, for the
coverage sweep (`benchmarks/coverage_sweep.py`) and `tests/test_nnx_families.py`.

Each family is a tiny-config port (random weights) of how a real code base writes
the model, not a toy stand-in: the same parameter shapes and the same `jnp`/`lax`
calls on the weights, since those are what reach `lx.quaxify`'s rules.

- `llama3` (Tunix / MaxText Llama 3): `nnx.Einsum` q/k/v `(D, N, H)`, o
  `(N, H, D)`, GQA, RoPE, RMSNorm, SwiGLU `nnx.Linear`, untied head; prefill and
  teacher-forced decode steps on an explicit KV cache.
- `llama3-scan` (MaxText `scan_layers=True`): the same blocks stacked by
  `nnx.vmap`, run by `nnx.scan`.
- `qwen2` (HF / Tunix Qwen 2): `nnx.Linear` q/k/v with biases, tied head
  `embed.attend(x)`.
- `qwen3` (Tunix Qwen 3): `Einsum` modules (a `w` parameter read by `jnp.einsum`),
  q/k RMSNorm per head, tied head `x @ E.T`.
- `qwen3-moe` (Tunix Qwen 3 MoE): experts `(E, D, F)` run densely
  (`'BTD,EDF->BTEF'`), mixed by the top-k routing weights.
- `gemma2` (flax `examples/gemma`, Tunix): fused `qkv_einsum (3, N, D, H)`,
  `gating_einsum (2, D, F)` read as `w[0]`, `w[1]`, attention and final logit
  soft-caps, local/global sliding window, pre/post norms, `sqrt(D)`-scaled
  embedding, tied head `x @ E.T`.
- `gemma3` (`google-deepmind/gemma`'s `gm.nn`): `q_einsum (N, D, H)` + `kv_einsum
  (2, K, D, H)`, q/k norms, FFN `'...F,NHF->...NH'` on `gating_einsum (2, H, F)`.
  Both Gemmas also with one LoRA over each whole fused kernel (`-whole`).
- `gemma4` (Gemma 3n / 4 per-layer inputs): a per-layer embedding `(V, L, P)`
  looked up by token, a projection `w * D**-0.5`, layers stacked and run by
  `lax.while_loop`, with NumPy-constant weight scales inside the body.
- `maxtext`: `DenseGeneral` (`lax.dot_general`), the iota one-hot embedding, a
  `logits_dense` head in host memory (`jax.device_put` at each use).
- `deepseek-mla` (DeepSeek-V3 inference, `attn_impl="absorb"`): `wkv_b` reshaped
  per head and absorbed into the query and the output by einsums.
- `moe-*`: experts `(E, D, F)` reached by a gather `w[idx]`, `jnp.take`, a
  one-hot einsum over experts, GShard dispatch/combine einsums (experts a batch
  axis; MaxText's dense_matmul), `lax.ragged_dot` over tokens sorted by expert
  (MaxText's sparse_matmul without megablox).
- `nnx-mlp`, `nnx-cnn`, `nnx-lm1b`, `nnx-sharded`: the flax NNX basics MLP
  (BatchNorm, Dropout), the MNIST tutorial's CNN (`nnx.Conv`), `examples/lm1b_nnx`
  (`nnx.MultiHeadAttention` with its own KV cache), the sharding guide's
  `DotReluDot` (state constrained to its partition specs inside the call).

Each `Family` gives a builder (weights drawn with NumPy: no JAX compilation per
shape), LoRA rule sets chosen as a user would (q/k/v/o, gate/up/down, embeddings,
experts, fused kernels; a fused kernel in two ways: one LoRA per part, the part
axis a stack axis, or one LoRA over the whole fused output), example inputs for a
batch of `len(IDX)` rows, and the call to run (prefill + teacher-forced decode
steps where the family has a cache). `serve` loraifies a model with random
adapters; `reference` runs each row alone through the model with its adapter
merged in float64 NumPy (`einsum_merge`, not `lx.merge`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as PS

import lorax_arrays as lx
from tests.helpers import nonzero
from tests.model_helpers import einsum_merge

# --- tiny configuration --------------------------------------------------------

V, D, N, K, H, F = 32, 16, 4, 2, 4, 32  # vocab, width, q heads, kv heads, head dim, mlp
LAYERS = 2
PROMPT, STEPS = 5, 2  # prefill length, teacher-forced decode steps
E, TOP_K = 4, 2  # experts, experts per token
P = 4  # Gemma 4 per-layer input width
WINDOW = 3  # sliding window (local attention)

RANKS = (2, 4)
ALPHA = 4.0  # scales 2 and 1
IDX = np.array([0, 1, -1, 1])  # two adapters and a base row in one batch
ROWS = len(IDX)


# --- building with NumPy weights -----------------------------------------------


def build(make: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
    """`make(rngs)` with every parameter drawn by NumPy (shapes from
    `nnx.eval_shape`): matrices `N(0, 0.3)`, vectors `N(0, 0.1)`, norm scales
    `1 + N(0, 0.1)`, BatchNorm variances `1 + |N(0, 0.1)|`, integers zero."""
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(getattr(path[-2], "key", path[-2])) if len(path) > 1 else ""
        shape, dtype = x.shape, x.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.zeros(shape, dtype)
        z = rng.standard_normal(shape)
        if name in ("scale", "var"):
            z = 1 + 0.1 * (np.abs(z) if name == "var" else z)
        else:
            z = z * (0.3 if len(shape) >= 2 else 0.1)
        return jnp.asarray(z.astype(dtype))

    state = jax.tree_util.tree_map_with_path(draw, state)
    return nnx.merge(graphdef, state)


# --- shared layers -------------------------------------------------------------


class RMSNorm(nnx.Module):
    """Llama / Qwen: `x / rms(x) * scale`; Gemma (`plus_one`): `* (1 + scale)`."""

    def __init__(self, dim: int, *, plus_one: bool = False, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.zeros(dim) if plus_one else jnp.ones(dim))
        self.plus_one = plus_one

    def __call__(self, x):
        x = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        scale = self.scale[...]
        return x * (1 + scale if self.plus_one else scale)


class Einsum(nnx.Module):
    """Tunix / flax `examples/gemma`'s `Einsum`: one parameter `w`, the equation
    given at the call (`self.q_einsum('BTD,NDH->BTNH', x)`)."""

    def __init__(self, shape: tuple[int, ...], *, rngs: nnx.Rngs):
        self.w = nnx.Param(jnp.zeros(shape))

    def __call__(self, eqn: str, x):
        return jnp.einsum(eqn, x, self.w[...])


def rope(x, positions, base: float = 10_000.0):
    """Rotary embedding (the half-split form of Llama / Gemma): x `(B, T, N, H)`,
    positions `(B, T)`."""
    half = x.shape[-1] // 2
    freq = base ** (-np.arange(half, dtype=np.float32) / half)
    t = positions[..., None].astype(jnp.float32) * freq  # (B, T, half)
    sin, cos = jnp.sin(t)[..., None, :], jnp.cos(t)[..., None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_mask(q_pos, k_pos, window: int | None = None):
    """`(B, T, S)`: key position <= query position (and within `window`)."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - k_pos[:, None, :] < window
    return mask


def gqa(q, k, v, mask, *, scale=None, softcap=None):
    """Grouped-query attention: q `(B, T, N, H)`, k/v `(B, S, Kv, H)`, mask
    `(B, T, S)`; queries grouped onto their KV head, not KV repeated."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k)
    logits = logits * (h**-0.5 if scale is None else scale)
    if softcap is not None:  # Gemma 2: tanh(x / c) * c
        logits = jnp.tanh(logits / softcap) * softcap
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def new_kv_cache(batch: int, size: int, kv_heads: int = K, layers: int = LAYERS):
    """Tunix-style explicit cache: per layer `k`, `v` `(B, S, Kv, H)`."""
    zeros = jnp.zeros((batch, size, kv_heads, H))
    return [{"k": zeros, "v": zeros} for _ in range(layers)]


def cached_kv(cache, k, v, start):
    """Writes `k`, `v` at `start` (a traced scalar) and returns the whole cache."""
    k = lax.dynamic_update_slice(cache["k"], k, (0, start, 0, 0))
    v = lax.dynamic_update_slice(cache["v"], v, (0, start, 0, 0))
    return k, v, {"k": k, "v": v}


def prefill_and_decode(model, tokens):
    """Prefill `PROMPT` tokens, then decode the rest one at a time, teacher-forced
    (fed `tokens`, so a near-tie cannot flip a greedy token between the batch and
    the reference); all logits `(B, len, V)`."""
    b, total = tokens.shape
    cache = new_kv_cache(b, total, layers=len(model.layers))
    positions = jnp.broadcast_to(jnp.arange(PROMPT), (b, PROMPT))
    logits, cache = model(tokens[:, :PROMPT], positions, cache, 0)
    outs = [logits]
    for t in range(PROMPT, total):
        positions = jnp.full((b, 1), t)
        step, cache = model(tokens[:, t : t + 1], positions, cache, jnp.int32(t))
        outs.append(step)
    return jnp.concatenate(outs, axis=1)


def forward(model, tokens):
    """A whole sequence, no cache."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model(tokens, positions)


def swiglu(x, gate, up, down):
    return down(jax.nn.silu(gate(x)) * up(x))


# --- Llama 3 -------------------------------------------------------------------


class LlamaAttention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), rngs=rngs)
        self.k_proj = nnx.Einsum("BSD,DKH->BSKH", (D, K, H), rngs=rngs)
        self.v_proj = nnx.Einsum("BSD,DKH->BSKH", (D, K, H), rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (N, H, D), rngs=rngs)

    def __call__(self, x, positions, cache=None, start=0):
        q = rope(self.q_proj(x), positions, 500_000.0)
        k = rope(self.k_proj(x), positions, 500_000.0)
        v = self.v_proj(x)
        if cache is not None:
            k, v, cache = cached_kv(cache, k, v, start)
        k_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
        out = gqa(q, k, v, causal_mask(positions, k_pos))
        return self.o_proj(out), cache


class LlamaMLP(nnx.Module):
    def __init__(self, rngs):
        self.gate_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(D, F, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(F, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class LlamaBlock(nnx.Module):
    def __init__(self, rngs):
        self.input_layernorm = RMSNorm(D, rngs=rngs)
        self.attn = LlamaAttention(rngs)
        self.post_attention_layernorm = RMSNorm(D, rngs=rngs)
        self.mlp = LlamaMLP(rngs)

    def __call__(self, x, positions, cache=None, start=0):
        h, cache = self.attn(self.input_layernorm(x), positions, cache, start)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Llama3(nnx.Module):
    """Layers in an `nnx.List`, an explicit KV cache passed in and returned."""

    def __init__(self, rngs):
        self.embedder = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([LlamaBlock(rngs) for _ in range(LAYERS)])
        self.final_norm = RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens, positions, cache=None, start=0):
        x = self.embedder(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, None if cache is None else cache[i], start)
            new_cache.append(c)
        logits = self.lm_head(self.final_norm(x))
        return (logits, new_cache) if cache is not None else logits


class Llama3Scan(nnx.Module):
    """MaxText's `scan_layers=True`: blocks made by `nnx.vmap`, run by `nnx.scan`."""

    def __init__(self, rngs):
        self.embedder = nnx.Embed(V, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return LlamaBlock(rngs)

        self.layers = make(rngs)
        self.final_norm = RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens, positions):
        x = self.embedder(tokens)

        def step(x, layer):
            return layer(x, positions)[0]

        x = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
        return self.lm_head(self.final_norm(x))


def llama_rules(rank, stacked=False):
    s = 1 if stacked else 0
    st = (0,) if stacked else ()
    return [
        lx.LoraRule(
            r"attn/(q|k|v)_proj/kernel",
            rank=rank,
            alpha=ALPHA,
            in_axes=(s,),
            out_axes=(s + 1, s + 2),
            stack_axes=st,
        ),
        lx.LoraRule(
            r"attn/o_proj/kernel",
            rank=rank,
            alpha=ALPHA,
            in_axes=(s, s + 1),
            out_axes=(s + 2,),
            stack_axes=st,
        ),
        lx.LoraRule(
            r"mlp/(gate|up|down)_proj/kernel", rank=rank, alpha=ALPHA, stack_axes=st
        ),
        lx.LoraRule(r"embedder/embedding", rank=rank, alpha=ALPHA),
        lx.LoraRule(r"lm_head/kernel", rank=rank, alpha=ALPHA),
    ]


# --- Qwen 2 / Qwen 3 -----------------------------------------------------------


class Qwen2Attention(nnx.Module):
    """HF-style `nnx.Linear` projections: q/k/v with biases, o without."""

    def __init__(self, rngs):
        self.q_proj = nnx.Linear(D, N * H, use_bias=True, rngs=rngs)
        self.k_proj = nnx.Linear(D, K * H, use_bias=True, rngs=rngs)
        self.v_proj = nnx.Linear(D, K * H, use_bias=True, rngs=rngs)
        self.o_proj = nnx.Linear(N * H, D, use_bias=False, rngs=rngs)

    def __call__(self, x, positions):
        b, t, _ = x.shape
        q = rope(self.q_proj(x).reshape(b, t, N, H), positions, 1_000_000.0)
        k = rope(self.k_proj(x).reshape(b, t, K, H), positions, 1_000_000.0)
        v = self.v_proj(x).reshape(b, t, K, H)
        out = gqa(q, k, v, causal_mask(positions, positions))
        return self.o_proj(out.reshape(b, t, N * H))


class Qwen3Attention(nnx.Module):
    """Tunix Qwen 3: `Einsum` modules and an RMSNorm over each head's q and k."""

    def __init__(self, rngs):
        self.q_proj = Einsum((D, N, H), rngs=rngs)
        self.k_proj = Einsum((D, K, H), rngs=rngs)
        self.v_proj = Einsum((D, K, H), rngs=rngs)
        self.o_proj = Einsum((N, H, D), rngs=rngs)
        self.q_norm = RMSNorm(H, rngs=rngs)
        self.k_norm = RMSNorm(H, rngs=rngs)

    def __call__(self, x, positions):
        q = self.q_norm(self.q_proj("BTD,DNH->BTNH", x))
        k = self.k_norm(self.k_proj("BSD,DKH->BSKH", x))
        v = self.v_proj("BSD,DKH->BSKH", x)
        q, k = rope(q, positions, 1_000_000.0), rope(k, positions, 1_000_000.0)
        out = gqa(q, k, v, causal_mask(positions, positions))
        return self.o_proj("BTNH,NHD->BTD", out)


class DenseMoE(nnx.Module):
    """Tunix Qwen 3 MoE: every expert on every token (`'BTD,EDF->BTEF'`), mixed
    by the top-k routing weights spread over experts with a one-hot."""

    def __init__(self, rngs):
        self.router = nnx.Linear(D, E, use_bias=False, rngs=rngs)
        self.gate_proj = nnx.Param(jnp.zeros((E, D, F)))
        self.up_proj = nnx.Param(jnp.zeros((E, D, F)))
        self.down_proj = nnx.Param(jnp.zeros((E, F, D)))

    def __call__(self, x):
        weights, experts = lax.top_k(self.router(x), TOP_K)
        weights = jax.nn.softmax(weights, axis=-1)
        per_expert = jnp.einsum("BTK,BTKE->BTE", weights, jax.nn.one_hot(experts, E))
        gate = jnp.einsum("BTD,EDF->BTEF", x, self.gate_proj[...])
        up = jnp.einsum("BTD,EDF->BTEF", x, self.up_proj[...])
        out = jnp.einsum("BTEF,EFD->BTED", jax.nn.silu(gate) * up, self.down_proj[...])
        return jnp.einsum("BTED,BTE->BTD", out, per_expert)


class QwenBlock(nnx.Module):
    def __init__(self, version, rngs, moe=False):
        self.input_layernorm = RMSNorm(D, rngs=rngs)
        self.attn = (Qwen2Attention if version == 2 else Qwen3Attention)(rngs)
        self.post_attention_layernorm = RMSNorm(D, rngs=rngs)
        self.mlp = DenseMoE(rngs) if moe else LlamaMLP(rngs)

    def __call__(self, x, positions):
        x = x + self.attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2(nnx.Module):
    """Tied head read through `nnx.Embed.attend`."""

    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([QwenBlock(2, rngs) for _ in range(LAYERS)])
        self.norm = RMSNorm(D, rngs=rngs)

    def __call__(self, tokens, positions):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.embed_tokens.attend(self.norm(x))


class QwenEmbedder(nnx.Module):
    """Tunix's `Embedder`: `encode` looks rows up, `decode` is `x @ E.T`."""

    def __init__(self, rngs):
        self.input_embedding = nnx.Param(jnp.zeros((V, D)))

    def encode(self, x):
        return self.input_embedding[...][(x,)]

    def decode(self, x):
        return jnp.dot(x, self.input_embedding[...].T)


class Qwen3(nnx.Module):
    def __init__(self, rngs, moe=False):
        self.embedder = QwenEmbedder(rngs)
        self.layers = nnx.List([QwenBlock(3, rngs, moe) for _ in range(LAYERS)])
        self.final_norm = RMSNorm(D, rngs=rngs)

    def __call__(self, tokens, positions):
        x = self.embedder.encode(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.embedder.decode(self.final_norm(x))


def qwen2_rules(rank):
    return [
        lx.LoraRule(r"attn/(q|k|v|o)_proj/kernel", rank=rank, alpha=ALPHA),
        lx.LoraRule(r"mlp/(gate|up|down)_proj/kernel", rank=rank, alpha=ALPHA),
        lx.LoraRule(r"embed_tokens/embedding", rank=rank, alpha=ALPHA),
    ]


def expert_rules(rank, pattern=r"mlp/(gate|up|down)_proj"):
    """One LoRA per expert (PEFT's LoRA on MoE expert parameters): the expert axis
    is a stack axis."""
    return [
        lx.LoraRule(
            pattern,
            rank=rank,
            alpha=ALPHA,
            in_axes=(1,),
            out_axes=(2,),
            stack_axes=(0,),
        )
    ]


def qwen3_rules(rank, moe=False):
    rules = [
        lx.LoraRule(
            r"attn/(q|k|v)_proj/w",
            rank=rank,
            alpha=ALPHA,
            in_axes=(0,),
            out_axes=(1, 2),
        ),
        lx.LoraRule(
            r"attn/o_proj/w", rank=rank, alpha=ALPHA, in_axes=(0, 1), out_axes=(2,)
        ),
        lx.LoraRule(r"embedder/input_embedding", rank=rank, alpha=ALPHA),
    ]
    if moe:
        return rules + expert_rules(rank)
    return rules + [
        lx.LoraRule(r"mlp/(gate|up|down)_proj/kernel", rank=rank, alpha=ALPHA)
    ]


# --- Gemma 2 / 3 ---------------------------------------------------------------


class GemmaEmbedder(nnx.Module):
    """flax `examples/gemma` / Tunix: rows scaled by `sqrt(D)`, tied head `x @ E.T`."""

    def __init__(self, rngs):
        self.input_embedding = nnx.Param(jnp.zeros((V, D)))

    def encode(self, x):
        x = self.input_embedding[...][(x,)]
        return x * jnp.sqrt(D).astype(x.dtype)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding[...].T)


class GemmaAttention(nnx.Module):
    """`qkv_einsum (3, N, D, H)` when there are as many KV heads as query heads,
    else `q_einsum (N, D, H)` and `kv_einsum (2, K, D, H)`; `attn_vec_einsum
    (N, H, D)`."""

    def __init__(self, rngs, *, kv_heads, qk_norm=False, softcap=None, window=None):
        if kv_heads == N:
            self.qkv_einsum = Einsum((3, N, D, H), rngs=rngs)
        else:
            self.q_einsum = Einsum((N, D, H), rngs=rngs)
            self.kv_einsum = Einsum((2, kv_heads, D, H), rngs=rngs)
        self.attn_vec_einsum = Einsum((N, H, D), rngs=rngs)
        if qk_norm:
            self._query_norm = RMSNorm(H, plus_one=True, rngs=rngs)
            self._key_norm = RMSNorm(H, plus_one=True, rngs=rngs)
        self.qk_norm, self.softcap, self.window = qk_norm, softcap, window

    def __call__(self, x, positions):
        if hasattr(self, "qkv_einsum"):
            q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            q = self.q_einsum("BTD,NDH->BTNH", x)
            k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        if self.qk_norm:
            q, k = self._query_norm(q), self._key_norm(k)
        base = 10_000.0 if self.window else 1_000_000.0
        q, k = rope(q, positions, base), rope(k, positions, base)
        out = gqa(
            q,
            k,
            v,
            causal_mask(positions, positions, self.window),
            scale=H**-0.5,  # query_pre_attn_scalar
            softcap=self.softcap,
        )
        return self.attn_vec_einsum("BTNH,NHD->BTD", out)


class Gemma2FeedForward(nnx.Module):
    """flax `examples/gemma`: `gating_einsum (2, D, F)` read as `w[0]`, `w[1]`."""

    def __init__(self, rngs):
        self.gating_einsum = nnx.Param(jnp.zeros((2, D, F)))
        self.linear = nnx.Param(jnp.zeros((F, D)))

    def __call__(self, x):
        ff_gate = jnp.dot(x, self.gating_einsum[...][0])
        ff1 = jnp.dot(x, self.gating_einsum[...][1])
        return jnp.dot(jax.nn.gelu(ff_gate) * ff1, self.linear[...])


class Gemma3FeedForward(nnx.Module):
    """`gm.nn.FeedForward`: one einsum over `gating_einsum (2, hidden, features)`."""

    def __init__(self, rngs):
        self.gating_einsum = Einsum((2, F, D), rngs=rngs)
        self.linear = Einsum((F, D), rngs=rngs)

    def __call__(self, x):
        gate = self.gating_einsum("...F,NHF->...NH", x)
        activations = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        return self.linear("...H,HF->...F", activations)


class GemmaBlock(nnx.Module):
    """Pre- and post-norms around attention and the MLP (Gemma 2 and 3)."""

    def __init__(self, rngs, version, local):
        window = WINDOW if local else None
        if version == 2:
            attn = dict(kv_heads=N, softcap=50.0)
            self.mlp = Gemma2FeedForward(rngs)
        else:
            attn = dict(kv_heads=K, qk_norm=True)
            self.mlp = Gemma3FeedForward(rngs)
        self.pre_attention_norm = RMSNorm(D, plus_one=True, rngs=rngs)
        self.attn = GemmaAttention(rngs, window=window, **attn)
        self.post_attention_norm = RMSNorm(D, plus_one=True, rngs=rngs)
        self.pre_ffw_norm = RMSNorm(D, plus_one=True, rngs=rngs)
        self.post_ffw_norm = RMSNorm(D, plus_one=True, rngs=rngs)

    def __call__(self, x, positions):
        h = self.attn(self.pre_attention_norm(x), positions)
        x = x + self.post_attention_norm(h)
        h = self.mlp(self.pre_ffw_norm(x))
        return x + self.post_ffw_norm(h)


class Gemma(nnx.Module):
    """Local (sliding-window) and global layers alternating; final soft-cap."""

    def __init__(self, rngs, version):
        self.embedder = GemmaEmbedder(rngs)
        self.layers = nnx.List(
            [GemmaBlock(rngs, version, local=i % 2 == 0) for i in range(LAYERS)]
        )
        self.final_norm = RMSNorm(D, plus_one=True, rngs=rngs)
        self.final_logit_softcap = 30.0 if version == 2 else None

    def __call__(self, tokens, positions):
        x = self.embedder.encode(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        logits = self.embedder.decode(self.final_norm(x))
        if self.final_logit_softcap is not None:
            c = self.final_logit_softcap
            logits = jnp.tanh(logits / c) * c
        return logits


def gemma_rules(rank, version, fused: str):
    """`fused="parts"`: one LoRA per part of a fused kernel (q, k, v; gate, up),
    the part axis a stack axis. `fused="whole"`: one LoRA over the whole fused
    output (the part axis an out-axis)."""
    parts = fused == "parts"

    def fused_rule(pattern, part_axis, in_axes, out_axes):
        if parts:
            return lx.LoraRule(
                pattern,
                rank=rank,
                alpha=ALPHA,
                in_axes=in_axes,
                out_axes=out_axes,
                stack_axes=(part_axis,),
            )
        outs = tuple(sorted((part_axis, *out_axes)))
        return lx.LoraRule(
            pattern, rank=rank, alpha=ALPHA, in_axes=in_axes, out_axes=outs
        )

    if version == 2:  # as many KV heads as query heads: one (3, N, D, H) kernel
        attn = [fused_rule(r"attn/qkv_einsum/w", 0, (2,), (1, 3))]
    else:
        attn = [
            lx.LoraRule(
                r"attn/q_einsum/w",
                rank=rank,
                alpha=ALPHA,
                in_axes=(1,),
                out_axes=(0, 2),
            ),
            fused_rule(r"attn/kv_einsum/w", 0, (2,), (1, 3)),
        ]
    rules = [
        *attn,
        lx.LoraRule(
            r"attn/attn_vec_einsum/w",
            rank=rank,
            alpha=ALPHA,
            in_axes=(0, 1),
            out_axes=(2,),
        ),
        lx.LoraRule(r"mlp/linear", rank=rank, alpha=ALPHA),
        lx.LoraRule(r"embedder/input_embedding", rank=rank, alpha=ALPHA),
    ]
    if version == 2:  # (2, D, F)
        rules.insert(0, fused_rule(r"mlp/gating_einsum", 0, (1,), (2,)))
    else:  # (2, F, D): features last
        rules.insert(0, fused_rule(r"mlp/gating_einsum/w", 0, (2,), (1,)))
    return rules


# --- Gemma 4 per-layer inputs --------------------------------------------------

# Weight scales are NumPy constants, as a port keeps checkpoint constants.
GATE_SCALE = np.linspace(0.5, 1.5, P, dtype=np.float32)  # along the out-axis
PROJ_SCALE = np.float32(0.7)  # a 0-d NumPy array


class Gemma4Layer(nnx.Module):
    def __init__(self, rngs):
        self.pre_attention_norm = RMSNorm(D, plus_one=True, rngs=rngs)
        self.attn = GemmaAttention(rngs, kv_heads=K, qk_norm=True)
        self.pre_ffw_norm = RMSNorm(D, plus_one=True, rngs=rngs)
        self.mlp = LlamaMLP(rngs)
        self.per_layer_input_gate = nnx.Linear(D, P, use_bias=False, rngs=rngs)
        self.per_layer_projection = nnx.Linear(P, D, use_bias=False, rngs=rngs)
        self.post_per_layer_input_norm = RMSNorm(D, plus_one=True, rngs=rngs)

    def __call__(self, x, per_layer_input, positions):
        x = x + self.attn(self.pre_attention_norm(x), positions)
        x = x + self.mlp(self.pre_ffw_norm(x))
        # The weights scaled before use (NumPy constants, inside the while loop).
        gate_w = self.per_layer_input_gate.kernel[...] * GATE_SCALE
        proj_w = self.per_layer_projection.kernel[...] * PROJ_SCALE
        g = jax.nn.gelu(x @ gate_w) * per_layer_input
        return x + self.post_per_layer_input_norm(g @ proj_w)


class Gemma4(nnx.Module):
    """A second embedding `(V, L, P)` gives every layer its own input per token,
    plus a projection of the main embedding `(D, L, P)` scaled by `D**-0.5` before
    use; the layers (an `nnx.vmap` stack) run in a `lax.while_loop`, each
    rebuilt from its slice of the stacked state."""

    def __init__(self, rngs):
        self.embedder = GemmaEmbedder(rngs)
        self.embed_tokens_per_layer = nnx.Param(jnp.zeros((V, LAYERS, P)))
        self.per_layer_model_projection = nnx.Param(jnp.zeros((D, LAYERS, P)))
        self.per_layer_projection_norm = RMSNorm(P, plus_one=True, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Gemma4Layer(rngs)

        self.layers = make(rngs)
        self.final_norm = RMSNorm(D, plus_one=True, rngs=rngs)

    def __call__(self, tokens, positions):
        x = self.embedder.encode(tokens)
        per_layer = self.embed_tokens_per_layer[...][tokens] * math.sqrt(P)
        w = self.per_layer_model_projection[...] * D**-0.5
        proj = self.per_layer_projection_norm(jnp.einsum("BTD,DLP->BTLP", x, w))
        per_layer = (proj + per_layer) * 2**-0.5  # (B, T, L, P)

        graphdef, state = nnx.split(self.layers)

        def body(carry):
            i, x = carry
            layer = nnx.merge(graphdef, jax.tree.map(lambda w: w[i], state))
            return i + 1, layer(x, per_layer[:, :, i], positions)

        _, x = lax.while_loop(lambda c: c[0] < LAYERS, body, (jnp.int32(0), x))
        return self.embedder.decode(self.final_norm(x))


def gemma4_rules(rank):
    st = dict(rank=rank, alpha=ALPHA, stack_axes=(0,))
    return [
        lx.LoraRule(r"attn/q_einsum/w", in_axes=(2,), out_axes=(1, 3), **st),
        # One LoRA over k and v together: the (2, K) part axis as out-axes.
        lx.LoraRule(
            r"attn/kv_einsum/w",
            rank=rank,
            alpha=ALPHA,
            in_axes=(3,),
            out_axes=(1, 2, 4),
            stack_axes=(0,),
        ),
        lx.LoraRule(r"attn/attn_vec_einsum/w", in_axes=(1, 2), out_axes=(3,), **st),
        lx.LoraRule(r"mlp/(gate|up|down)_proj/kernel", **st),
        lx.LoraRule(r"per_layer_(input_gate|projection)/kernel", **st),
        lx.LoraRule(r"embedder/input_embedding", rank=rank, alpha=ALPHA),
        # The per-layer table: the token axis in, (L, P) out.
        lx.LoraRule(
            r"embed_tokens_per_layer",
            rank=rank,
            alpha=ALPHA,
            in_axes=(0,),
            out_axes=(1, 2),
        ),
        lx.LoraRule(
            r"per_layer_model_projection",
            rank=rank,
            alpha=ALPHA,
            in_axes=(0,),
            out_axes=(1, 2),
        ),
    ]


# --- MoE MLPs ------------------------------------------------------------------


class MoE(nnx.Module):
    """Experts `(E, D, F)`, `(E, D, F)`, `(E, F, D)`, top-k routing (softmax over
    the chosen experts' logits), reached in one of these styles:

    - `gather`: Mixtral-style, each token's chosen experts' weights gathered,
      `w[idx]` `(B, T, k, D, F)`, then a batched einsum;
    - `take`: the same with `jnp.take(w, idx, axis=0)`;
    - `onehot`: the chosen weights selected by an einsum with a one-hot over
      experts, `einsum('BTKE,EDF->BTKDF')`;
    - `gshard`: MaxText's dense_matmul: tokens dispatched to `(E, B, C, D)` by a
      dispatch mask, the expert axis a batch axis of every expert product,
      combined back with the routing weights;
    - `ragged`: MaxText's sparse_matmul without megablox: tokens sorted by expert,
      `lax.ragged_dot` with the group sizes, unsorted.
    """

    def __init__(self, rngs, style: str):
        self.router = nnx.Linear(D, E, use_bias=False, rngs=rngs)
        self.gate_proj = nnx.Param(jnp.zeros((E, D, F)))
        self.up_proj = nnx.Param(jnp.zeros((E, D, F)))
        self.down_proj = nnx.Param(jnp.zeros((E, F, D)))
        self.style = style

    def __call__(self, x):
        weights, experts = lax.top_k(self.router(x), TOP_K)  # (B, T, k)
        weights = jax.nn.softmax(weights, axis=-1)
        w1, w3, w2 = self.gate_proj[...], self.up_proj[...], self.down_proj[...]
        if self.style in ("gather", "take", "onehot"):
            if self.style == "gather":
                select = lambda w: w[experts]  # noqa: E731
            elif self.style == "take":
                select = partial(jnp.take, indices=experts, axis=0)
            else:
                onehot = jax.nn.one_hot(experts, E)
                select = partial(jnp.einsum, "BTKE,EDF->BTKDF", onehot)
            gate = jnp.einsum("BTD,BTKDF->BTKF", x, select(w1))
            up = jnp.einsum("BTD,BTKDF->BTKF", x, select(w3))
            out = jnp.einsum("BTKF,BTKFD->BTKD", jax.nn.silu(gate) * up, select(w2))
            return jnp.einsum("BTKD,BTK->BTD", out, weights)
        if self.style == "gshard":
            dispatch, combine = gshard_masks(experts, weights)
            xe = jnp.einsum("BTD,BTEC->EBCD", x, dispatch)
            gate = jnp.einsum("EBCD,EDF->EBCF", xe, w1)
            up = jnp.einsum("EBCD,EDF->EBCF", xe, w3)
            out = jnp.einsum("EBCF,EFD->EBCD", jax.nn.silu(gate) * up, w2)
            return jnp.einsum("EBCD,BTEC->BTD", out, combine)
        assert self.style == "ragged", self.style
        b, t, d = x.shape
        flat = experts.reshape(-1)  # (B*T*k,), token-major
        order = jnp.argsort(flat)
        xs = x.reshape(b * t, d)[order // TOP_K]
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        gate = lax.ragged_dot(xs, w1, sizes)
        up = lax.ragged_dot(xs, w3, sizes)
        out = lax.ragged_dot(jax.nn.silu(gate) * up, w2, sizes)
        out = out[jnp.argsort(order)].reshape(b, t, TOP_K, d)
        return jnp.einsum("BTKD,BTK->BTD", out, weights)


def gshard_masks(experts, weights):
    """MaxText-style dispatch and combine masks `(B, T, E, C)`, the capacity `C`
    large enough that no token is dropped: each (token, choice) takes the next slot
    of its expert's queue within its row."""
    b, t, k = experts.shape
    cap = t * k
    mask = jax.nn.one_hot(experts, E).reshape(b, t * k, E)
    slot = (jnp.cumsum(mask, axis=1) * mask - 1).astype(jnp.int32)  # -1: not sent
    per_choice = jax.nn.one_hot(slot, cap) * mask[..., None]  # (B, T*k, E, C)
    dispatch = per_choice.reshape(b, t, k, E, cap).sum(2)
    combine = per_choice * weights.reshape(b, t * k)[:, :, None, None]
    return dispatch, combine.reshape(b, t, k, E, cap).sum(2)


class MoELM(nnx.Module):
    def __init__(self, rngs, style):
        self.embedder = nnx.Embed(V, D, rngs=rngs)
        self.norm = RMSNorm(D, rngs=rngs)
        self.moe = MoE(rngs, style)
        self.final_norm = RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embedder(tokens)
        x = x + self.moe(self.norm(x))
        return self.lm_head(self.final_norm(x))


def moe_rules(rank):
    return [
        *expert_rules(rank, r"moe/(gate|up|down)_proj"),
        lx.LoraRule(r"lm_head/kernel", rank=rank, alpha=ALPHA),
    ]


# --- MaxText-style layers ------------------------------------------------------


class DenseGeneral(nnx.Module):
    """MaxText's NNX `DenseGeneral`: a kernel `(*in_features, *out_features)`,
    moved to the device first when parameters live in host memory
    (`parameter_memory_host_offload`: `jax.device_put`), cast to the compute
    dtype, and contracted with the input's trailing `axis` by `lax.dot_general`."""

    def __init__(self, in_features, out_features, *, axis=(-1,), offload=False, rngs):
        self.kernel = nnx.Param(jnp.zeros((*in_features, *out_features)))
        self.axis, self.offload = axis, offload

    def __call__(self, x):
        kernel = self.kernel[...]
        if self.offload:
            kernel = jax.device_put(kernel, jax.memory.Space.Device)
        kernel = jnp.asarray(kernel, jnp.float32)
        axis = tuple(a % x.ndim for a in self.axis)
        contract = tuple(range(len(axis)))
        return lax.dot_general(x, kernel, ((axis, contract), ((), ())))


class IotaEmbed(nnx.Module):
    """MaxText's `Embed` with `use_iota_embed`: a one-hot of the tokens (an
    `iota` comparison) times the table; `attend` is `x @ E.T`."""

    def __init__(self, rngs):
        self.embedding = nnx.Param(jnp.zeros((V, D)))

    def __call__(self, tokens):
        embedding = jnp.asarray(self.embedding[...], jnp.float32)
        one_hot = jnp.array(tokens[..., None] == lax.iota(jnp.int32, V), jnp.float32)
        return jnp.dot(one_hot, embedding)


class MaxTextBlock(nnx.Module):
    def __init__(self, rngs):
        self.pre_self_attention_norm = RMSNorm(D, rngs=rngs)
        self.query = DenseGeneral((D,), (N, H), rngs=rngs)
        self.key = DenseGeneral((D,), (K, H), rngs=rngs)
        self.value = DenseGeneral((D,), (K, H), rngs=rngs)
        self.out = DenseGeneral((N, H), (D,), axis=(-2, -1), rngs=rngs)
        self.post_self_attention_norm = RMSNorm(D, rngs=rngs)
        self.wi_0 = DenseGeneral((D,), (F,), rngs=rngs)
        self.wi_1 = DenseGeneral((D,), (F,), rngs=rngs)
        self.wo = DenseGeneral((F,), (D,), rngs=rngs)

    def __call__(self, x, positions):
        h = self.pre_self_attention_norm(x)
        q, k = rope(self.query(h), positions), rope(self.key(h), positions)
        out = gqa(q, k, self.value(h), causal_mask(positions, positions))
        x = x + self.out(out)
        h = self.post_self_attention_norm(x)
        return x + self.wo(jax.nn.silu(self.wi_0(h)) * self.wi_1(h))


class MaxText(nnx.Module):
    """Iota embedding, DenseGeneral everywhere, the `logits_dense` head kept in
    host memory (moved with `jax.device_put` at each use)."""

    def __init__(self, rngs):
        self.token_embedder = IotaEmbed(rngs)
        self.layers = nnx.List([MaxTextBlock(rngs) for _ in range(LAYERS)])
        self.decoder_norm = RMSNorm(D, rngs=rngs)
        self.logits_dense = DenseGeneral((D,), (V,), offload=True, rngs=rngs)

    def __call__(self, tokens, positions):
        x = self.token_embedder(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.logits_dense(self.decoder_norm(x))


def maxtext_rules(rank):
    r = dict(rank=rank, alpha=ALPHA)
    return [
        lx.LoraRule(r"(query|key|value)/kernel", in_axes=(0,), out_axes=(1, 2), **r),
        lx.LoraRule(r"out/kernel", in_axes=(0, 1), out_axes=(2,), **r),
        lx.LoraRule(r"(wi_0|wi_1|wo)/kernel", **r),
        lx.LoraRule(r"token_embedder/embedding", **r),
        lx.LoraRule(r"logits_dense/kernel", **r),
    ]


# --- DeepSeek MLA (weights absorbed) -------------------------------------------

QR, KVR, DN, DR, DV = 8, 8, 4, 2, 4  # q / kv LoRA ranks; nope, rope, value head dims


class MLA(nnx.Module):
    """DeepSeek-V3's multi-head latent attention as its inference code runs it
    (`attn_impl="absorb"`): `wkv_b (kv_rank, N * (nope + v))` is reshaped per head
    and its key and value parts are absorbed into the query and the output,
    `einsum('bshd,chd->bshc')` and `einsum('bshc,chd->bshd')`, so attention runs
    on the compressed `kv_rank` cache."""

    def __init__(self, rngs):
        self.wq_a = nnx.Linear(D, QR, use_bias=False, rngs=rngs)
        self.q_norm = RMSNorm(QR, rngs=rngs)
        self.wq_b = nnx.Linear(QR, N * (DN + DR), use_bias=False, rngs=rngs)
        self.wkv_a = nnx.Linear(D, KVR + DR, use_bias=False, rngs=rngs)
        self.kv_norm = RMSNorm(KVR, rngs=rngs)
        self.wkv_b = nnx.Linear(KVR, N * (DN + DV), use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(N * DV, D, use_bias=False, rngs=rngs)

    def __call__(self, x, positions):
        b, t, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))).reshape(b, t, N, DN + DR)
        q_nope, q_pe = q[..., :DN], rope(q[..., DN:], positions)
        kv = self.wkv_a(x)
        kv, k_pe = self.kv_norm(kv[..., :KVR]), rope(kv[..., None, KVR:], positions)
        wkv_b = self.wkv_b.kernel[...].reshape(KVR, N, DN + DV)
        q_nope = jnp.einsum("bshd,chd->bshc", q_nope, wkv_b[..., :DN])
        scores = jnp.einsum("bshc,btc->bsht", q_nope, kv)
        scores += jnp.einsum("bshr,btr->bsht", q_pe, k_pe[:, :, 0])
        scores = scores * (DN + DR) ** -0.5
        mask = causal_mask(positions, positions)[:, :, None, :]
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
        out = jnp.einsum("bsht,btc->bshc", probs, kv)
        out = jnp.einsum("bshc,chd->bshd", out, wkv_b[..., DN:])
        return self.wo(out.reshape(b, t, N * DV))


class DeepSeekBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn_norm = RMSNorm(D, rngs=rngs)
        self.attn = MLA(rngs)
        self.ffn_norm = RMSNorm(D, rngs=rngs)
        self.mlp = LlamaMLP(rngs)

    def __call__(self, x, positions):
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.ffn_norm(x))


class DeepSeek(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([DeepSeekBlock(rngs) for _ in range(LAYERS)])
        self.norm = RMSNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens, positions):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.head(self.norm(x))


def deepseek_rules(rank):
    return [
        lx.LoraRule(r"attn/(wq_a|wq_b|wkv_a|wkv_b|wo)/kernel", rank=rank, alpha=ALPHA),
        lx.LoraRule(r"mlp/(gate|up|down)_proj/kernel", rank=rank, alpha=ALPHA),
    ]


# --- flax NNX examples ---------------------------------------------------------


class MLP(nnx.Module):
    """The NNX basics MLP: Linear, BatchNorm, Dropout, GELU, Linear (eval mode)."""

    def __init__(self, rngs):
        self.linear1 = nnx.Linear(D, F, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, deterministic=True)
        self.bn = nnx.BatchNorm(F, use_running_average=True, rngs=rngs)
        self.linear2 = nnx.Linear(F, 8, rngs=rngs)

    def __call__(self, x):
        x = nnx.gelu(self.dropout(self.bn(self.linear1(x))))
        return self.linear2(x)


class CNN(nnx.Module):
    """The NNX MNIST tutorial's CNN, on 8x8 images."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(2 * 2 * 8, 16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


MESH = jax.make_mesh(
    (1,),
    ("model",),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[:1],
)


class DotReluDot(nnx.Module):
    """The flax NNX sharding guide's model: kernels annotated with partition specs
    (`nnx.with_partitioning`, `sharding_names=`)."""

    def __init__(self, rngs):
        init = nnx.with_partitioning(
            nnx.initializers.lecun_normal(), (None, "model"), mesh=MESH
        )
        self.dot1 = nnx.Linear(D, F, kernel_init=init, use_bias=False, rngs=rngs)
        self.w2 = nnx.Param(jnp.zeros((F, D)), out_sharding=("model", None), mesh=MESH)

    def __call__(self, x):
        y = jax.nn.relu(self.dot1(x))
        y = jax.lax.with_sharding_constraint(y, NamedSharding(MESH, PS(None, "model")))
        return jnp.dot(y, self.w2[...])


def sharded_call(model, x):
    """As the guide's `create_sharded_model`, inside the jitted call: the model's
    state constrained to its partition specs, then the forward pass."""
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(lambda spec: NamedSharding(MESH, spec), specs)
    nnx.update(model, jax.lax.with_sharding_constraint(state, shardings))
    return model(x)


def sinusoidal(length, dim):
    pos = np.arange(length)[:, None]
    div = np.exp(np.arange(0, dim, 2) * -(np.log(10_000.0) / dim))
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return pe


class Lm1bBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=N,
            in_features=D,
            use_bias=False,
            broadcast_dropout=False,
            decode=False,
            keep_rngs=False,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp1 = nnx.Linear(D, F, rngs=rngs)
        self.mlp2 = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x, mask=None, decode=False):
        x = x + self.attn(self.ln1(x), mask=mask, decode=decode)
        return x + self.mlp2(nnx.relu(self.mlp1(self.ln2(x))))


class Lm1b(nnx.Module):
    """flax `examples/lm1b_nnx`'s decoder: fixed sinusoidal positions, the
    attention modules' own KV caches, logits via the shared embedding."""

    def __init__(self, rngs):
        self.shared_embedding = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Lm1bBlock(rngs) for _ in range(LAYERS)])
        self.encoderdecoder_norm = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, tokens, positions, decode=False):
        pe = jnp.asarray(sinusoidal(PROMPT + STEPS, D))
        x = self.shared_embedding(tokens) + pe[positions]
        mask = None if decode else nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask, decode)
        logits = self.shared_embedding.attend(self.encoderdecoder_norm(x))
        return logits / jnp.sqrt(x.shape[-1])


def lm1b_init_cache(model, tokens):
    """The lm1b sampler initialises the attention caches before decoding."""
    b, total = tokens.shape
    for block in model.blocks:
        block.attn.init_cache((b, total, D))


def lm1b_decode(model, tokens):
    """One token per step (here teacher-forced), on caches made beforehand."""
    b, total = tokens.shape
    outs = []
    for t in range(total):
        positions = jnp.full((b, 1), t)
        outs.append(model(tokens[:, t : t + 1], positions, decode=True))
    return jnp.concatenate(outs, axis=1)


def mha_rules(rank):
    return [
        lx.LoraRule(
            r"attn/(query|key|value)/kernel",
            rank=rank,
            alpha=ALPHA,
            in_axes=(0,),
            out_axes=(1, 2),
        ),
        lx.LoraRule(
            r"attn/out/kernel", rank=rank, alpha=ALPHA, in_axes=(0, 1), out_axes=(2,)
        ),
        lx.LoraRule(r"mlp(1|2)/kernel", rank=rank, alpha=ALPHA),
        lx.LoraRule(r"shared_embedding/embedding", rank=rank, alpha=ALPHA),
    ]


# --- the families --------------------------------------------------------------


def _tokens(seed, length):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (ROWS, length)))


def _images(seed):
    return jnp.asarray(
        np.random.default_rng(seed).normal(size=(ROWS, 8, 8, 1)), jnp.float32
    )


def _features(seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(ROWS, D)), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: how to build it, LoRA rules (rank -> rules), example inputs
    (a batch of `ROWS`), and what to run (`call(model, inputs)`, every output row
    depending on its own input row only)."""

    name: str
    make: Callable[[nnx.Rngs], nnx.Module]
    rules: Callable[[int], list[lx.LoraRule]]
    inputs: Callable[[], Any]
    call: Callable[[nnx.Module, Any], Any]
    what: str  # a line for the table
    # Run on the model (in place) before each call, outside `lx.quaxify`: caches.
    prepare: Callable[[nnx.Module, Any], None] | None = None

    def build(self) -> nnx.Module:
        return build(self.make)


def _call_plain(m, x):
    return m(x)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama3",
            Llama3,
            llama_rules,
            lambda: _tokens(1, PROMPT + STEPS),
            prefill_and_decode,
            "q/k/v/o nnx.Einsum, GQA, RoPE, SwiGLU, untied head; prefill + 2 cached "
            "decode steps",
        ),
        Family(
            "llama3-scan",
            Llama3Scan,
            partial(llama_rules, stacked=True),
            lambda: _tokens(2, PROMPT),
            forward,
            "the same blocks stacked by nnx.vmap, run by nnx.scan",
        ),
        Family(
            "qwen2",
            Qwen2,
            qwen2_rules,
            lambda: _tokens(3, PROMPT),
            forward,
            "nnx.Linear q/k/v with biases, tied head via Embed.attend",
        ),
        Family(
            "qwen3",
            Qwen3,
            qwen3_rules,
            lambda: _tokens(4, PROMPT),
            forward,
            "Einsum q/k/v/o, q/k norms, tied head x @ E.T",
        ),
        Family(
            "qwen3-moe",
            partial(Qwen3, moe=True),
            partial(qwen3_rules, moe=True),
            lambda: _tokens(5, PROMPT),
            forward,
            "Qwen 3 attention, experts (E, D, F) run densely: einsum BTD,EDF->BTEF",
        ),
        Family(
            "gemma2",
            partial(Gemma, version=2),
            partial(gemma_rules, version=2, fused="parts"),
            lambda: _tokens(6, PROMPT),
            forward,
            "qkv_einsum (3,N,D,H) and gating_einsum (2,D,F), one LoRA per part "
            "(stack axis 0); soft-caps, sliding window, post-norms, tied x @ E.T",
        ),
        Family(
            "gemma2-whole",
            partial(Gemma, version=2),
            partial(gemma_rules, version=2, fused="whole"),
            lambda: _tokens(6, PROMPT),
            forward,
            "gemma2 with one LoRA over each whole fused kernel (part axis an out-axis)",
        ),
        Family(
            "gemma3",
            partial(Gemma, version=3),
            partial(gemma_rules, version=3, fused="parts"),
            lambda: _tokens(7, PROMPT),
            forward,
            "q_einsum + kv_einsum (2,K,D,H), FFN ...F,NHF->...NH, q/k norms, "
            "one LoRA per part",
        ),
        Family(
            "gemma3-whole",
            partial(Gemma, version=3),
            partial(gemma_rules, version=3, fused="whole"),
            lambda: _tokens(7, PROMPT),
            forward,
            "gemma3 with one LoRA over each whole fused kernel",
        ),
        Family(
            "gemma4",
            Gemma4,
            gemma4_rules,
            lambda: _tokens(8, PROMPT),
            forward,
            "per-layer table (V,L,P) by token, w * D**-0.5, layers in a "
            "lax.while_loop with NumPy weight scales",
        ),
        *[
            Family(
                f"moe-{style}",
                partial(MoELM, style=style),
                moe_rules,
                partial(_tokens, 9, PROMPT),
                _call_plain,
                what,
            )
            for style, what in [
                ("gather", "experts gathered per token: w[idx] (B,T,k,D,F)"),
                ("take", "experts gathered per token: jnp.take(w, idx, axis=0)"),
                ("onehot", "experts selected by einsum BTKE,EDF->BTKDF"),
                ("gshard", "dispatch/combine einsums, EBCD,EDF->EBCF (E a batch axis)"),
                ("ragged", "tokens sorted by expert, lax.ragged_dot"),
            ]
        ],
        Family(
            "maxtext",
            MaxText,
            maxtext_rules,
            lambda: _tokens(13, PROMPT),
            forward,
            "DenseGeneral (lax.dot_general), iota one-hot embedding, logits_dense "
            "head moved from host memory by jax.device_put",
        ),
        Family(
            "deepseek-mla",
            DeepSeek,
            deepseek_rules,
            lambda: _tokens(14, PROMPT),
            forward,
            "MLA with wkv_b absorbed: reshape, slice, einsum bshd,chd->bshc and "
            "bshc,chd->bshd",
        ),
        Family(
            "nnx-mlp",
            MLP,
            lambda r: [lx.LoraRule(r"linear(1|2)/kernel", rank=r, alpha=ALPHA)],
            partial(_features, 10),
            _call_plain,
            "nnx.Linear, nnx.BatchNorm, nnx.Dropout (eval)",
        ),
        Family(
            "nnx-cnn",
            CNN,
            lambda r: [
                lx.LoraRule(
                    r"conv(1|2)/kernel",
                    rank=r,
                    alpha=ALPHA,
                    in_axes=(0, 1, 2),
                    out_axes=(3,),
                ),
                lx.LoraRule(r"linear(1|2)/kernel", rank=r, alpha=ALPHA),
            ],
            partial(_images, 11),
            _call_plain,
            "nnx.Conv (kernel (3,3,in,out): in (0,1,2), out (3,)), avg_pool, Linear",
        ),
        Family(
            "nnx-sharded",
            DotReluDot,
            lambda r: [lx.LoraRule(r"(dot1/kernel|w2)", rank=r, alpha=ALPHA)],
            partial(_features, 15),
            sharded_call,
            "the NNX sharding guide's DotReluDot; the call constrains the state to "
            "its partition specs (jax.lax.with_sharding_constraint)",
        ),
        Family(
            "nnx-lm1b",
            Lm1b,
            mha_rules,
            lambda: _tokens(12, 3),
            lm1b_decode,
            "nnx.MultiHeadAttention decode=True (its own cache, made beforehand), "
            "Embed.attend head; 3 cached decode steps",
            prepare=lm1b_init_cache,
        ),
        Family(
            "nnx-lm1b-cache-inside",
            Lm1b,
            mha_rules,
            lambda: _tokens(12, 3),
            lambda m, t: (lm1b_init_cache(m, t), lm1b_decode(m, t))[1],
            "nnx-lm1b with the caches made inside the quaxified call",
        ),
    ]
}


# --- serving and the reference -------------------------------------------------


def random_adapter(model, rules, seed: int) -> lx.Adapter:
    """An adapter for `rules` (as `lx.init_adapter` lays it out, from its shapes
    only: no JAX compilation) with random non-zero A and B drawn by NumPy."""
    template = eqx.filter_eval_shape(
        lx.init_adapter, model, rules, key=jax.random.PRNGKey(seed)
    )
    rng = np.random.default_rng(seed + 100)
    weights = {
        path: (
            jnp.asarray(nonzero(rng, a.shape, 0.1, 0.3)),
            jnp.asarray(nonzero(rng, b.shape, 0.1, 0.3)),
        )
        for path, (a, b) in template.weights.items()
    }
    return dataclasses.replace(template, weights=weights)


def keep_paths(adapter: lx.Adapter, paths) -> lx.Adapter:
    """`adapter` restricted to `paths` (in its own order)."""
    keep = [j for j, lay in enumerate(adapter.layouts) if lay.path in set(paths)]
    pick = lambda xs: tuple(xs[j] for j in keep)  # noqa: E731
    return lx.Adapter(
        weights={
            adapter.layouts[j].path: adapter.weights[adapter.layouts[j].path]
            for j in keep
        },
        layouts=pick(adapter.layouts),
        ranks=pick(adapter.ranks),
        alphas=pick(adapter.alphas),
        use_rslora=pick(adapter.use_rslora),
    )


def adapters_for(family: Family, model=None, paths=None) -> list[lx.Adapter]:
    """Two random adapters of ranks `RANKS` for the family's rules (only `paths`,
    if given)."""
    model = family.build() if model is None else model
    out = [random_adapter(model, family.rules(r), seed) for seed, r in enumerate(RANKS)]
    return out if paths is None else [keep_paths(a, paths) for a in out]


def serve(model, adapters, idx=IDX):
    stack = lx.stack_adapters(adapters)
    return lx.loraify(model, stack, jnp.asarray(idx)), stack


def reference(family: Family, model, stack: lx.AdapterStack, idx=IDX, inputs=None):
    """Each row alone through `model` with its adapter merged in float64 NumPy
    (`einsum_merge`, not `lx.merge`), or the base model for index -1; and each row
    through the base model (to check that the adapters matter). One jitted
    plain-NNX call, compiled once for all rows (the models differ only in
    values). Returns `(reference, base)`, both `(ROWS, ...)`."""
    inputs = family.inputs() if inputs is None else inputs
    run = jax.jit(family.call)
    models = {-1: model}
    want, base = [], []
    for e, i in enumerate(np.asarray(idx)):
        i = int(i)
        if i not in models:
            models[i] = einsum_merge(model, stack[i], xp=np)
        row = jax.tree.map(lambda x, e=e: x[e : e + 1], inputs)
        for m, out in ((models[i], want), (model, base)):
            if family.prepare is not None:  # a fresh cache, in a copy
                m = nnx.clone(m)
                family.prepare(m, row)
            out.append(np.asarray(run(m, row))[0])
    return np.stack(want), np.stack(base)


def base_output(family: Family, model, inputs=None):
    """The whole batch through the base model (plain NNX, jitted)."""
    inputs = family.inputs() if inputs is None else inputs
    model = nnx.clone(model)
    if family.prepare is not None:
        family.prepare(model, inputs)
    return np.asarray(jax.jit(family.call)(model, inputs))


def served_call(family: Family):
    """`jax.jit(lx.quaxify(call))`, the way to run a served family (after
    `family.prepare`, which `run_served` does)."""
    return jax.jit(lx.quaxify(family.call))


def run_served(family: Family, served, inputs=None, run=None):
    """`family.prepare`, then the served call (`served_call` unless `run`)."""
    inputs = family.inputs() if inputs is None else inputs
    if family.prepare is not None:
        family.prepare(served, inputs)
    return (served_call(family) if run is None else run)(served, inputs)
