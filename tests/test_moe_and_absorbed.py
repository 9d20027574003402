"""Experts gathered per token, absorbed weights (DeepSeek MLA), and the errors for
the MoE forms that have no low-rank rule (a one-hot over experts, `lax.ragged_dot`).

Every result is checked against an independent reference: each example's dense
merged weight (`tests/helpers.py`, float64 NumPy; `tests/dense_reference.py` for
gradients w.r.t. the factors), with random non-zero factors and `-1` rows.
"""

from __future__ import annotations

import dataclasses
import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import lorax_arrays as lx
from lorax_arrays._rules.lookup import _entries_gather
from tests.dense_reference import Adapted, check_against_reference, vmap_outside
from tests.helpers import (
    check_dot,
    dense_weight_per_example,
    random_indices,
    random_lora,
    walk_eqns,
)

B, T, D, F, E, K = 3, 4, 8, 6, 4, 2

# --- experts gathered per token: w[experts], jnp.take -------------------------

ROUTER = np.random.default_rng(7).standard_normal((D, E)).astype(np.float32)


def moe(select):
    """A top-k MoE up-projection: each token's experts gathered by `select`, then
    `einsum('BTD,BTKDF->BTKF')`, weighted by the routing weights."""

    def f(p, x):
        weights, experts = lax.top_k(x @ ROUTER, K)  # (..., k)
        up = jnp.einsum("BTD,BTKDF->BTKF", x, select(p["w"], experts))
        return jnp.einsum("BTKF,BTK->BTF", up, jax.nn.softmax(weights, -1))

    return f


GATHER = lambda w, e: w[e]  # noqa: E731
TAKE = ft.partial(jnp.take, axis=0)


def experts_weight(rng, n_adapters=3, rank=2, shape=(E, D, F)):
    return Adapted.random(
        rng, shape, (1,), (2,), (0,), n_adapters=n_adapters, rank=rank
    )


@pytest.mark.parametrize("select", [GATHER, TAKE], ids=["w[experts]", "jnp.take"])
@pytest.mark.parametrize("idx_shape", [(B,), (B, T)], ids=["per-example", "per-token"])
def test_gathered_experts_match_reference_with_gradients(select, idx_shape):
    rng = np.random.default_rng(0)
    weights = {"w": experts_weight(rng)}
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    idx = np.array([1, -1, 2]) if idx_shape == (B,) else random_indices(rng, (B, T), 3)
    idx.flat[0] = -1
    check_against_reference(moe(select), weights, x, idx)


def test_gathered_experts_under_vmap():
    """Per example under `jax.vmap`: scalar indices broadcast over the entries."""
    rng = np.random.default_rng(1)
    weights = {"w": experts_weight(rng)}
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    check_against_reference(
        moe(GATHER), weights, x, np.array([2, 0, -1]), transform=vmap_outside
    )


def _jaxpr_shapes(f, *args):
    jaxpr = jax.make_jaxpr(f)(*args)
    return [tuple(v.aval.shape) for eqn in walk_eqns(jaxpr) for v in eqn.outvars]


def test_gathered_experts_never_gather_every_adapter():
    """The factors are gathered per entry and per adapter at once: no
    `(B, T, k, n_adapters, ...)` array, only `(B, T, k, 1, ...)`."""
    n = 7  # a size no other axis has
    weight = experts_weight(np.random.default_rng(2), n_adapters=n)
    x = jnp.ones((B, T, D))
    lora = weight.lora(jnp.array([0, 3, 6]))
    shapes = _jaxpr_shapes(lx.quaxify(moe(GATHER)), {"w": lora}, x)
    assert (B, T, K, 1, D, 2) in shapes and (B, T, K, 1, 2, F) in shapes
    assert not [s for s in shapes if s[:3] == (B, T, K) and n in s[3:]], shapes


def test_gathered_experts_out_of_range_index_is_nan_rows():
    weight = experts_weight(np.random.default_rng(3))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, D)), jnp.float32)

    @jax.jit
    def run(idx):
        return lx.quaxify(moe(GATHER))({"w": weight.lora(idx)}, x)

    out = np.asarray(run(jnp.array([0, 5, -1])))
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[2], np.asarray(run(jnp.array([0, 1, -1])))[2])


