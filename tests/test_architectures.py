"""Real architectures, built from unmodified third-party layers, serving a batch
that mixes adapters of different ranks with base-only rows.

- Equinox: a pre-norm transformer LM from `eqx.nn.Embedding`,
  `eqx.nn.MultiheadAttention` (causal), `eqx.nn.MLP`, `eqx.nn.LayerNorm` and an
  `eqx.nn.Linear` head; blocks in a Python list, or built with `eqx.filter_vmap`
  and run by `lax.scan`. Both Equinox batching styles.
- Flax linen: a decoder-only transformer: `nn.Embed`, blocks stacked with `nn.scan`
  (optionally `nn.remat`), q/k/v `nn.DenseGeneral(features=(heads, head_dim))`,
  output `nn.DenseGeneral(axis=(-2, -1))`, causal `nn.dot_product_attention`, an
  MLP of `nn.Einsum` (up) and `nn.Dense` (down), `nn.LayerNorm`, a vocab head
  (`nn.Dense`, or tied to the embedding via `nn.Embed.attend`).

Every batched result is compared with each row run ALONE through the plain model
with that row's adapter merged in (`einsum_merge(base, stack[i])` from
model_helpers, not `lx.merge`; the base model for `-1`). Tolerance: float32
`rtol = atol = 2e-5` (F32_TOL; the observed difference is ~2e-6 on logits of size
O(1)); `assert_adapters_matter` checks that every adapted row moves by more than 10x
the tolerance and base rows do not move.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax import lax

import lorax_arrays as lx
from tests.fast_init import numpy_init, random_adapters
from tests.model_helpers import (
    F32_TOL,
    assert_adapters_matter,
    assert_close,
    per_row_reference,
    vmap_styles,
)

V, D, H, F, L, T, B = 32, 16, 2, 32, 2, 5, 6  # vocab, width, heads, mlp, layers
HD = D // H
# Three adapters (ranks 2, 4, 8), each used, two used twice, and two base rows.
IDX = np.array([0, 1, -1, 2, 1, -1], np.int32)
NAMES = ["chat", "sql", "poems"]


def _tokens(seed):
    return jr.randint(jr.key(seed), (B, T), 0, V)


# -- (a) Equinox ----------------------------------------------------------------------


class EqxBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.ln1 = eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(H, D, use_output_bias=True, key=k1)
        self.ln2 = eqx.nn.LayerNorm(D)
        self.mlp = eqx.nn.MLP(D, D, F, depth=1, activation=jax.nn.gelu, key=k2)

    def __call__(self, h):  # h: (T, D), one example
        x = jax.vmap(self.ln1)(h)
        causal = jnp.tril(jnp.ones((h.shape[0], h.shape[0]), bool))
        h = h + self.attn(x, x, x, mask=causal)
        return h + jax.vmap(self.mlp)(jax.vmap(self.ln2)(h))


class EqxLM(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list | EqxBlock  # a list, or one EqxBlock whose arrays are stacked
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    scanned: bool = eqx.field(static=True)

    def __init__(self, key, scanned):
        k_e, k_h, k_b = jr.split(key, 3)
        self.embed = eqx.nn.Embedding(V, D, key=k_e)
        keys = jr.split(k_b, L)
        if scanned:
            self.blocks = eqx.filter_vmap(EqxBlock)(keys)
        else:
            self.blocks = [EqxBlock(k) for k in keys]
        self.ln = eqx.nn.LayerNorm(D)
        self.head = eqx.nn.Linear(D, V, key=k_h)
        self.scanned = scanned

    def __call__(self, tokens):  # tokens: (T,), one example
        h = jax.vmap(self.embed)(tokens)
        if self.scanned:
            dynamic, static = eqx.partition(self.blocks, eqx.is_array)

            def step(h, d):
                return eqx.combine(d, static)(h), None

            h = lax.scan(step, h, dynamic)[0]
        else:
            for block in self.blocks:
                h = block(h)
        return jax.vmap(self.head)(jax.vmap(self.ln)(h))


def _eqx_rule_sets(embedding: bool):
    attn = "attn/{}_proj/weight"
    sets = [
        [
            lx.LoraRule(attn.format("(query|value)"), 2, alpha=4.0),
            lx.LoraRule("head/weight", 2),
        ],
        [
            lx.LoraRule(attn.format("(query|key|value|output)"), 4),
            lx.LoraRule(r"mlp/layers/\d/weight", 4, alpha=2.0),
        ],
        [
            lx.LoraRule(r"mlp/layers/\d/weight", 8, alpha=16.0, use_rslora=True),
            lx.LoraRule(attn.format("output"), 8),
        ],
    ]
    if embedding:
        # The table (V, D): a token id is what contracts with the vocabulary axis.
        sets[0].append(lx.LoraRule("embed/weight", 2, in_axes=0, out_axes=1))
        sets[2].append(lx.LoraRule("embed/weight", 8, in_axes=0, out_axes=1))
    return sets


def _call(model, tokens):
    return model(tokens)


_eqx_one = eqx.filter_jit(_call)


_eqx_quaxify_outside_vmap, _eqx_quaxify_inside_vmap = vmap_styles(_call)


@pytest.mark.parametrize(
    "scanned, embedding",
    [(False, False), (True, True)],
    ids=["block-list", "scanned-blocks+adapted-embedding"],
)
def test_equinox_transformer(scanned, embedding):
    model = numpy_init(eqx.filter_eval_shape(EqxLM, jr.key(0), scanned), seed=1)
    rule_sets = _eqx_rule_sets(embedding)
    stack = lx.stack_adapters(random_adapters(model, rule_sets, seed=10), names=NAMES)
    paths = set(stack.paths)
    n_mlp = 2 if scanned else 2 * L  # a stacked weight is one leaf for all layers
    assert sum("mlp" in p for p in paths) == n_mlp
    assert ("embed/weight" in paths) == embedding
    if scanned:
        lay = {x.path: x for x in stack.layouts}["blocks/attn/query_proj/weight"]
        assert (lay.shape, lay.stack_axes, lay.in_axes) == ((L, D, D), (0,), (2,))
    query = [p for p in stack.paths if "query_proj" in p][0]
    assert stack.ranks[stack.paths.index(query)] == (2, 4, 0)

    tokens = _tokens(1)
    ref = per_row_reference(model, stack, IDX, _eqx_one, tokens)
    base_out = per_row_reference(model, stack, -np.ones_like(IDX), _eqx_one, tokens)
    assert_adapters_matter(ref, base_out, IDX, atol=F32_TOL["atol"])
    out = _eqx_quaxify_outside_vmap(lx.loraify(model, stack, IDX), tokens)
    assert out.shape == (B, T, V)
    assert_close(out, ref, **F32_TOL)
    out = _eqx_quaxify_inside_vmap(lx.loraify(model, stack), tokens, jnp.asarray(IDX))
    assert_close(out, ref, **F32_TOL)


# -- (b) Flax linen decoder-only transformer -----------------------------------------


class DecoderBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):  # h: (batch, seq, D)
        x = nn.LayerNorm(name="ln1")(h)
        q = nn.DenseGeneral((H, HD), name="query")(x)  # kernel (D, H, HD)
        k = nn.DenseGeneral((H, HD), name="key")(x)
        v = nn.DenseGeneral((H, HD), name="value")(x)
        causal = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
        a = nn.dot_product_attention(q, k, v, mask=causal)
        h = h + nn.DenseGeneral(D, axis=(-2, -1), name="out")(a)  # (H, HD, D)
        x = nn.LayerNorm(name="ln2")(h)
        u = nn.Einsum((D, F), "btd,df->btf", name="up")(x)  # kernel (D, F)
        return h + nn.Dense(D, name="down")(jax.nn.gelu(u)), None


class Decoder(nn.Module):
    remat: bool = False
    tied: bool = False

    @nn.compact
    def __call__(self, tokens):  # tokens: (batch, seq) int
        embed = nn.Embed(V, D, name="embed")
        h = embed(tokens)
        block = nn.remat(DecoderBlock) if self.remat else DecoderBlock
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=L,
        )
        h = blocks(name="blocks")(h, None)[0]
        h = nn.LayerNorm(name="ln_f")(h)
        return embed.attend(h) if self.tied else nn.Dense(V, name="lm_head")(h)


def _flax_rules(rank, which, **kw):
    """Rules for the scanned decoder: every block kernel has the layer axis first."""
    s = dict(stack_axes=(0,))
    rules = {
        "qkv": lx.LoraRule(
            "blocks/(query|key|value)/kernel",
            rank,
            in_axes=1,
            out_axes=(2, 3),
            **s,
            **kw,
        ),
        "qv": lx.LoraRule(
            "blocks/(query|value)/kernel", rank, in_axes=1, out_axes=(2, 3), **s, **kw
        ),
        "out": lx.LoraRule("blocks/out/kernel", rank, in_axes=(1, 2), **s, **kw),
        "mlp": lx.LoraRule("blocks/(up|down)/kernel", rank, **s, **kw),
        "head": lx.LoraRule("lm_head/kernel", rank, **kw),
        "embedding": lx.LoraRule("embedding", rank, in_axes=0, out_axes=1, **kw),
    }
    return [rules[w] for w in which]


def _flax_rule_sets(embedding: bool, head: bool = True):
    extra = ("embedding",) if embedding else ()
    return [
        _flax_rules(2, ("qv", *(("head",) if head else ()), *extra), alpha=4.0),
        _flax_rules(4, ("qkv", "out", "mlp")),
        _flax_rules(8, ("out", "mlp", *extra), alpha=16.0, use_rslora=True),
    ]


_flax_cache: dict = {}


def _flax_setup(remat=False, tied=False, embedding=False):
    key = (remat, tied, embedding)
    if key not in _flax_cache:
        model = Decoder(remat=remat, tied=tied)
        tokens = jnp.zeros((1, T), jnp.int32)
        params = numpy_init(jax.eval_shape(model.init, jr.key(0), tokens), seed=2)
        rule_sets = _flax_rule_sets(embedding, head=not tied)
        adapters = random_adapters(params, rule_sets, seed=20)
        stack = lx.stack_adapters(adapters, names=NAMES)
        one = jax.jit(lambda p, t: model.apply(p, t[None])[0])
        _flax_cache[key] = model, params, stack, one
    return _flax_cache[key]


def test_flax_decoder_layouts():
    _, params, stack, _ = _flax_setup(tied=True, embedding=True)
    got = {m.path: m.layout for m in lx.match_rules(params, _flax_rule_sets(True)[1])}
    assert got["params/blocks/query/kernel"].shape == (L, D, H, HD)
    assert got["params/blocks/out/kernel"].out_axes == (3,)
    assert got["params/blocks/up/kernel"].in_axes == (1,)  # the nn.Einsum kernel
    assert got["params/blocks/down/kernel"].out_axes == (2,)
    for lay in got.values():
        assert lay.stack_axes == (0,)
    layouts = {lay.path: lay for lay in stack.layouts}
    assert layouts["params/embed/embedding"].stack_axes == ()
    assert stack.ranks[stack.paths.index("params/blocks/key/kernel")] == (0, 4, 0)


def _check_flax(model, params, stack, one, idx, tokens):
    ref = per_row_reference(params, stack, idx, one, tokens)
    base_out = per_row_reference(params, stack, -np.ones_like(idx), one, tokens)
    assert_adapters_matter(ref, base_out, idx, atol=F32_TOL["atol"])
    served = lx.loraify(params, stack, idx)
    out = jax.jit(lx.quaxify(model.apply))(served, tokens)
    assert out.shape == (B, T, V)
    assert_close(out, ref, **F32_TOL)
    return served, out


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan-remat"])
def test_flax_decoder(remat):
    model, params, stack, one = _flax_setup(remat=remat)
    idx = stack.indices(["chat", "sql", None, "poems", "sql", None])
    assert np.array_equal(idx, IDX)
    served, out = _check_flax(model, params, stack, one, IDX, _tokens(2))
    if not remat:
        # Per-token indices, constant along each row: the same as per example.
        per_token = jnp.repeat(jnp.asarray(IDX)[:, None], T, axis=1)
        forward = jax.jit(lx.quaxify(model.apply))
        out_tok = forward(lx.with_indices(served, per_token), _tokens(2))
        assert_close(out_tok, out, **F32_TOL)


def test_flax_decoder_adapted_tied_embedding():
    # The embedding table is adapted too (a gather of A's rows), and the head is
    # tied: `embed.attend(h)` contracts the same adapted table over its out axis.
    model, params, stack, one = _flax_setup(tied=True, embedding=True)
    assert "params/embed/embedding" in stack.paths
    assert "params/lm_head/kernel" not in params["params"]
    _check_flax(model, params, stack, one, IDX, _tokens(3))
