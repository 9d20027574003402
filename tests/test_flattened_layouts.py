"""Per-token indices on models that flatten `(B, T, D)` to `(B*T, D)` for some layers.

OPT's decoder in `transformers` runs attention on `(B, T, D)` and its MLP on
`hidden.reshape(B*T, D)`. `(B, T)` indices must serve both: the activation's leading
free axes may be any row-major regrouping of the indices' axes. Every case is
compared with a float64 NumPy reference that builds each token's own dense weight
`W + s·A_i B_i` (token `(b, t)` is row `b*T + t` of a flattened activation) and runs
the same block in NumPy.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from lorax_arrays._core.indices import regroup
from tests.fast_init import random_adapters
from tests.helpers import random_lora

D, F, V = 6, 10, 13
LAYERS = ("embed", "q", "k", "v", "o", "fc1", "fc2")
OPT = frozenset({"fc1", "fc2"})  # what OPT flattens


def _params(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    shapes = {"embed": (V, D), "q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D)}
    shapes |= {"fc1": (D, F), "fc2": (F, D)}
    return {
        k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
        for k, s in shapes.items()
    }


PARAMS = _params()
# Three adapters of mixed ranks; the third adapts only some leaves.
RULE_SETS = [
    [lx.LoraRule(".", 2)],
    [lx.LoraRule(".", 3, alpha=6.0)],
    [lx.LoraRule("q|v|fc1|embed", 1, alpha=2.0)],
]
STACK = lx.stack_adapters(random_adapters(PARAMS, RULE_SETS, seed=1, std=0.5))


def block(p, tokens, flat, xp=jnp, mm=None):
    """An OPT-like decoder block. Each layer in `flat` sees its input flattened to
    `(B*T, ...)` (the embedding: flattened token ids), the others `(B, T, ...)`.
    `mm(name, h)` is the product with (or lookup in) weight `name`; by default
    `h @ p[name]` (`p[name][h]` for the embedding)."""
    b, t = tokens.shape

    def apply(name, h):
        if mm is not None:
            return mm(name, h)
        return p[name][h] if name == "embed" else h @ p[name]

    def layer(name, h):
        if name not in flat:
            return apply(name, h)
        lead = (b * t,) if name == "embed" else (b * t, h.shape[-1])
        return apply(name, h.reshape(lead)).reshape(b, t, -1)

    x = layer("embed", tokens)
    q, k, v = layer("q", x), layer("k", x), layer("v", x)
    logits = xp.einsum("btd,bsd->bts", q, k) / np.sqrt(D)
    att = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    att = att / att.sum(axis=-1, keepdims=True)
    h = x + layer("o", xp.einsum("bts,bsd->btd", att, v))
    m = layer("fc1", h)
    return h + layer("fc2", m * (m > 0))


def reference(tokens, idx):
    """`block` in float64 NumPy with each token's own merged weight."""
    tokens, idx = np.asarray(tokens), np.asarray(idx)
    b, t = tokens.shape
    per_token = {}
    for name, w in PARAMS.items():
        w = np.asarray(w, np.float64)
        a, bb = (np.asarray(f, np.float64) for f in STACK.weights[name])
        s = np.asarray(STACK.scales[name], np.float64)
        safe = np.clip(idx, 0, None)
        delta = np.einsum("btir,btro->btio", a[safe], bb[safe])
        scale = np.where(idx >= 0, s[safe], 0.0)[..., None, None]
        per_token[name] = w + scale * delta  # (B, T, in, out)

    def mm(name, h):  # the reference never flattens: `h` is (B, T, ...)
        w_tok = per_token[name]
        if name == "embed":
            bi, ti = np.meshgrid(np.arange(b), np.arange(t), indexing="ij")
            return w_tok[bi, ti, h]
        return np.einsum("bti,btio->bto", h, w_tok)

    return block(None, tokens, frozenset(), xp=np, mm=mm)


def _served(idx):
    return lx.loraify(PARAMS, STACK, idx)


def _run(tree, tokens, flat):
    return jax.jit(lx.quaxify(lambda p, tok: block(p, tok, flat)))(tree, tokens)


def _tokens(rng, b, t):
    return jnp.asarray(rng.integers(0, V, size=(b, t)), jnp.int32)


def _check(out, tokens, idx):
    ref = reference(tokens, idx)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4)
    base = reference(tokens, np.full(np.shape(idx), -1))
    assert np.abs(ref - base).max() > 1e-2  # the adapters matter


IDX_BT = np.array([[0, 1, -1, 2], [2, -1, -1, 0], [1, 1, 0, 2]], np.int32)


def test_regroup_rule():
    assert regroup((3, 4), (3, 4, 5)) == 2
    assert regroup((3, 4), (12, 5)) == 1
    assert regroup((12,), (3, 4, 5)) == 2
    assert regroup((3, 4), (12, 1, 5)) == 1
    assert regroup((3,), (3, 4, 5)) == 1
    assert regroup((), (3, 5)) == 0
    assert regroup((3,), (12, 5)) is None  # per sequence against B*T rows
    assert regroup((2, 3), (3, 2, 5)) is None  # a transpose, not a regrouping
    assert regroup((2, 3, 4), (6, 4, 5)) == 2  # merge the first two
    assert regroup((2, 3, 4), (2, 12, 5)) == 2  # merge the last two
    assert regroup((6, 4), (2, 12, 5)) is None


