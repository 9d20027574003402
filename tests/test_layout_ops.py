"""The user-facing ops (`@`, `jnp.dot`, `jnp.matmul`, `jnp.einsum`, `.T`, transpose,
`astype`, reshape, copy) keep the low-rank form and match the float64 reference."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from tests.helpers import (
    RTOL_BF16,
    assert_close_to_reference,
    dense_weight_per_example,
    draw_roles,
    largest_intermediate,
    random_indices,
    random_lora,
    reference_dot_general,
)

seeds = st.integers(0, 2**31 - 1)
small = st.integers(1, 4)


def _lora(w, a, b, scale, idx, in_axes, out_axes, stack_axes=(), **kw):
    return lx.BatchedLoraArray(
        jnp.asarray(w),
        a,
        b,
        scale=scale,
        indices=idx,
        in_axes=in_axes,
        out_axes=out_axes,
        stack_axes=stack_axes,
        **kw,
    )


def _check_einsum(spec, x, w, a, b, scale, idx, in_axes, out_axes, out, rtol=None):
    """Reference for `jnp.einsum(spec, x, W)`: the example letters are x's leading
    `idx.ndim` letters, shared with the per-example weight."""
    lhs, res = spec.split("->")
    xs, ws = lhs.split(",")
    ex = xs[: idx.ndim]
    w_e = dense_weight_per_example(w, a, b, scale, idx, in_axes, out_axes)
    w_abs = dense_weight_per_example(
        w, a, b, scale, idx, in_axes, out_axes, abs_weight=True
    )
    x64 = np.asarray(x, np.float64)
    ref_spec = f"{xs},{ex}{ws}->{res}"
    expected = np.einsum(ref_spec, x64, w_e)
    mag = np.einsum(ref_spec, np.abs(x64), w_abs)
    kw = {} if rtol is None else {"rtol": rtol}
    assert_close_to_reference(out, expected, mag, **kw)


# -- @, jnp.dot, jnp.matmul, jnp.einsum on a (D, F) kernel ------------------------

OPS = {
    "matmul_operator": lambda W, x: x @ W,
    "jnp.dot": lambda W, x: jnp.dot(x, W),
    "jnp.matmul": lambda W, x: jnp.matmul(x, W),
    "jnp.einsum": lambda W, x: jnp.einsum("...d,df->...f", x, W),
}
_jitted_ops = {name: jax.jit(lx.quaxify(f)) for name, f in OPS.items()}


@given(
    op=st.sampled_from(sorted(OPS)),
    d=small,
    f=small,
    n=st.integers(1, 5),
    rank=st.integers(1, 6),
    idx_shape=st.sampled_from([(3,), (2, 3), (1,), (2, 1)]),
    seed=seeds,
)
def test_matmul_like_ops(op, d, f, n, rank, idx_shape, seed):
    rng = np.random.default_rng(seed)
    w, a, b, scale = random_lora(rng, (d, f), (0,), (1,), n_adapters=n, rank=rank)
    idx = random_indices(rng, idx_shape, n)
    x_shape = idx_shape + (2, d) if len(idx_shape) == 1 else idx_shape + (d,)
    x = rng.standard_normal(x_shape).astype(np.float32)
    out = _jitted_ops[op](_lora(w, a, b, scale, idx, 0, 1), x)
    spec = "btd,df->btf" if len(idx_shape) == 1 else "bsd,df->bsf"
    _check_einsum(spec, x, w, a, b, scale, idx, (0,), (1,), out)


@given(d=small, f=small, n=st.integers(1, 5), rank=st.integers(1, 6), seed=seeds)
def test_matmul_with_transposed_kernel(d, f, n, rank, seed):
    """`x @ W.T` with an Equinox-style `(out, in)` weight."""
    rng = np.random.default_rng(seed)
    w, a, b, scale = random_lora(rng, (f, d), (1,), (0,), n_adapters=n, rank=rank)
    idx = random_indices(rng, (3,), n)
    x = rng.standard_normal((3, 2, d)).astype(np.float32)
    out = jax.jit(lx.quaxify(lambda W, x: x @ W.T))(_lora(w, a, b, scale, idx, 1, 0), x)
    _check_einsum("btd,fd->btf", x, w, a, b, scale, idx, (1,), (0,), out)


@pytest.mark.parametrize("out_axes", [(0, 2), (2, 0)])
def test_einsum_multihead_projection(out_axes):
    """'btd,ndh->btnh' with kernel (N, D, H): in = D, out = (N, H) in either order."""
    rng = np.random.default_rng(7)
    n_heads, d, h, n = 3, 4, 2, 3
    w, a, b, scale = random_lora(
        rng, (n_heads, d, h), (1,), out_axes, n_adapters=n, rank=2
    )
    idx = np.array([1, -1, 2, 0], np.int32)
    x = rng.standard_normal((4, 5, d)).astype(np.float32)
    f = jax.jit(lx.quaxify(lambda W, x: jnp.einsum("btd,ndh->btnh", x, W)))
    out = f(_lora(w, a, b, scale, idx, 1, out_axes), x)
    assert out.shape == (4, 5, n_heads, h)
    _check_einsum("btd,ndh->btnh", x, w, a, b, scale, idx, (1,), out_axes, out)


@pytest.mark.parametrize("in_axes", [(0, 1), (1, 0)])
def test_einsum_multihead_output(in_axes):
    """'btnh,nhd->btd' with kernel (N, H, D): in = (N, H) in either order, out = D."""
    rng = np.random.default_rng(8)
    n_heads, h, d, n = 3, 2, 4, 2
    w, a, b, scale = random_lora(
        rng, (n_heads, h, d), in_axes, (2,), n_adapters=n, rank=3
    )
    idx = np.array([[1, -1, 0], [0, 0, 1]], np.int32)  # per token
    x = rng.standard_normal((2, 3, n_heads, h)).astype(np.float32)
    f = jax.jit(lx.quaxify(lambda W, x: jnp.einsum("btnh,nhd->btd", x, W)))
    out = f(_lora(w, a, b, scale, idx, in_axes, 2), x)
    _check_einsum("btnh,nhd->btd", x, w, a, b, scale, idx, in_axes, (2,), out)


# -- jnp.transpose with any permutation, then contract ---------------------------


@st.composite
def transpose_cases(draw):
    ndim = draw(st.integers(2, 4))
    roles = draw_roles(draw, ndim)
    shape = tuple(draw(st.lists(small, min_size=ndim, max_size=ndim)))
    groups = {
        r: tuple(draw(st.permutations([ax for ax in range(ndim) if roles[ax] == r])))
        for r in ("in", "out", "stack")
    }
    perm = tuple(draw(st.permutations(range(ndim))))
    return (
        shape,
        groups,
        perm,
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(seeds),
    )


@given(transpose_cases())
def test_transpose_then_contract(case):
    shape, groups, perm, n, rank, seed = case
    rng = np.random.default_rng(seed)
    in_axes, out_axes, stack_axes = groups["in"], groups["out"], groups["stack"]
    w, a, b, scale = random_lora(
        rng, shape, in_axes, out_axes, stack_axes, n_adapters=n, rank=rank
    )
    idx = random_indices(rng, (2,), n)
    # After the transpose, old axis `perm[j]` is new axis `j`.
    new_of = {old: new for new, old in enumerate(perm)}
    new_shape = tuple(shape[p] for p in perm)
    # Activation (*stack, B, *in) in the transposed weight's own axis order.
    new_in = sorted(new_of[ax] for ax in in_axes)
    new_stack = sorted(new_of[ax] for ax in stack_axes)
    x_shape = (
        [new_shape[ax] for ax in new_stack] + [2] + [new_shape[ax] for ax in new_in]
    )
    x = rng.standard_normal(x_shape).astype(np.float32)
    ns = len(new_stack)
    dn = (
        (tuple(range(ns + 1, ns + 1 + len(new_in))), tuple(new_in)),
        (tuple(range(ns)), tuple(new_stack)),
    )
    f = jax.jit(
        lx.quaxify(lambda W, x: jax.lax.dot_general(x, jnp.transpose(W, perm), dn))
    )
    out = f(_lora(w, a, b, scale, idx, in_axes, out_axes, stack_axes), x)
    # Reference: transpose each dense per-example weight in NumPy.
    w_e = dense_weight_per_example(w, a, b, scale, idx, in_axes, out_axes, stack_axes)
    w_abs = dense_weight_per_example(
        w, a, b, scale, idx, in_axes, out_axes, stack_axes, abs_weight=True
    )
    full_perm = (0, *(p + 1 for p in perm))
    w_e, w_abs = np.transpose(w_e, full_perm), np.transpose(w_abs, full_perm)
    expected = reference_dot_general(x, w_e, dn, False, 1)
    mag = reference_dot_general(np.abs(x), w_abs, dn, False, 1)
    assert_close_to_reference(out, expected, mag)


# -- astype(bfloat16) with bfloat16 activations ----------------------------------


@given(
    d=small,
    f=small,
    n=st.integers(1, 5),
    rank=st.integers(1, 6),
    idx_shape=st.sampled_from([(3,), (2, 2)]),
    seed=seeds,
)
def test_astype_bfloat16(d, f, n, rank, idx_shape, seed):
    rng = np.random.default_rng(seed)
    w, a, b, scale = random_lora(rng, (d, f), (0,), (1,), n_adapters=n, rank=rank)
    idx = random_indices(rng, idx_shape, n)
    x_shape = idx_shape + ((2, d) if len(idx_shape) == 1 else (d,))
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    fn = jax.jit(lx.quaxify(lambda W, x: x @ W.astype(jnp.bfloat16)))
    out = fn(_lora(w, a, b, scale, idx, 0, 1), x)
    assert out.dtype == jnp.bfloat16
    x_ref = np.asarray(x.astype(jnp.float32))  # the bf16 values the model sees
    spec = "btd,df->btf" if len(idx_shape) == 1 else "bsd,df->bsf"
    _check_einsum(spec, x_ref, w, a, b, scale, idx, (0,), (1,), out, rtol=RTOL_BF16)


def test_astype_keeps_low_rank_form_and_factors():
    """The cast touches only `w`; the factors stay float32 (cast at use)."""
    rng = np.random.default_rng(4)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=2)
    lora = _lora(w, a, b, scale, np.array([0, 1], np.int32), 0, 1)
    cast = lx.quaxify(lambda W: W.astype(jnp.bfloat16))(lora)
    assert isinstance(cast, lx.BatchedLoraArray)
    assert cast.w.dtype == jnp.bfloat16
    assert cast.a.dtype == jnp.float32 and cast.b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(cast.indices), [0, 1])


def test_astype_to_integer_is_refused():
    rng = np.random.default_rng(4)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=2)
    lora = _lora(w, a, b, scale, np.array([0, 1], np.int32), 0, 1)
    with pytest.raises(lx.UnsupportedOperationError, match="non-floating"):
        lx.quaxify(lambda W: W.astype(jnp.int32))(lora)


# -- reshape within the in-group or the out-group ---------------------------------

_TOTALS = [2, 3, 4, 6, 8]


def _factorisations(total, max_len=2, allow_ones=False):
    out = []
    for length in range(1, max_len + 1):
        for dims in itertools.product(range(1, total + 1), repeat=length):
            if math.prod(dims) == total and (allow_ones or 1 not in dims):
                out.append(dims)
    return out


@st.composite
def reshape_cases(draw):
    t_in, t_out = draw(st.sampled_from(_TOTALS)), draw(st.sampled_from(_TOTALS))
    in_old = draw(st.sampled_from(_factorisations(t_in, allow_ones=True)))
    out_old = draw(st.sampled_from(_factorisations(t_out, allow_ones=True)))
    in_new = draw(st.sampled_from(_factorisations(t_in, max_len=3)))
    out_new = draw(st.sampled_from(_factorisations(t_out, max_len=3)))
    in_first = draw(st.booleans())
    stack = tuple(draw(st.lists(st.integers(2, 3), max_size=2)))
    stack_order = tuple(draw(st.permutations(range(len(stack)))))
    return (
        in_old,
        out_old,
        in_new,
        out_new,
        in_first,
        stack,
        stack_order,
        draw(st.booleans()),  # reverse the listed order of in_axes / out_axes
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(seeds),
    )


@given(reshape_cases())
def test_reshape_within_groups(case):
    """Flax DenseGeneral-style merges/splits of the out group (or the in group)."""
    (
        in_old,
        out_old,
        in_new,
        out_new,
        in_first,
        stack,
        stack_order,
        rev,
        n,
        rank,
        seed,
    ) = case
    rng = np.random.default_rng(seed)
    ns = len(stack)
    first, second = (in_old, out_old) if in_first else (out_old, in_old)
    old_shape = stack + first + second
    pos_first = tuple(range(ns, ns + len(first)))
    pos_second = tuple(range(ns + len(first), len(old_shape)))
    in_axes, out_axes = (pos_first, pos_second) if in_first else (pos_second, pos_first)
    if rev:
        in_axes, out_axes = in_axes[::-1], out_axes[::-1]
    stack_axes = tuple(stack_order)
    w, a, b, scale = random_lora(
        rng, old_shape, in_axes, out_axes, stack_axes, n_adapters=n, rank=rank
    )
    idx = random_indices(rng, (2,), n)
    nfirst, nsecond = (in_new, out_new) if in_first else (out_new, in_new)
    new_shape = stack + nfirst + nsecond
    new_in = (
        range(ns, ns + len(in_new))
        if in_first
        else range(ns + len(out_new), len(new_shape))
    )
    new_in = tuple(new_in)
    # Activation (*stack, B, *in_new), stack axes as dot_general batch dims.
    x = rng.standard_normal(stack + (2,) + in_new).astype(np.float32)
    dn = (
        (tuple(range(ns + 1, ns + 1 + len(in_new))), new_in),
        (tuple(range(ns)), tuple(range(ns))),
    )
    f = jax.jit(
        lx.quaxify(lambda W, x: jax.lax.dot_general(x, W.reshape(new_shape), dn))
    )
    out = f(_lora(w, a, b, scale, idx, in_axes, out_axes, stack_axes), x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, in_axes, out_axes, stack_axes)
    w_abs = dense_weight_per_example(
        w, a, b, scale, idx, in_axes, out_axes, stack_axes, abs_weight=True
    )
    w_e = w_e.reshape((2,) + new_shape)
    w_abs = w_abs.reshape((2,) + new_shape)
    expected = reference_dot_general(x, w_e, dn, False, 1)
    mag = reference_dot_general(np.abs(x), w_abs, dn, False, 1)
    assert_close_to_reference(out, expected, mag)


@pytest.mark.parametrize("stack_shape", [(2, 3), (2, 2)], ids=["distinct", "equal"])
def test_reshape_keeps_stack_axes_order(stack_shape):
    """Regression: stack_axes listed out of order, e.g. (1, 0), survive a reshape of
    the out group (the factors' leading axes follow `stack_axes`' order)."""
    rng = np.random.default_rng(15)
    l0, l1 = stack_shape
    d, f = 4, 6
    shape = (l0, l1, d, f)
    w, a, b, scale = random_lora(rng, shape, (2,), (3,), (1, 0), n_adapters=2, rank=2)
    idx = np.array([1, 0, -1], np.int32)
    x = rng.standard_normal((l0, l1, 3, d)).astype(np.float32)
    dn = (((3,), (2,)), ((0, 1), (0, 1)))
    f_ = jax.jit(
        lx.quaxify(lambda W, x: jax.lax.dot_general(x, W.reshape(l0, l1, d, 2, 3), dn))
    )
    out = f_(_lora(w, a, b, scale, idx, 2, 3, (1, 0)), x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (2,), (3,), (1, 0))
    w_abs = dense_weight_per_example(
        w, a, b, scale, idx, (2,), (3,), (1, 0), abs_weight=True
    )
    new = (3, l0, l1, d, 2, 3)
    expected = reference_dot_general(x, w_e.reshape(new), dn, False, 1)
    mag = reference_dot_general(np.abs(x), w_abs.reshape(new), dn, False, 1)
    assert_close_to_reference(out, expected, mag)


def test_dense_general_merge_heads():
    """(D, N, H) -> (D, N*H) as Flax's DenseGeneral does, then `x @ W`."""
    rng = np.random.default_rng(5)
    d, n_heads, h = 4, 3, 2
    w, a, b, scale = random_lora(
        rng, (d, n_heads, h), (0,), (1, 2), n_adapters=3, rank=2
    )
    idx = np.array([2, 0, -1], np.int32)
    x = rng.standard_normal((3, 5, d)).astype(np.float32)
    f = jax.jit(lx.quaxify(lambda W, x: x @ W.reshape(d, n_heads * h)))
    out = f(_lora(w, a, b, scale, idx, 0, (1, 2)), x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (0,), (1, 2))
    w_abs = dense_weight_per_example(w, a, b, scale, idx, (0,), (1, 2), abs_weight=True)
    expected = np.einsum("btd,bdf->btf", x, w_e.reshape(3, d, -1))
    mag = np.einsum("btd,bdf->btf", np.abs(x), w_abs.reshape(3, d, -1))
    assert_close_to_reference(out, expected, mag)


