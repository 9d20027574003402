"""Construction, validation and the error messages of `BatchedLoraArray`."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from tests.helpers import (
    dense_weight_per_example,
    draw_axes,
    draw_roles,
    factor_shapes_ref,
    largest_intermediate,
    make_lora as _make,
    random_lora,
)

# -- valid construction ------------------------------------------------------------


@st.composite
def layouts(draw):
    ndim = draw(st.integers(2, 4))
    roles = draw_roles(draw, ndim)
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    return shape, *draw_axes(draw, roles)


@given(layouts(), st.integers(1, 5), st.integers(1, 6))
def test_valid_construction(layout, n, rank):
    shape, in_axes, out_axes, stack_axes = layout
    lora, (w, a, b, scale) = _make(shape, in_axes, out_axes, stack_axes, n, rank)
    ndim = len(shape)
    assert lora.shape == shape and lora.dtype == jnp.float32
    assert lora.n_adapters == n and lora.rank == rank
    # Axes are normalised to non-negative, order preserved.
    assert lora.in_axes == tuple(ax % ndim for ax in in_axes)
    assert lora.out_axes == tuple(ax % ndim for ax in out_axes)
    assert lora.stack_axes == tuple(ax % ndim for ax in stack_axes)
    assert lora.indices is None
    # A scalar scale broadcasts to one per adapter.
    lora2 = lora.replace(scale=0.5)
    assert lora2.scale.shape == (n,)
    np.testing.assert_array_equal(np.asarray(lora2.scale), np.full((n,), 0.5))
    # Integer scales become floating point.
    assert jnp.issubdtype(lora.replace(scale=2).scale.dtype, jnp.floating)
    # It is a pytree whose leaves are the arrays.
    leaves = jax.tree.leaves(lora.replace(indices=np.zeros((2,), np.int32)))
    assert len(leaves) == 5


@pytest.mark.parametrize(
    "indices, shape",
    [(0, ()), (-1, ()), ([0, 2, -1], (3,)), ([[0, 1], [2, -1]], (2, 2))],
)
def test_python_indices_become_int32(indices, shape):
    lora, _ = _make(indices=indices)
    assert lora.indices.dtype == jnp.int32
    assert lora.indices.shape == shape
    np.testing.assert_array_equal(np.asarray(lora.indices), np.asarray(indices))


# -- wrong factor shapes -----------------------------------------------------------


@given(
    layouts(),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from(["a", "b", "scale"]),
    st.data(),
)
def test_wrong_factor_shape_names_field_and_expected_shape(
    layout, n, rank, field, data
):
    shape, in_axes, out_axes, stack_axes = layout
    exp_a, exp_b = factor_shapes_ref(shape, in_axes, out_axes, stack_axes, n, rank)
    rng = np.random.default_rng(0)
    w, a, b, scale = random_lora(
        rng, shape, in_axes, out_axes, stack_axes, n_adapters=n, rank=rank
    )
    fields = {"a": a, "b": b, "scale": scale}
    good = fields[field].shape
    dim = data.draw(st.integers(0, len(good) - 1), label="dim")
    bad = list(good)
    bad[dim] += 1
    fields[field] = np.ones(bad, np.float32)
    with pytest.raises(ValueError) as info:
        lx.BatchedLoraArray(
            jnp.asarray(w),
            fields["a"],
            fields["b"],
            scale=fields["scale"],
            in_axes=in_axes,
            out_axes=out_axes,
            stack_axes=stack_axes,
        )
    msg = str(info.value)
    ns = len(stack_axes)
    a_defines_n_or_rank = field == "a" and dim in (ns, len(good) - 1)
    if field == "scale":
        assert f"`scale` has shape {tuple(bad)}" in msg
        assert f"({n},)" in msg
    elif a_defines_n_or_rank:
        # `a` fixes n_adapters and rank, so `b` is the one reported as wrong.
        new_n = bad[ns]
        new_rank = bad[-1]
        _, exp_b2 = factor_shapes_ref(
            shape, in_axes, out_axes, stack_axes, new_n, new_rank
        )
        assert "`b` has shape" in msg and str(exp_b2) in msg, msg
    else:
        expected = exp_a if field == "a" else exp_b
        assert f"`{field}` has shape {tuple(bad)}" in msg, msg
        assert str(expected) in msg, msg


@pytest.mark.parametrize("field", ["a", "b"])
def test_wrong_factor_ndim(field):
    rng = np.random.default_rng(0)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=2)
    kw = {"a": a, "b": b}
    kw[field] = kw[field][0]  # drops the n_adapters axis
    with pytest.raises(ValueError, match=f"`{field}` has shape") as info:
        lx.BatchedLoraArray(jnp.asarray(w), **kw, scale=scale, in_axes=0, out_axes=1)
    assert "expected" in str(info.value)
    if field == "a":
        assert "(*stack, n_adapters, *in, rank)" in str(info.value)


@pytest.mark.parametrize("field", ["w", "a", "b", "scale_int_ok"])
def test_dtypes(field):
    rng = np.random.default_rng(0)
    w, a, b, scale = random_lora(rng, (4, 3), (0,), (1,), n_adapters=2, rank=2)
    kw = dict(w=jnp.asarray(w), a=a, b=b)
    if field == "scale_int_ok":
        lora = lx.BatchedLoraArray(**kw, scale=np.array([1, 2]), in_axes=0, out_axes=1)
        assert jnp.issubdtype(lora.scale.dtype, jnp.floating)
        return
    kw[field] = np.asarray(kw[field]).astype(np.int32)
    with pytest.raises(TypeError, match=f"`{field}` must be floating point"):
        lx.BatchedLoraArray(kw.pop("w"), **kw, scale=scale, in_axes=0, out_axes=1)


def test_w_of_unknown_type():
    with pytest.raises(TypeError, match="`w` must be"):
        lx.BatchedLoraArray(
            [[1.0]],
            np.ones((1, 1, 1)),
            np.ones((1, 1, 1)),
            scale=1.0,
            in_axes=0,
            out_axes=1,
        )


# -- axis partition ----------------------------------------------------------------


@pytest.mark.parametrize(
    "in_axes, out_axes, stack_axes, pattern",
    [
        ((0, 1), (1, 2), (), "axis 1 is in both `in_axes` and `out_axes`"),
        ((0,), (1,), (0,), "axis 0 is in both `in_axes` and `stack_axes`"),
        ((1, 0), (-2, 2), (), "axis 1 is in both `in_axes` and `out_axes`"),  # -2 == 1
        ((0,), (1,), (), r"axes \[2\] of the 3-d weight are in none of"),
        ((), (1, 2), (0,), "`in_axes` is empty"),
        ((0, 1), (), (2,), "`out_axes` is empty"),
        ((0, 3), (1, 2), (), "names axis 3, but the weight has only 3 axes"),
        ((0, 0), (1, 2), (), "names the same axis twice"),
        ((0, -3), (1, 2), (), "names the same axis twice"),
    ],
)
def test_bad_partition(in_axes, out_axes, stack_axes, pattern):
    w = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=pattern):
        lx.BatchedLoraArray(
            w,
            np.ones((1, 2, 1)),
            np.ones((1, 1, 3, 4)),
            scale=1.0,
            in_axes=in_axes,
            out_axes=out_axes,
            stack_axes=stack_axes,
        )


def test_non_int_axes():
    with pytest.raises(TypeError, match="must contain ints"):
        lx.BatchedLoraArray(
            jnp.ones((2, 3)),
            np.ones((1, 2, 1)),
            np.ones((1, 1, 3)),
            scale=1.0,
            in_axes=(0.0,),
            out_axes=1,
        )


# -- indices -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices",
    [
        np.array([0.0, 1.0], np.float32),
        [0.7, 1.2],  # must not be truncated to [0, 1]
        [True, False],
        1.0,
        jnp.array([0.0, 1.0]),
    ],
    ids=["np-float", "list-float", "list-bool", "py-float", "jnp-float"],
)
def test_non_integer_indices(indices):
    with pytest.raises(TypeError, match="integer"):
        _make(indices=indices)


@given(
    n=st.integers(1, 5),
    bad=st.one_of(st.integers(-50, -2), st.integers(0, 50)),
    shape=st.sampled_from([(), (3,), (2, 3)]),
    data=st.data(),
)
def test_out_of_range_index(n, bad, shape, data):
    if 0 <= bad < n:
        bad = n + bad  # make it out of range on the high side
    idx = np.zeros(shape, np.int32)
    if shape:
        pos = data.draw(st.tuples(*(st.integers(0, s - 1) for s in shape)))
        idx[pos] = bad
    else:
        idx = np.int32(bad)
    with pytest.raises(lx.LoraIndexError) as info:
        _make(n=n, indices=idx)
    msg = str(info.value)
    assert f"[-1, {n - 1}]" in msg and str(bad) in msg and f"{n} adapters" in msg
    assert isinstance(info.value, IndexError)
    # `replace` validates again.
    lora, _ = _make(n=n, indices=np.zeros(shape, np.int32))
    with pytest.raises(lx.LoraIndexError):
        lora.replace(indices=idx)


def test_in_range_edges_are_accepted():
    lora, _ = _make(n=3, indices=np.array([-1, 0, 2], np.int32))
    assert lora.indices.shape == (3,)


def test_traced_indices_skip_the_range_check():
    """Under jit the values are unknown; construction must still work."""
    lora, _ = _make(n=2)

    @jax.jit
    def f(idx):
        return lora.replace(indices=idx).indices

    np.testing.assert_array_equal(np.asarray(f(jnp.array([1, -1]))), [1, -1])


# -- errors at use -----------------------------------------------------------------


def test_indices_shape_mismatch_flattened_tokens():
    """(B*T, D) activations with (B,) indices: the message points to per-token
    indices."""
    b, t, d = 3, 4, 5
    lora, _ = _make((d, 2), indices=np.array([0, 1, 2], np.int32))
    x = jnp.ones((b * t, d))
    with pytest.raises(lx.IndicesShapeError) as info:
        lx.quaxify(lambda W, x: x @ W)(lora, x)
    msg = str(info.value)
    assert "per-token" in msg
    assert "(3,)" in msg and str((b * t, d)) in msg
    assert isinstance(info.value, ValueError)


def test_indices_shape_mismatch_too_many_index_axes():
    lora, _ = _make((5, 2), indices=np.zeros((2, 3), np.int32))
    with pytest.raises(lx.IndicesShapeError, match="must equal the indices' shape"):
        lx.quaxify(lambda W, x: x @ W)(lora, jnp.ones((2, 5)))


def test_unset_indices():
    lora, _ = _make((5, 2))
    with pytest.raises(ValueError, match="with_indices"):
        lx.quaxify(lambda W, x: x @ W)(lora, jnp.ones((2, 5)))


UNSUPPORTED = [
    ("reduce_sum", lambda W: jnp.sum(W)),
    ("mul", lambda W: W * W),
    ("exp", lambda W: jnp.exp(W)),
    ("add", lambda W: W + 1.0),
]


@pytest.mark.parametrize("name, fn", UNSUPPORTED, ids=[n for n, _ in UNSUPPORTED])
def test_unsupported_operation(name, fn):
    lora, _ = _make(indices=np.array([0, 1], np.int32))
    with pytest.raises(lx.UnsupportedOperationError) as info:
        lx.quaxify(fn)(lora)
    msg = str(info.value)
    assert re.search(rf"`{name}`", msg), msg
    assert "allow_materialise" in msg
    assert isinstance(info.value, NotImplementedError)


@pytest.mark.parametrize("name, fn", UNSUPPORTED, ids=[n for n, _ in UNSUPPORTED])
def test_unsupported_operation_materialised_with_scalar_index(name, fn):
    """With allow_materialise and a scalar index, the op sees the dense weight."""
    lora, (w, a, b, scale) = _make(indices=2, allow_materialise=True)
    dense = dense_weight_per_example(w, a, b, scale, np.array(2), (0,), (1,))
    out = jax.jit(lx.quaxify(fn))(lora)
    expected = fn(jnp.asarray(dense, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5)


def test_unsupported_operation_materialise_refuses_per_example_indices():
    lora, _ = _make(indices=np.array([0, 1], np.int32), allow_materialise=True)
    with pytest.raises(lx.UnsupportedOperationError, match="per-example") as info:
        lx.quaxify(lambda W: jnp.sum(W))(lora)
    assert "reduce_sum" in str(info.value)


def test_contracting_the_out_axis_stays_low_rank():
    """`x @ W.T` contracts W's out-axis (a tied output head, `h @ E.T`): A and B
    swap roles and the product is still low rank, equal to the reference."""
    lora, (w, a, b, scale) = _make((5, 3), n=3, indices=np.array([0, -1, 2], np.int32))
    x = np.random.default_rng(1).normal(size=(3, 2, 3))
    out = jax.jit(lx.quaxify(lambda W, x: x @ W.T))(lora, jnp.asarray(x, jnp.float32))
    dense = dense_weight_per_example(w, a, b, scale, np.array([0, -1, 2]), (0,), (1,))
    expected = np.einsum("bto,bio->bti", x, dense)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
    jaxpr = jax.make_jaxpr(lx.quaxify(lambda W, x: x @ W.T))(lora, jnp.ones((3, 2, 3)))
    assert largest_intermediate(jaxpr) < 3 * w.size


def test_contracting_in_and_out_axes_together_is_refused():
    """A contraction over part of the in-group and part of the out-group is not a
    low-rank product: refused, naming the axes and the opt-in."""
    lora, _ = _make((4, 3, 2), (0, 1), (2,), indices=np.array([0, 1], np.int32))
    x = jnp.ones((2, 4, 2))
    f = lambda W, x: jax.lax.dot_general(x, W, (((1, 2), (0, 2)), ((), ())))  # noqa: E731
    with pytest.raises(lx.UnsupportedOperationError) as info:
        lx.quaxify(f)(lora, x)
    msg = str(info.value)
    assert "allow_materialise" in msg and "contracts axes (0, 2)" in msg


def test_stack_axis_contracted_is_refused():
    """A stack axis may be a batch axis of the dot_general or stay free (a fused
    kernel, tests/test_fused_qkv.py), but contracting it mixes the stack's
    adapters: refused, naming the layout."""
    lora, _ = _make((2, 5, 3), (1,), (2,), (0,), indices=np.array([0, 1], np.int32))
    x = jnp.ones((2, 2))
    f = lambda W, x: jax.lax.dot_general(x, W, (((1,), (0,)), ((), ())))  # noqa: E731
    with pytest.raises(lx.UnsupportedOperationError, match=r"stack ax"):
        lx.quaxify(f)(lora, x)


def test_two_lora_arrays_cannot_be_multiplied():
    lora, _ = _make((4, 4), indices=np.array([0, 1], np.int32))
    with pytest.raises(lx.UnsupportedOperationError, match="two BatchedLoraArrays"):
        lx.quaxify(lambda A, B: A @ B)(lora, lora)


def test_materialise_refused_by_default():
    lora, _ = _make(indices=1)
    with pytest.raises(lx.UnsupportedOperationError, match="allow_materialise=True"):
        lora.materialise()