@pytest.mark.parametrize(
    "flat", [frozenset(), OPT, frozenset(LAYERS)], ids=["none", "opt", "all"]
)
def test_per_token_indices_serve_flattened_layers(flat):
    tokens = _tokens(np.random.default_rng(0), *IDX_BT.shape)
    _check(_run(_served(IDX_BT), tokens, flat), tokens, IDX_BT)


def test_flat_per_token_indices_serve_unflattened_layers():
    # `(B*T,)` indices are split row-major onto a `(B, T, D)` activation.
    tokens = _tokens(np.random.default_rng(1), *IDX_BT.shape)
    out = _run(_served(IDX_BT.reshape(-1)), tokens, OPT)
    _check(out, tokens, IDX_BT)


def test_per_sequence_indices_on_a_flattened_mlp_suggest_a_fix_that_works():
    b, t = 3, 4
    indices = jnp.array([2, -1, 0], jnp.int32)
    tokens = _tokens(np.random.default_rng(2), b, t)
    tree = _served(indices)
    with pytest.raises(lx.IndicesShapeError) as info:
        _run(tree, tokens, OPT)
    msg = str(info.value)
    assert "(3,)" in msg and f"({b * t}, {D})" in msg and "per-token" in msg
    assert "jnp.repeat(indices, 4)`, which" in msg  # the flat repeat is warned off
    (fix,) = re.findall(r"`(lx\.with_indices\(tree, [^`]*\))`", msg)
    assert fix == "lx.with_indices(tree, jnp.broadcast_to(indices[:, None], (3, 4)))"
    fixed = eval(fix, {"lx": lx, "jnp": jnp, "tree": tree, "indices": indices})
    per_token = np.repeat(np.asarray(indices)[:, None], t, axis=1)
    _check(_run(fixed, tokens, OPT), tokens, per_token)
    # The fix is right for the unflattened layers too (attention, the embedding).
    _check(_run(fixed, tokens, frozenset()), tokens, per_token)


def test_the_flat_repeat_is_refused_where_it_would_be_ambiguous():
    # `(B*T,)` indices on a `(B, T, D)` activation are fine (row-major), but on a
    # `(T, B, D)` one (a time-major model) they would be a transpose: refused.
    lora = lx.loraify(PARAMS, STACK, IDX_BT)["q"]
    x = jnp.ones((4, 3, D))
    with pytest.raises(lx.IndicesShapeError, match="regrouping"):
        lx.quaxify(lambda w, x: x @ w)(lora, x)


def test_flattened_token_ids_with_per_token_indices():
    # `E[tokens.reshape(-1)]` with `(B, T)` indices equals `E[tokens]` flattened.
    tokens = _tokens(np.random.default_rng(3), *IDX_BT.shape)
    table = lx.loraify(PARAMS, STACK, IDX_BT)["embed"]
    look = jax.jit(lx.quaxify(lambda e, t: e[t]))
    flat = look(table, tokens.reshape(-1))
    np.testing.assert_allclose(
        np.asarray(flat).reshape(*tokens.shape, D), np.asarray(look(table, tokens))
    )
    per_seq = lx.loraify(PARAMS, STACK, jnp.array([0, 1, 2]))["embed"]
    with pytest.raises(lx.IndicesShapeError, match="broadcast_to"):
        look(per_seq, tokens.reshape(-1))


@settings(max_examples=12)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 4),
    flat=st.sets(st.sampled_from(LAYERS)).map(frozenset),
    seed=st.integers(0, 2**16),
    flat_indices=st.booleans(),
)
def test_flatten_anywhere(b, t, flat, seed, flat_indices):
    """Any (B, T), any set of flattened layers, `(B, T)` or `(B*T,)` indices."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(-1, STACK.n_adapters, size=(b, t)).astype(np.int32)
    idx.flat[0] = -1  # a base-only token in every batch
    tokens = _tokens(rng, b, t)
    served = _served(idx.reshape(-1) if flat_indices else idx)
    out = _run(served, tokens, flat)
    np.testing.assert_allclose(
        np.asarray(out), reference(tokens, idx), rtol=2e-4, atol=2e-4
    )


def test_materialised_products_regroup_the_indices_too():
    # A contraction with no low-rank form (over part of the in-group), opted in to
    # dense per-example weights: flattening the activation changes nothing.
    rng = np.random.default_rng(4)
    w, a, b, s = random_lora(rng, (4, 3, 2), (0, 1), (2,), n_adapters=3, rank=2)
    lora = lx.BatchedLoraArray(
        jnp.asarray(w),
        a,
        b,
        scale=s,
        indices=IDX_BT[:, :3],
        in_axes=(0, 1),
        out_axes=(2,),
        allow_materialise=True,
    )

    def f(w, x):  # contracts axis 0 of W only
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))

    x = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)
    by_token = lx.quaxify(f)(lora, x)
    flat = lx.quaxify(f)(lora, x.reshape(9, 4))
    np.testing.assert_allclose(np.asarray(flat), np.asarray(by_token).reshape(9, 3, 2))
    base = np.einsum("bti,ijk->btjk", np.asarray(x), w)
    assert np.abs(np.asarray(by_token) - base).max() > 1e-2