def test_reshape_merges_in_axes():
    """(N, H, D) with in = (N, H) -> (N*H, D), then `x @ W` over the merged axis."""
    rng = np.random.default_rng(16)
    n_heads, h, d = 3, 2, 4
    w, a, b, scale = random_lora(
        rng, (n_heads, h, d), (1, 0), (2,), n_adapters=2, rank=3
    )
    idx = np.array([[1, -1], [0, 1], [1, 1]], np.int32)  # per token
    x = rng.standard_normal((3, 2, n_heads * h)).astype(np.float32)
    f = jax.jit(lx.quaxify(lambda W, x: x @ W.reshape(n_heads * h, d)))
    out = f(_lora(w, a, b, scale, idx, (1, 0), 2), x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (1, 0), (2,))
    w_abs = dense_weight_per_example(w, a, b, scale, idx, (1, 0), (2,), abs_weight=True)
    expected = np.einsum("bte,bted->btd", x, w_e.reshape(3, 2, -1, d))
    mag = np.einsum("bte,bted->btd", np.abs(x), w_abs.reshape(3, 2, -1, d))
    assert_close_to_reference(out, expected, mag)


def test_reshape_mixing_groups_is_refused():
    rng = np.random.default_rng(6)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=2)
    lora = _lora(w, a, b, scale, np.array([0, 1], np.int32), 0, 1)
    with pytest.raises(lx.UnsupportedOperationError) as info:
        lx.quaxify(lambda W: W.reshape(12))(lora)
    msg = str(info.value)
    assert "mix" in msg and "allow_materialise" in msg
    with pytest.raises(lx.UnsupportedOperationError, match="mix"):
        lx.quaxify(lambda W: W.reshape(6, 2))(lora)