def test_gathered_experts_result_is_an_adapted_array():
    """`w[experts]` is a `BatchedLoraArray` with the index batch axes as stack
    axes, one adapter of scale 1 and a scalar index."""
    weight = experts_weight(np.random.default_rng(5))
    experts = jnp.zeros((B, T, K), jnp.int32)
    lora = weight.lora(jnp.array([0, 1, 2]))
    dn = lax.GatherDimensionNumbers(
        offset_dims=(3, 4), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    # The parameters JAX itself binds (they differ between versions: jax 0.12
    # added `out_sharding`), read off the gather `lax.gather` makes.
    clip = lax.GatherScatterMode.CLIP
    gather = lambda w, i: lax.gather(w, i, dn, (1, D, F), mode=clip)  # noqa: E731
    (eqn,) = jax.make_jaxpr(gather)(jnp.zeros((E, D, F)), experts[..., None]).eqns
    assert eqn.primitive is lax.gather_p
    got = _entries_gather(lora, experts[..., None], dn, (1, D, F), eqn.params)
    assert got.shape == (B, T, K, D, F)
    assert (got.stack_axes, got.in_axes, got.out_axes) == ((0, 1, 2), (3,), (4,))
    assert got.n_adapters == 1 and got.indices.shape == ()
    assert got.a.shape == (B, T, K, 1, D, 2) and got.b.shape == (B, T, K, 1, 2, F)


def test_gathered_experts_indices_that_do_not_line_up():
    weight = experts_weight(np.random.default_rng(6))
    x = jnp.ones((B, T, D))
    with pytest.raises(lx.IndicesShapeError) as info:
        lx.quaxify(moe(GATHER))({"w": weight.lora(jnp.array([0, 1]))}, x)
    msg = str(info.value)
    assert "(2,)" in msg and f"({B}, {T}, {K})" in msg
    assert "index batch shape" in msg


# --- absorbed weights: DeepSeek MLA's wkv_b -----------------------------------

# wkv_b: (c, h, d), in_axes=(0,), out_axes=(1, 2).
MLA_FORMS = {
    # einsum("bshd,chd->bshc"): contracts out-axis d, out-axis h a batch axis
    "q-absorb": dict(x_last="d", rhs=(((3,), (2,)), ((2,), (1,)))),
    # einsum("bshc,chd->bshd"): contracts in-axis c, out-axis h a batch axis
    "out-absorb": dict(x_last="c", rhs=(((3,), (0,)), ((2,), (1,)))),
}


def _swap(dn):
    (lc, rc), (lb, rb) = dn
    return ((rc, lc), (rb, lb))


@st.composite
def mla_cases(draw):
    return dict(
        form=draw(st.sampled_from(sorted(MLA_FORMS))),
        c=draw(st.integers(2, 5)),
        h=draw(st.integers(1, 3)),
        d=draw(st.integers(1, 4)),
        s=draw(st.integers(1, 3)),
        idx_ndim=draw(st.integers(1, 2)),
        lora_is_lhs=draw(st.booleans()),
        rank=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


def _mla_arrays(case, b=3):
    rng = np.random.default_rng(case["seed"])
    c, h, d, s = case["c"], case["h"], case["d"], case["s"]
    w, a, bb, scale = random_lora(
        rng, (c, h, d), (0,), (1, 2), n_adapters=3, rank=case["rank"]
    )
    last = d if MLA_FORMS[case["form"]]["x_last"] == "d" else c
    x = rng.standard_normal((b, s, h, last)).astype(np.float32)
    idx = random_indices(rng, (b,) if case["idx_ndim"] == 1 else (b, s), 3)
    idx.flat[0] = -1
    return x, w, a, bb, scale, idx


@settings(deadline=None)
@given(mla_cases())
def test_absorbed_weight_matches_reference(case):
    x, w, a, b, scale, idx = _mla_arrays(case)
    lora = lx.BatchedLoraArray(
        w, a, b, scale=scale, indices=idx, in_axes=(0,), out_axes=(1, 2)
    )
    dn = MLA_FORMS[case["form"]]["rhs"]
    lhs_first = case["lora_is_lhs"]
    dn = _swap(dn) if lhs_first else dn

    def f(x, w):
        return lax.dot_general(w, x, dn) if lhs_first else lax.dot_general(x, w, dn)

    got = jax.jit(lx.quaxify(f))(jnp.asarray(x), lora)
    check_dot(x, w, a, b, scale, idx, (0,), (1, 2), (), dn, lhs_first, got)


# One example's einsum; with every example's weight; with the base weight.
MLA_EINSUMS = {
    "q-absorb": ("shd,chd->shc", "eshd,echd->eshc", "eshd,chd->eshc"),
    "out-absorb": ("shc,chd->shd", "eshc,echd->eshd", "eshc,chd->eshd"),
}


@pytest.mark.parametrize("form", sorted(MLA_FORMS))
def test_absorbed_weight_under_vmap(form):
    """Per example under `jax.vmap`, each example's scalar index set inside."""
    case = dict(form=form, c=4, h=2, d=3, s=2, idx_ndim=1, rank=2, seed=11)
    x, w, a, b, scale, idx = _mla_arrays(case)
    lora = lx.BatchedLoraArray(w, a, b, scale=scale, in_axes=(0,), out_axes=(1, 2))
    one_spec, each_spec, base_spec = MLA_EINSUMS[form]

    def one(xe, i):
        f = ft.partial(jnp.einsum, one_spec)
        return lx.quaxify(f)(xe, lx.with_indices(lora, i))

    got = jax.vmap(one)(jnp.asarray(x), jnp.asarray(idx))
    w_e = dense_weight_per_example(w, a, b, scale, idx, (0,), (1, 2))
    want = np.einsum(each_spec, x.astype(np.float64), w_e)
    moved = np.abs(want - np.einsum(base_spec, x, w)).max(axis=(1, 2, 3))
    assert (moved[idx >= 0] > 1e-2).all() and (moved[idx < 0] < 1e-4).all()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("idx", [[1, -1, 2], [[0, 2], [-1, 1], [2, 2]]])
def test_absorbed_mla_gradients(idx):
    """Both absorbed einsums of DeepSeek's MLA, forward and gradients w.r.t. `a`
    and `b`, against the per-example dense reference."""
    rng = np.random.default_rng(12)
    c, h, dn_, dv = 5, 2, 3, 4
    weights = {"wkv_b": Adapted.random(rng, (c, h, dn_ + dv), (0,), (1, 2))}
    x = jnp.asarray(rng.standard_normal((3, 2, h, dn_)), jnp.float32)

    def f(p, q):
        w = p["wkv_b"]
        q = jnp.einsum("bshd,chd->bshc", q, w[..., :dn_])
        return jnp.einsum("bshc,chd->bshd", jnp.tanh(q), w[..., dn_:])

    check_against_reference(f, weights, x, np.asarray(idx))


def test_absorbed_with_a_stack_axis_as_batch():
    """A layer stack `(L, c, h, d)` batched too: `einsum('lbhd,lchd->lbhc')`."""
    rng = np.random.default_rng(13)
    lay = (1,), (2, 3), (0,)
    w, a, b, scale = random_lora(rng, (2, 4, 2, 3), *lay, n_adapters=3, rank=2)
    x = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)
    idx = np.array([0, -1, 2])
    lora = lx.BatchedLoraArray(
        w,
        a,
        b,
        scale=scale,
        indices=idx,
        in_axes=(1,),
        out_axes=(2, 3),
        stack_axes=(0,),
    )
    dn = (((3,), (3,)), ((0, 2), (0, 2)))
    got = lx.quaxify(lambda x, w: lax.dot_general(x, w, dn))(jnp.asarray(x), lora)
    check_dot(x, w, a, b, scale, idx, *lay, dn, False, got)


# --- the MoE forms with no low-rank rule ----------------------------------------


def test_contracting_the_expert_axis_says_why_and_what_to_do():
    weight = experts_weight(np.random.default_rng(8))
    onehot = jax.nn.one_hot(jnp.zeros((B, T, K), jnp.int32), E)
    f = lambda w: jnp.einsum("BTKE,EDF->BTKDF", onehot, w)  # noqa: E731
    with pytest.raises(
        lx.UnsupportedOperationError,
        match=r"contracts the stack axes \(0,\).*mixes the entries' adapters.*"
        r"no low-rank form.*`w\[experts\]`.*jnp.take.*einsum\('BTD,EDF->BTEF'",
    ):
        lx.quaxify(f)(weight.lora(jnp.array([0, 1, 2])))


def test_ragged_dot_serves_each_row_its_own_adapter():
    """Per-row indices: the rows of `x` are the function's argument, so they carry
    their positions into the grouped matmul (tests/test_ragged_moe.py has the
    model-level cases)."""
    weight = experts_weight(np.random.default_rng(9))
    sizes = jnp.array([2, 0, 1, 1], jnp.int32)
    x = np.random.default_rng(10).standard_normal((4, D)).astype(np.float32)
    idx = np.array([0, 1, 2, -1])
    f = lambda x, w: lax.ragged_dot(x, w, sizes)  # noqa: E731
    got = lx.quaxify(f)(jnp.asarray(x), weight.lora(jnp.asarray(idx)))
    dense = np.asarray(weight.dense_np(idx), np.float64)  # (rows, E, D, F)
    expert = np.repeat(np.arange(E), np.asarray(sizes))
    want = np.stack([x[m] @ dense[m, expert[m]] for m in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ragged_dot_says_why_and_what_to_do():
    weight = experts_weight(np.random.default_rng(9))
    sizes = jnp.array([2, 0, 1, 1], jnp.int32)
    f = lambda x, w: lax.ragged_dot(x, w, sizes)  # noqa: E731
    with pytest.raises(
        lx.UnsupportedOperationError,
        match=r"`ragged_dot_general` \(`lax.ragged_dot`.*tokens sorted by expert.*"
        r"these rows do not carry it.*`rows=False`",
    ):
        lora = weight.lora(jnp.array([0, 1, 2, 0]))
        lx.quaxify(f, rows=False)(jnp.ones((4, D)), lora)


def test_ragged_dot_materialises_when_allowed_with_a_scalar_index():
    weight = experts_weight(np.random.default_rng(10))
    sizes = jnp.array([2, 0, 1, 1], jnp.int32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, D)), jnp.float32)
    lora = dataclasses.replace(weight, allow_materialise=True).lora(jnp.array(1))
    got = lx.quaxify(lambda x, w: lax.ragged_dot(x, w, sizes))(x, lora)
    want = lax.ragged_dot(x, weight.dense_np(np.array(1)), sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
