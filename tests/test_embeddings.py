"""Adapted embedding tables: row lookups (`gather` / `dynamic_slice`) and tied output
heads (contractions over the table's out axis) keep the low-rank form.

The table is `(V, D)` with `in_axes=0` (the vocabulary: what a one-hot token
contracts with) and `out_axes=1`. Every case is compared with each example (or
token) run alone through the plain function with its merged weight `W_e`
(tests/dense_reference.py), forward and gradients w.r.t. `a` and `b`, after
checking that the adapters change the result by far more than the tolerance. Index
patterns hold base-only rows (-1) and repeated adapters; token ids repeat and include
the first and last rows.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lorax_arrays as lx
from tests.dense_reference import (
    TOL,
    Adapted,
    Checker,
    check_against_reference,
    vmap_outside,
)
from tests.fast_init import random_adapters
from tests.helpers import largest_intermediate
from tests.model_helpers import (
    assert_adapters_matter,
    assert_close,
    per_row_reference,
)

V, D, B, T = 40, 8, 4, 3
IDX_B = np.array([2, 0, -1, 2], np.int32)
IDX_BT = np.array([[0, 1, -1], [2, 2, 0], [-1, -1, 1], [1, 0, 2]], np.int32)
INDICES = pytest.mark.parametrize(
    "idx", [IDX_B, IDX_BT], ids=["per-example", "per-token"]
)

_rng = np.random.default_rng(0)
EMB = Adapted.random(_rng, (V, D), (0,), (1,))
TOKENS = jnp.asarray([[0, 5, 5], [V - 1, 7, 0], [3, 3, 3], [12, V - 1, 21]], jnp.int32)
H = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)


def test_dense_reference_agrees():
    for idx in (IDX_BT,):
        dense = EMB.dense_jax(idx, jnp.asarray(EMB.a), jnp.asarray(EMB.b))
        np.testing.assert_allclose(dense, EMB.dense_np(idx), rtol=1e-5, atol=1e-6)


# -- lookups on the raw table -------------------------------------------------------


def _getitem(p, tok):
    return p["emb"][tok]


def _take(p, tok):
    return jnp.take(p["emb"], tok, axis=0)


def _negative_ids(p, tok):
    # NumPy semantics: -1 is the last row (jnp normalises before the gather).
    return p["emb"][tok - V]


@pytest.mark.parametrize(
    "f, idx",
    [(_getitem, IDX_BT), (_take, IDX_B), (_negative_ids, IDX_B)],
    ids=["E[t] per-token", "take per-example", "E[t - V]"],
)
def test_lookup(f, idx):
    check_against_reference(f, {"emb": EMB}, TOKENS, idx)


def test_lookup_along_the_out_axis():
    # A table stored (D, V) with the vocabulary as its in axis is looked up along
    # axis 1 (`E[:, tok]`); a (V, D) table looked up along its out axis (a column
    # per id) takes the swapped view.
    emb_t = Adapted.random(np.random.default_rng(1), (D, V), (1,), (0,))

    def by_column(p, tok):
        return jnp.moveaxis(p["emb"][:, tok], 0, -1)

    check_against_reference(by_column, {"emb": emb_t}, TOKENS, IDX_B)
    check_against_reference(by_column, {"emb": EMB}, TOKENS % D, IDX_B)


def test_lookup_of_transposed_table():
    # `E.T[:, tok]`: the transpose rule renumbers the axes, the lookup follows.
    def f(p, tok):
        return jnp.moveaxis(p["emb"].T[:, tok], 0, -1)

    check_against_reference(f, {"emb": EMB}, TOKENS, IDX_BT)


def _static_rows(p, h):
    # Python-int lookups are a slice and a squeeze, not a gather; the Equinox
    # Embedding called with a Python int is the same.
    return h * p["emb"][3] + h * _eqx(p)(V - 1) + p["emb"][:, 2][:D]


@INDICES
def test_static_lookup_with_scalar_indices(idx):
    h = H[:, 0] if idx.ndim == 1 else H
    check_against_reference(_static_rows, {"emb": EMB}, h, idx, transform=vmap_outside)


def test_static_lookup_with_per_example_indices_is_an_error():
    with pytest.raises(lx.UnsupportedOperationError, match="with_indices"):
        lx.quaxify(_static_rows)({"emb": EMB.lora(IDX_B)}, H[:, 0])


# -- tied output heads --------------------------------------------------------------


def _head_matmul(p, h):
    return h @ p["emb"].T


def _head_einsum(p, h):
    return jnp.einsum("btd,vd->btv", h, p["emb"])


@pytest.mark.parametrize(
    "f, idx",
    [(_head_matmul, IDX_B), (_head_einsum, IDX_BT)],
    ids=["h @ E.T per-example", "einsum per-token"],
)
def test_tied_head(f, idx):
    check_against_reference(f, {"emb": EMB}, H, idx)


def _tied_model(p, tok):
    """Embed, a nonlinearity, and the tied head: one table, both ways round."""
    return jnp.tanh(p["emb"][tok]) @ p["emb"].T


@INDICES
def test_embedding_and_tied_head_model(idx):
    check_against_reference(_tied_model, {"emb": EMB}, TOKENS, idx)


@INDICES
def test_no_dense_table_per_example(idx):
    # Nothing in the forward or backward pass is as large as one table per example.
    def loss(a, b):
        return lx.quaxify(_tied_model)({"emb": EMB.lora(idx, a, b)}, TOKENS).sum()

    a, b = jnp.asarray(EMB.a), jnp.asarray(EMB.b)
    for fn in (loss, jax.grad(loss, argnums=(0, 1))):
        jaxpr = jax.make_jaxpr(fn)(a, b)
        assert largest_intermediate(jaxpr) < B * V * D


# -- eqx.nn.Embedding ---------------------------------------------------------------

_EQX = eqx.nn.Embedding(V, D, key=jr.key(0))


def _eqx(p):
    """The Equinox Embedding with its weight swapped for `p["emb"]`."""
    return eqx.tree_at(lambda m: m.weight, _EQX, p["emb"])


def _eqx_nested_vmaps(p, tok):
    return jax.vmap(jax.vmap(_eqx(p)))(tok)


def _vmap_outside_per_example(f):
    # Each example's scalar index is set (outside quaxify) inside the vmap.
    del f

    def run(p, tok):
        def one(t, i):
            m = lx.with_indices(_eqx(p), i)
            return lx.quaxify(lambda m, t: jax.vmap(m)(t))(m, t)

        return jax.vmap(one)(tok, p["emb"].indices)

    return run


def _vmap_outside_per_token(f):
    # Down to one scalar token with one scalar index: `dynamic_slice` on the table.
    del f

    def run(p, tok):
        def one(t, i):
            return lx.quaxify(lambda m, t: m(t))(lx.with_indices(_eqx(p), i), t)

        return jax.vmap(jax.vmap(one))(tok, p["emb"].indices)

    return run


@pytest.mark.parametrize(
    "transform, idx",
    [
        (lx.quaxify, IDX_B),
        (lx.quaxify, IDX_BT),
        (_vmap_outside_per_example, IDX_B),
        (_vmap_outside_per_token, IDX_BT),
    ],
    ids=[
        "quaxify(vmap(vmap)) per-example",
        "quaxify(vmap(vmap)) per-token",
        "vmap(quaxify(vmap)) with_indices",
        "vmap(vmap(quaxify)) with_indices",
    ],
)
def test_equinox_embedding(transform, idx):
    check_against_reference(
        _eqx_nested_vmaps, {"emb": EMB}, TOKENS, idx, transform=transform
    )


# -- flax.linen.Embed, adapted through rules ----------------------------------------

_FLAX = nn.Embed(V, D)
FLAX_RULES = [
    [lx.LoraRule("embedding", 2, in_axes=0, out_axes=1)],
    [lx.LoraRule("embedding", 4, alpha=8.0, in_axes=0, out_axes=1)],
    [lx.LoraRule("embedding", 1, alpha=0.5, in_axes=0, out_axes=1)],
]


@pytest.fixture(scope="module")
def flax_setup():
    params = _FLAX.init(jr.key(1), TOKENS)
    stack = lx.stack_adapters(random_adapters(params, FLAX_RULES, seed=2, std=0.3))
    # The same adapters as an `Adapted` (for the gradient reference).
    (lay,) = stack.layouts
    assert (lay.in_axes, lay.out_axes) == ((0,), (1,))
    a, b = stack.weights["params/embedding"]
    adapted = Adapted(
        np.asarray(params["params"]["embedding"]),
        np.asarray(a),
        np.asarray(b),
        np.asarray(stack.scales["params/embedding"]),
        (0,),
        (1,),
    )
    return params, stack, adapted


def _flax_embed(p, tok):
    return _FLAX.apply({"params": {"embedding": p["emb"]}}, tok)


def _flax_attend(p, h):
    return _FLAX.apply({"params": {"embedding": p["emb"]}}, h, method=nn.Embed.attend)


@INDICES
def test_flax_embed_and_attend(flax_setup, idx):
    params, stack, adapted = flax_setup
    lp = lx.loraify(params, stack, idx)
    leaf = lp["params"]["embedding"]
    assert isinstance(leaf, lx.BatchedLoraArray)
    np.testing.assert_array_equal(leaf.a, adapted.a)

    # Through loraify and `quaxify(model.apply)`, against each row alone through
    # the model with its adapter merged in (model_helpers.einsum_merge).
    n = idx.ndim
    cases = [
        (lambda p, t: _FLAX.apply(p, t), TOKENS),
        (lambda p, h: _FLAX.apply(p, h, method=nn.Embed.attend), H),
    ]
    for apply, x in cases:
        one = jax.jit(lambda p, x_e: apply(p, x_e[(None,) * n])[(0,) * n])  # noqa: B023
        ref = per_row_reference(params, stack, idx, one, x)
        assert_adapters_matter(ref, apply(params, x), idx, atol=TOL["atol"])
        assert_close(jax.jit(lx.quaxify(apply))(lp, x), ref, **TOL)

    # Gradients w.r.t. the factors (per example; per token is covered above).
    if n == 1:
        check_against_reference(_flax_embed, {"emb": adapted}, TOKENS, idx)
        check_against_reference(_flax_attend, {"emb": adapted}, H, idx)


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f",
    [lambda e, t: e[t, 2], lambda e, t: e[t[:, :, None], jnp.arange(2)]],
    ids=["E[tokens, 2]", "E[tokens, :2]"],
)
def test_unsupported_gather_is_an_error(f):
    with pytest.raises(lx.UnsupportedOperationError, match="gather") as info:
        lx.quaxify(f)(EMB.lora(IDX_B), TOKENS)
    assert "allow_materialise" in str(info.value)


def test_unsupported_gather_with_allow_materialise():
    # Opted in: with one (scalar) index per example the dense row table is built;
    # with per-example indices one dense table cannot serve the batch: an error.
    emb = dataclasses.replace(EMB, allow_materialise=True)

    def f(p, tok):
        return p["emb"][tok, 2]

    check_against_reference(f, {"emb": emb}, TOKENS, IDX_B, transform=vmap_outside)
    with pytest.raises(lx.UnsupportedOperationError, match="per-example indices"):
        lx.quaxify(f)({"emb": emb.lora(IDX_B)}, TOKENS)


@pytest.mark.parametrize(
    "idx",
    [np.zeros(B + 1, np.int32), np.zeros((B, T + 1), np.int32), np.zeros(T, np.int32)],
    ids=["(B+1,)", "(B, T+1)", "(T,)"],
)
@pytest.mark.parametrize("f", [_getitem, _take])
def test_token_and_indices_shapes_must_match(f, idx):
    with pytest.raises(lx.IndicesShapeError, match="indices"):
        lx.quaxify(f)({"emb": EMB.lora(idx)}, TOKENS)


def test_single_token_lookup_needs_scalar_indices():
    # An Equinox Embedding called on one token with per-example indices.
    m = lx.with_indices(_eqx({"emb": EMB.lora(None)}), IDX_B)
    with pytest.raises(lx.IndicesShapeError, match="with_indices"):
        lx.quaxify(lambda m, t: m(t))(m, jnp.int32(3))


def test_lookup_with_unset_indices_is_an_error():
    with pytest.raises(ValueError, match="with_indices"):
        lx.quaxify(_getitem)({"emb": EMB.lora(None)}, TOKENS)


def test_checker_notices_a_lookup_that_ignores_the_adapter():
    # The comparison can fail: a lookup of the base table alone is caught.
    check = Checker(lambda p, tok: p["emb"][tok], {"emb": EMB})
    check.transform = lambda f: lambda p, tok: p["emb"].w[tok]
    with pytest.raises(AssertionError):
        check(TOKENS, IDX_B)