def test_reshape_merging_stack_axis_is_refused():
    rng = np.random.default_rng(6)
    w, a, b, scale = random_lora(
        rng, (2, 3, 4, 5), (2,), (3,), (0, 1), n_adapters=2, rank=2
    )
    lora = _lora(w, a, b, scale, np.array([0, 1], np.int32), 2, 3, (0, 1))
    with pytest.raises(lx.UnsupportedOperationError, match="layer-stack"):
        lx.quaxify(lambda W: W.reshape(6, 4, 5))(lora)


# -- copy -------------------------------------------------------------------------


def test_copy_is_identity():
    rng = np.random.default_rng(9)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=2)
    idx = np.array([1, -1, 0], np.int32)
    lora = _lora(w, a, b, scale, idx, 0, 1)
    jaxpr = jax.make_jaxpr(lx.quaxify(lambda W: jnp.copy(W)))(jnp.asarray(w))
    assert any(e.primitive.name == "copy" for e in jaxpr.eqns), jaxpr  # it is `copy_p`
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    out = jax.jit(lx.quaxify(lambda W, x: x @ jnp.copy(W)))(lora, x)
    _check_einsum("btd,df->btf", x, w, a, b, scale, idx, (0,), (1,), out)
    copied = lx.quaxify(jnp.copy)(lora)
    assert isinstance(copied, lx.BatchedLoraArray)


