"""Property tests of the `dot_general` rewrite against the float64 NumPy reference."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import lorax_arrays as lx
from tests.helpers import (
    RTOL_F32,
    DotCase,
    assert_close_to_reference,
    check_dot,
    dense_weight_per_example,
    dot_cases,
    dot_fn,
    largest_intermediate,
    random_indices,
    random_lora,
    reference_dot_general,
)


@given(dot_cases())
def test_dot_general_matches_reference(case: DotCase):
    w, a, b, scale, idx, x = case.arrays()
    lora = case.lora(w, a, b, scale, idx)
    out = jax.jit(lx.quaxify(dot_fn(case)))(lora, x)
    assert out.dtype == jnp.float32
    case.check(x, w, a, b, scale, idx, out)


@given(dot_cases(idx_ndims=(0,), vmapped=True))
def test_dot_general_scalar_indices_under_vmap(case: DotCase):
    w, a, b, scale, idx, x = case.arrays()
    f = lx.quaxify(dot_fn(case))

    def per_example(i, x_e):
        return f(case.lora(w, a, b, scale, i), x_e)

    out = jax.jit(jax.vmap(per_example, in_axes=(0, case.vmap_axis)))(idx, x)
    assert out.shape[0] == idx.shape[0]
    for e in range(idx.shape[0]):
        case.check(np.take(x, e, axis=case.vmap_axis), w, a, b, scale, idx[e], out[e])


def test_vmap_outside_quaxify_with_batched_indices():
    """`jax.vmap` over a BatchedLoraArray whose indices carry the example axis."""
    rng = np.random.default_rng(0)
    w, a, b, scale = random_lora(rng, (5, 3), (0,), (1,), n_adapters=3, rank=2)
    idx = np.array([2, -1, 0, 1], np.int32)
    x = rng.standard_normal((4, 6, 5)).astype(np.float32)
    lora = lx.BatchedLoraArray(
        jnp.asarray(w), a, b, scale=scale, indices=idx, in_axes=0, out_axes=1
    )
    # Build the in_axes pytree by hand: only `indices` is mapped.
    in_axes = jax.tree_util.tree_map(lambda _: None, lora)
    in_axes = _with_field(in_axes, "indices", 0)
    out = jax.vmap(lx.quaxify(lambda W, x: x @ W), in_axes=(in_axes, 0))(lora, x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (0,), (1,))
    expected = np.einsum("btd,bdf->btf", x.astype(np.float64), w_e)
    mag = np.einsum(
        "btd,bdf->btf",
        np.abs(x.astype(np.float64)),
        dense_weight_per_example(w, a, b, scale, idx, (0,), (1,), abs_weight=True),
    )
    assert_close_to_reference(out, expected, mag)


def _with_field(module, name, value):
    return eqx.tree_at(
        lambda m: getattr(m, name), module, value, is_leaf=lambda v: v is None
    )


# -- all -1 and repeated indices -------------------------------------------------


@pytest.mark.parametrize(
    "idx",
    [
        np.full((3,), -1, np.int32),
        np.array([1, 1, 1], np.int32),
        np.array([[0, -1], [0, 0], [-1, 1]], np.int32),
    ],
    ids=["all-base", "repeated", "per-token"],
)
def test_index_patterns(idx):
    rng = np.random.default_rng(1)
    w, a, b, scale = random_lora(rng, (4, 5), (0,), (1,), n_adapters=2, rank=3)
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    lora = lx.BatchedLoraArray(
        jnp.asarray(w), a, b, scale=scale, indices=idx, in_axes=0, out_axes=1
    )
    out = lx.quaxify(lambda W, x: x @ W)(lora, x)
    dn = (((2,), (0,)), ((), ()))
    check_dot(x, w, a, b, scale, idx, (0,), (1,), (), dn, False, out)
    if np.all(idx == -1):
        # Base weight only: exactly the plain product.
        np.testing.assert_allclose(out, x @ w, rtol=1e-6, atol=1e-6)


# -- no per-example dense weight in the jaxpr -------------------------------------


def _jaxpr_case():
    rng = np.random.default_rng(2)
    n_ex, t, d, f = 4, 2, 16, 16
    w, a, b, scale = random_lora(rng, (d, f), (0,), (1,), n_adapters=3, rank=2)
    idx = np.array([0, 2, -1, 1], np.int32)
    x = rng.standard_normal((n_ex, t, d)).astype(np.float32)
    return w, a, b, scale, idx, x


def test_rewrite_builds_no_per_example_weight():
    w, a, b, scale, idx, x = _jaxpr_case()
    lora = lx.BatchedLoraArray(
        jnp.asarray(w), a, b, scale=scale, indices=idx, in_axes=0, out_axes=1
    )
    jaxpr = jax.make_jaxpr(lx.quaxify(lambda W, x: x @ W))(lora, x)
    limit = idx.shape[0] * w.size
    assert largest_intermediate(jaxpr) < limit, jaxpr
    # Nothing larger than the base weight itself (stop_gradient(w) is that size).
    assert largest_intermediate(jaxpr) <= w.size, jaxpr


def test_jaxpr_check_detects_materialisation():
    """The size check above can fail: the opt-in dense path trips it."""
    w, a, b, scale, idx, x, f, lora = _mixed_case()
    jaxpr = jax.make_jaxpr(lx.quaxify(f))(lora, x)
    assert largest_intermediate(jaxpr) >= idx.shape[0] * w.size


# -- tolerance sanity: the reference itself -------------------------------------


def test_reference_detects_wrong_adapter():
    """The reference comparison is sharp enough to see a swapped adapter."""
    rng = np.random.default_rng(3)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=2)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    idx = np.array([0, 1], np.int32)
    dn = (((1,), (0,)), ((), ()))
    w_right = dense_weight_per_example(w, a, b, scale, idx, (0,), (1,))
    w_wrong = dense_weight_per_example(w, a, b, scale, idx[::-1], (0,), (1,))
    w_abs = dense_weight_per_example(w, a, b, scale, idx, (0,), (1,), abs_weight=True)
    mag = reference_dot_general(np.abs(x), w_abs, dn, False, 1)
    right = reference_dot_general(x, w_right, dn, False, 1)
    wrong = reference_dot_general(x, w_wrong, dn, False, 1)
    assert_close_to_reference(right.astype(np.float32), right, mag, RTOL_F32)
    with pytest.raises(AssertionError):
        assert_close_to_reference(wrong, right, mag, RTOL_F32)


# -- opt-in materialisation for layouts without a low-rank rule ------------------


@given(dot_cases())
def test_out_axis_contraction_matches_reference(case: DotCase):
    """Swap the roles of in/out: the product now contracts the *out* axes (as a
    tied output head does). The rewrite reads the array the other way round and
    must still match the reference, with or without allow_materialise."""
    rng = np.random.default_rng(case.seed)
    w, a, b, scale = random_lora(
        rng,
        case.w_shape,
        case.out_axes,
        case.in_axes,
        case.stack_axes,
        n_adapters=case.n_adapters,
        rank=case.rank,
    )
    idx = random_indices(rng, case.idx_shape, case.n_adapters)
    x = rng.standard_normal(case.x_shape).astype(np.float32)
    lora = lx.BatchedLoraArray(
        jnp.asarray(w),
        a,
        b,
        scale=scale,
        indices=idx,
        in_axes=case.out_axes,
        out_axes=case.in_axes,
        stack_axes=case.stack_axes,
        allow_materialise=True,
    )
    out = jax.jit(lx.quaxify(dot_fn(case)))(lora, x)
    check_dot(
        x,
        w,
        a,
        b,
        scale,
        idx,
        case.out_axes,
        case.in_axes,
        case.stack_axes,
        case.dimension_numbers,
        case.lora_is_lhs,
        out,
    )
    # Without the opt-in it is the same low-rank computation.
    plain = jax.jit(lx.quaxify(dot_fn(case)))(lora.replace(allow_materialise=False), x)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(out))


def _mixed_case(seed=21):
    """A (D, N, H) kernel with in=D, out=(N, H), contracted over D *and* N: not a
    low-rank product, so only the opt-in dense path can compute it. Returns the
    NumPy arrays, the product and the array (with `allow_materialise=True`)."""
    rng = np.random.default_rng(seed)
    d, nh, h = 4, 3, 2
    w, a, b, scale = random_lora(rng, (d, nh, h), (0,), (1, 2), n_adapters=3, rank=2)
    idx = np.array([2, -1, 0, 1], np.int32)
    x = rng.standard_normal((4, 5, d, nh)).astype(np.float32)
    f = lambda W, x: jnp.einsum("btdn,dnh->bth", x, W)  # noqa: E731
    lora = lx.BatchedLoraArray(
        jnp.asarray(w),
        a,
        b,
        scale=scale,
        indices=idx,
        in_axes=0,
        out_axes=(1, 2),
        allow_materialise=True,
    )
    return w, a, b, scale, idx, x, f, lora


def test_materialised_mixed_contraction_matches_reference():
    w, a, b, scale, idx, x, f, lora = _mixed_case()
    out = jax.jit(lx.quaxify(f))(lora, x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (0,), (1, 2))
    w_abs = dense_weight_per_example(w, a, b, scale, idx, (0,), (1, 2), abs_weight=True)
    expected = np.einsum("btdn,bdnh->bth", x.astype(np.float64), w_e)
    mag = np.einsum("btdn,bdnh->bth", np.abs(x.astype(np.float64)), w_abs)
    assert_close_to_reference(out, expected, mag)
    # Without the opt-in the same product is refused.
    with pytest.raises(lx.UnsupportedOperationError, match="allow_materialise"):
        lx.quaxify(f)(lora.replace(allow_materialise=False), x)


def test_contract_out_axis_with_allow_materialise():
    """`x @ W.T` on an (in, out) kernel contracts the out axis: it stays low rank
    even when materialising is allowed."""
    rng = np.random.default_rng(12)
    d, f = 5, 3
    w, a, b, scale = random_lora(rng, (d, f), (0,), (1,), n_adapters=3, rank=2)
    idx = np.array([2, -1, 0, 1], np.int32)
    x = rng.standard_normal((4, 6, f)).astype(np.float32)
    lora = lx.BatchedLoraArray(
        jnp.asarray(w),
        a,
        b,
        scale=scale,
        indices=idx,
        in_axes=0,
        out_axes=1,
        allow_materialise=True,
    )
    out = jax.jit(lx.quaxify(lambda W, x: x @ W.T))(lora, x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (0,), (1,))
    w_abs = dense_weight_per_example(w, a, b, scale, idx, (0,), (1,), abs_weight=True)
    expected = np.einsum("btf,bdf->btd", x.astype(np.float64), w_e)
    mag = np.einsum("btf,bdf->btd", np.abs(x.astype(np.float64)), w_abs)
    assert_close_to_reference(out, expected, mag)


# -- gradients ----------------------------------------------------------------------


def _grad_case():
    rng = np.random.default_rng(13)
    n_ex, t, d, f, n, rank = 4, 3, 5, 3, 3, 2
    w, a, b, scale = random_lora(rng, (d, f), (0,), (1,), n_adapters=n, rank=rank)
    idx = np.array([2, -1, 0, 2], np.int32)
    x = rng.standard_normal((n_ex, t, d)).astype(np.float32)
    return w, a, b, scale, idx, x


def _reference_loss(w, a, b, x, scale, idx):
    """Plain float32 JAX: one dense weight per example, no lorax_arrays."""
    safe = jnp.maximum(idx, 0)
    s = jnp.where(idx >= 0, scale[safe], 0.0)
    delta = jnp.einsum("edr,erf->edf", a[safe], b[safe])
    w_e = w[None] + s[:, None, None] * delta
    y = jnp.einsum("btd,bdf->btf", x, w_e)
    return jnp.sum(y**2)


def test_gradients_match_dense_reference():
    w, a, b, scale, idx, x = _grad_case()

    def loss(w, a, b, x):
        lora = lx.BatchedLoraArray(
            w, a, b, scale=scale, indices=idx, in_axes=0, out_axes=1
        )
        y = lx.quaxify(lambda W, x: x @ W)(lora, x)
        return jnp.sum(y**2)

    args = tuple(jnp.asarray(v) for v in (w, a, b, x))
    g_w, g_a, g_b, g_x = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    r_a, r_b, r_x = jax.grad(_reference_loss, argnums=(1, 2, 3))(
        *args, jnp.asarray(scale), jnp.asarray(idx)
    )
    # The base weight is frozen.
    np.testing.assert_array_equal(np.asarray(g_w), np.zeros_like(w))
    for got, ref in [(g_a, r_a), (g_b, r_b), (g_x, r_x)]:
        ref = np.asarray(ref)
        assert np.abs(ref).max() > 0
        np.testing.assert_allclose(
            np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()
        )
    # Adapter 1 is used by no example: its factors get exactly zero gradient.
    assert np.all(np.asarray(g_a)[1] == 0) and np.all(np.asarray(g_b)[1] == 0)


def test_gradients_with_per_token_indices():
    rng = np.random.default_rng(14)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=3)
    idx = np.array([[0, 1, -1], [1, 1, 0]], np.int32)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)

    def loss(a, b):
        lora = lx.BatchedLoraArray(
            jnp.asarray(w), a, b, scale=scale, indices=idx, in_axes=0, out_axes=1
        )
        return jnp.sum(lx.quaxify(lambda W, x: x @ W)(lora, x) ** 2)

    def ref_loss(a, b):
        safe = jnp.maximum(idx, 0)
        s = jnp.where(idx >= 0, jnp.asarray(scale)[safe], 0.0)
        w_e = w + s[..., None, None] * jnp.einsum("btdr,btrf->btdf", a[safe], b[safe])
        return jnp.sum(jnp.einsum("btd,btdf->btf", x, w_e) ** 2)

    got = jax.grad(loss, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
    ref = jax.grad(ref_loss, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
    for g, r in zip(got, ref):
        r = np.asarray(r)
        np.testing.assert_allclose(
            np.asarray(g), r, rtol=1e-4, atol=1e-4 * np.abs(r).max()
        )