def test_chained_layout_ops_under_jit():
    """transpose -> astype(f32) -> reshape -> copy, then einsum, all low-rank."""
    rng = np.random.default_rng(10)
    n_heads, h, d = 2, 4, 8
    # Stored as (N*H, D) "out, in"; the model uses it as (D, N, H).
    w, a, b, scale = random_lora(
        rng, (n_heads * h, d), (1,), (0,), n_adapters=3, rank=2
    )
    idx = np.array([0, 2, -1], np.int32)
    x = rng.standard_normal((3, 2, d)).astype(np.float32)

    def f(W, x):
        k = jnp.copy(W.T.astype(jnp.float32).reshape(d, n_heads, h))
        return jnp.einsum("btd,dnh->btnh", x, k)

    lora = _lora(w, a, b, scale, idx, 1, 0)
    out = jax.jit(lx.quaxify(f))(lora, x)
    jaxpr = jax.make_jaxpr(lx.quaxify(f))(lora, x)
    assert largest_intermediate(jaxpr) < idx.size * w.size
    w_e = dense_weight_per_example(w, a, b, scale, idx, (1,), (0,))
    w_abs = dense_weight_per_example(w, a, b, scale, idx, (1,), (0,), abs_weight=True)
    w_e = np.swapaxes(w_e, 1, 2).reshape(3, d, n_heads, h)
    w_abs = np.swapaxes(w_abs, 1, 2).reshape(3, d, n_heads, h)
    expected = np.einsum("btd,bdnh->btnh", x, w_e)
    mag = np.einsum("btd,bdnh->btnh", np.abs(x), w_abs)
    assert_close_to_reference(out, expected, mag)


# -- slice, split, squeeze: sub-weights keep the low-rank form ---------------------


def _axis_slice(draw, size):
    lo = draw(st.integers(0, size - 1))
    hi = draw(st.integers(lo + 1, size))
    step = draw(st.integers(1, 2))
    return slice(lo, hi, step)


@st.composite
def slice_cases(draw):
    seed = draw(seeds)
    n_layers, d, f = draw(small), draw(st.integers(2, 5)), draw(st.integers(2, 5))
    layer = draw(st.integers(0, n_layers - 1))
    rows, cols = _axis_slice(draw, d), _axis_slice(draw, f)
    n, rank = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return seed, (n_layers, d, f), layer, rows, cols, n, rank


@given(slice_cases())
def test_slices_of_a_stacked_weight_match_reference(case):
    """`x @ W[layer, rows, cols]`: a stack index (slice + squeeze) and strided
    slices of the in- and out-axes, against slicing the dense per-example weight."""
    seed, shape, layer, rows, cols, n, rank = case
    rng = np.random.default_rng(seed)
    w, a, b, scale = random_lora(rng, shape, (1,), (2,), (0,), n_adapters=n, rank=rank)
    idx = random_indices(rng, (3,), n)
    d_in = len(range(shape[1])[rows])
    x = rng.standard_normal((3, 2, d_in)).astype(np.float32)
    lora = _lora(w, a, b, scale, idx, (1,), (2,), (0,))
    out = jax.jit(lx.quaxify(lambda W, x: x @ W[layer, rows, cols]))(lora, x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (1,), (2,), (0,))
    w_abs = dense_weight_per_example(
        w, a, b, scale, idx, (1,), (2,), (0,), abs_weight=True
    )
    sub = (slice(None), layer, rows, cols)
    x64 = np.asarray(x, np.float64)
    expected = np.einsum("etd,edf->etf", x64, w_e[sub])
    mag = np.einsum("etd,edf->etf", np.abs(x64), w_abs[sub])
    assert_close_to_reference(out, expected, mag)


@pytest.mark.parametrize("axis", [0, 1])
def test_split_fused_kernel_matches_reference(axis):
    """A fused QKV kernel split with `jnp.split` (on the out axis, or the in axis)
    gives three adapted weights, each equal to the split of the dense weight."""
    rng = np.random.default_rng(5 + axis)
    w, a, b, scale = random_lora(rng, (6, 9), (0,), (1,), n_adapters=3, rank=2)
    idx = np.array([2, -1, 0, 1], np.int32)
    x = rng.standard_normal((4, 3, 6)).astype(np.float32)
    lora = _lora(w, a, b, scale, idx, (0,), (1,))

    def f(W, x):
        parts = jnp.split(W, 3, axis=axis)
        if axis == 1:
            return jnp.concatenate([x @ p for p in parts], axis=-1)
        return sum(x[..., 2 * j : 2 * j + 2] @ p for j, p in enumerate(parts))

    out = jax.jit(lx.quaxify(f))(lora, x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, (0,), (1,))
    ref = np.stack([np.asarray(f(jnp.asarray(w_e[e]), x[e])) for e in range(4)])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)
    # Not the base model's answer: the adapters matter at this tolerance.
    base = np.stack([np.asarray(f(jnp.asarray(w), x[e])) for e in range(4)])
    assert np.max(np.abs(base - ref)) > 1e-2


def test_squeezing_the_only_input_axis_is_refused():
    rng = np.random.default_rng(9)
    w, a, b, scale = random_lora(rng, (1, 4), (0,), (1,), n_adapters=2, rank=2)
    lora = _lora(w, a, b, scale, np.array([0, 1], np.int32), (0,), (1,))
    with pytest.raises(lx.UnsupportedOperationError, match="no input"):
        lx.quaxify(lambda W: jnp.squeeze(W, 0))(lora)
