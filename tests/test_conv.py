"""Convolutions with an adapted kernel (`lax.conv_general_dilated`, PEFT's conv LoRA).

The reference never calls into `lorax_arrays`: every row's kernel
`W_e = W + s_i · einsum(A_i, B_i)` is merged in float64 NumPy (`W_e = W` for
`i == -1`), and the row alone is convolved with it by `lax.conv_general_dilated` in
float64 (`jax.enable_x64`). Results are compared relative to the magnitude bound
(the same conv of `|x|` with `|W| + |s| Σ_r |A| |B|`), as in tests/helpers.py.
A and B are random and non-zero.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax import lax

import lorax_arrays as lx
from tests.helpers import (
    RTOL_BF16,
    RTOL_F32,
    assert_close_to_reference,
    nonzero,
    walk_eqns,
)
from tests.model_helpers import (
    F32_TOL,
    assert_adapters_matter,
    per_row_reference,
    randomize,
    vmap_styles,
    weight_delta,
)

# `Module.sow` outside `nnx.capture` warns (DeprecationWarning) in Flax 0.12.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --- the reference -------------------------------------------------------------


def merged_kernels(w, a, b, scale, idx, in_axes, out_axes, *, abs_weight=False):
    """float64 `(*idx.shape, *w.shape)`: each row's `w + s_i · einsum(a_i, b_i)`."""
    w, a, b, scale = (np.asarray(v, np.float64) for v in (w, a, b, scale))
    if abs_weight:
        w, a, b, scale = np.abs(w), np.abs(a), np.abs(b), np.abs(scale)
    nd = w.ndim
    letters = "abcdefgh"[:nd]
    ins = "".join(letters[ax % nd] for ax in in_axes)
    outs = "".join(letters[ax % nd] for ax in out_axes)
    delta = np.einsum(f"n{ins}r,nr{outs}->n{letters}", a, b)  # (n, *w.shape)
    idx = np.asarray(idx)
    s = np.where(idx >= 0, scale[np.clip(idx, 0, None)], 0.0)
    d = delta[np.clip(idx, 0, None)] * s.reshape(s.shape + (1,) * nd)
    return w + d


def conv_rows(x, kernels, conv, lhs_batch: int, out_batch: int):
    """Row `e` of `x` (along its batch axis) convolved alone with `kernels[e]`, in
    float64, stacked along the output's batch axis."""
    with jax.enable_x64(True):
        rows = []
        for e in range(x.shape[lhs_batch]):
            xe = np.take(np.asarray(x, np.float64), [e], axis=lhs_batch)
            rows.append(np.asarray(conv(jnp.asarray(kernels[e]), jnp.asarray(xe))))
        return np.concatenate(rows, axis=out_batch)


# --- random convolutions ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvCase:
    nd: int
    lhs_spec: tuple[int, ...]
    rhs_spec: tuple[int, ...]
    out_spec: tuple[int, ...]
    in_axes: tuple[int, ...]  # the kernel's (any order, maybe negative)
    out_axes: tuple[int, ...]
    w_shape: tuple[int, ...]
    x_shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    n_adapters: int
    rank: int
    indices: tuple[int, ...] | int  # per example, or one (scalar) for all
    seed: int

    @property
    def batch(self) -> int:
        return self.x_shape[self.lhs_spec[0]]

    def conv(self, w, x, **kw):
        return lax.conv_general_dilated(
            x,
            w,
            self.strides,
            self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            dimension_numbers=lax.ConvDimensionNumbers(
                self.lhs_spec, self.rhs_spec, self.out_spec
            ),
            **kw,
        )

    def arrays(self):
        rng = np.random.default_rng(self.seed)
        fan_in = math.prod(self.w_shape) // self.w_shape[self.rhs_spec[0]]
        ins = tuple(self.w_shape[ax] for ax in self.in_axes)
        outs = tuple(self.w_shape[ax] for ax in self.out_axes)
        n, r = self.n_adapters, self.rank
        w = nonzero(rng, self.w_shape) / np.float32(np.sqrt(fan_in))
        a = nonzero(rng, (n, *ins, r)) / np.float32(np.sqrt(fan_in))
        b = nonzero(rng, (n, r, *outs)) / np.float32(np.sqrt(r))
        scale = nonzero(rng, (n,), 0.5, 2.0)
        x = nonzero(rng, self.x_shape)
        return w, a, b, scale, x

    def lora(self, w, a, b, scale, indices, **kw):
        return lx.BatchedLoraArray(
            jnp.asarray(w),
            a,
            b,
            scale=scale,
            indices=indices,
            in_axes=self.in_axes,
            out_axes=self.out_axes,
            **kw,
        )

    def row_indices(self) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.indices, np.int32), (self.batch,))

    def reference(self, w, a, b, scale, x, idx=None):
        """float64 `(expected, magnitude)` with row `e` using adapter `idx[e]`."""
        idx = self.row_indices() if idx is None else idx
        args = (w, a, b, scale, idx, self.in_axes, self.out_axes)
        lb, ob = self.lhs_spec[0], self.out_spec[0]
        expected = conv_rows(x, merged_kernels(*args), self.conv, lb, ob)
        w_abs = merged_kernels(*args, abs_weight=True)
        mag = conv_rows(np.abs(x), w_abs, self.conv, lb, ob)
        return expected, mag


def _specs(draw, nd: int, convention: str):
    spatial = tuple(range(2, nd + 2))
    if convention == "channels_last":  # Flax: NHWC, HWIO, NHWC
        lhs = (0, nd + 1, *range(1, nd + 1))
        return lhs, (nd + 1, nd, *range(nd)), lhs
    if convention == "channels_first":  # Equinox: NCHW, OIHW, NCHW
        return (0, 1, *spatial), (0, 1, *spatial), (0, 1, *spatial)
    perm = lambda: tuple(draw(st.permutations(range(nd + 2))))  # noqa: E731
    return perm(), perm(), perm()


@st.composite
def conv_cases(draw, scalar_indices=None):
    nd = draw(st.integers(1, 3))
    convention = draw(st.sampled_from(["channels_last", "channels_first", "any"]))
    lhs_spec, rhs_spec, out_spec = _specs(draw, nd, convention)
    small = 2 if nd == 3 else 3  # keep 3-D convolutions tiny
    kernel = [draw(st.integers(1, small)) for _ in range(nd)]
    strides = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = draw(
        st.one_of(
            st.sampled_from(["SAME", "VALID"]),
            st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * nd),
        )
    )
    # lax takes string padding only without input (lhs) dilation.
    lhs_max = 1 if isinstance(padding, str) else 2
    lhs_dil = tuple(draw(st.integers(1, lhs_max)) for _ in range(nd))
    rhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    # Inputs at least as large as the dilated kernel, so VALID has an output.
    spatial = [
        -(-((k - 1) * rd) // ld) + 1 + draw(st.integers(0, small))
        for k, ld, rd in zip(kernel, lhs_dil, rhs_dil)
    ]
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    batch = draw(st.integers(1, 4))
    w_shape = [0] * (nd + 2)
    w_shape[rhs_spec[0]], w_shape[rhs_spec[1]] = c_out, c_in
    x_shape = [0] * (nd + 2)
    x_shape[lhs_spec[0]], x_shape[lhs_spec[1]] = batch, c_in
    for i in range(nd):
        w_shape[rhs_spec[2 + i]] = kernel[i]
        x_shape[lhs_spec[2 + i]] = spatial[i]
    # The layout: spatial axes and in-features in any order (A's axes follow it),
    # some spelled negative.
    ins = draw(st.permutations(rhs_spec[1:]))
    neg = draw(st.lists(st.booleans(), min_size=nd + 1, max_size=nd + 1))
    in_axes = tuple(ax - (nd + 2) if s else ax for ax, s in zip(ins, neg))
    out_axes = (rhs_spec[0] - (nd + 2) if draw(st.booleans()) else rhs_spec[0],)
    n = draw(st.integers(1, 4))
    scalar = draw(st.booleans()) if scalar_indices is None else scalar_indices
    if scalar:
        indices = draw(st.integers(-1, n - 1))
    else:
        indices = tuple(
            draw(st.lists(st.integers(-1, n - 1), min_size=batch, max_size=batch))
        )
    return ConvCase(
        nd=nd,
        lhs_spec=lhs_spec,
        rhs_spec=rhs_spec,
        out_spec=out_spec,
        in_axes=in_axes,
        out_axes=out_axes,
        w_shape=tuple(w_shape),
        x_shape=tuple(x_shape),
        strides=strides,
        padding=padding,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        n_adapters=n,
        rank=draw(st.integers(1, 3)),
        indices=indices,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _assert_base_rows_exact(case, out, w, x):
    """Index -1 gives exactly the base conv's output for that row."""
    idx = case.row_indices()
    if not (idx < 0).any():
        return
    base = np.asarray(jax.jit(case.conv)(jnp.asarray(w), jnp.asarray(x)))
    ob = case.out_spec[0]
    rows = np.flatnonzero(idx < 0)
    np.testing.assert_array_equal(
        np.take(np.asarray(out), rows, ob), np.take(base, rows, ob)
    )


@given(conv_cases())
def test_conv_matches_per_row_reference(case: ConvCase):
    w, a, b, scale, x = case.arrays()
    idx = np.asarray(case.indices, np.int32)
    lora = case.lora(w, a, b, scale, idx)
    out = jax.jit(lx.quaxify(case.conv))(lora, x)
    assert out.dtype == jnp.float32
    expected, mag = case.reference(w, a, b, scale, x)
    assert_close_to_reference(out, expected, mag, RTOL_F32)
    _assert_base_rows_exact(case, out, w, x)


@given(conv_cases(scalar_indices=False))
@settings(max_examples=6)
def test_conv_under_vmap_with_scalar_indices(case: ConvCase):
    """`jax.vmap` outside `lx.quaxify`: each example sees its own scalar index and
    a batch of one."""
    w, a, b, scale, x = case.arrays()
    idx = case.row_indices()
    lb, ob = case.lhs_spec[0], case.out_spec[0]
    f = lx.quaxify(case.conv)

    def one(i, xe):
        lora = case.lora(w, a, b, scale, i)
        return jnp.squeeze(f(lora, jnp.expand_dims(xe, lb)), ob)

    out = jax.jit(jax.vmap(one, in_axes=(0, lb), out_axes=ob))(idx, x)
    expected, mag = case.reference(w, a, b, scale, x)
    assert_close_to_reference(out, expected, mag, RTOL_F32)


@given(conv_cases(scalar_indices=False))
@settings(max_examples=5)
def test_conv_gradients_match_dense_reference(case: ConvCase):
    """Gradients w.r.t. A and B of a random projection of the output, against
    `jax.grad` of the float64 per-row computation with the merged kernels."""
    w, a, b, scale, x = case.arrays()
    idx = case.row_indices()
    lb, ob = case.lhs_spec[0], case.out_spec[0]
    ct = np.random.default_rng(1).standard_normal(
        jax.eval_shape(case.conv, jnp.asarray(w), jnp.asarray(x)).shape
    )
    f = lx.quaxify(case.conv)

    def loss(a, b):
        return jnp.sum(f(case.lora(w, a, b, scale, idx), x) * ct.astype(np.float32))

    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)

    nd = len(w.shape)
    letters = "abcdefgh"[:nd]
    ins = "".join(letters[ax % nd] for ax in case.in_axes)
    outs = "".join(letters[ax % nd] for ax in case.out_axes)

    def dense_loss(a, b):  # float64, one row at a time
        total = 0.0
        for e, i in enumerate(idx):
            w_e = jnp.asarray(w, jnp.float64)
            if i >= 0:
                d = jnp.einsum(f"{ins}r,r{outs}->{letters}", a[i], b[i])
                w_e = w_e + scale[i].astype(np.float64) * d
            xe = jnp.take(jnp.asarray(x, jnp.float64), jnp.array([e]), axis=lb)
            ct_e = jnp.take(jnp.asarray(ct), jnp.array([e]), axis=ob)
            total = total + jnp.sum(case.conv(w_e, xe) * ct_e)
        return total

    with jax.enable_x64(True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        ga_ref, gb_ref = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(a64, b64)
        ga_ref, gb_ref = np.asarray(ga_ref), np.asarray(gb_ref)
    for g, g_ref in ((ga, ga_ref), (gb, gb_ref)):
        tol = 1e-4 * max(float(np.abs(g_ref).max()), 1e-3)
        np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=tol)
    # Adapters that no row uses get exactly no gradient.
    used = set(int(i) for i in idx if i >= 0)
    for j in set(range(case.n_adapters)) - used:
        assert not np.asarray(ga[j]).any() and not np.asarray(gb[j]).any()


# --- what is (not) built ------------------------------------------------------------


def _hwio_case(batch=5, n=3, r=2, idx=(0, -1, 2, 1, 0)):
    rng = np.random.default_rng(0)
    w = nonzero(rng, (3, 3, 4, 6)) / 6
    a = nonzero(rng, (n, 3, 3, 4, r)) / 6
    b = nonzero(rng, (n, r, 6))
    scale = nonzero(rng, (n,), 0.5, 2.0)
    x = nonzero(rng, (batch, 7, 7, 4))
    return w, a, b, scale, np.asarray(idx[:batch], np.int32), x


def _flax_conv(w, x, **kw):
    dn = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, **kw)


def _assert_no_per_example_kernel(jaxpr, w_shape, batch):
    w_size = math.prod(w_shape)
    convs = 0
    for eqn in walk_eqns(jaxpr):
        for v in eqn.outvars:
            shape = tuple(getattr(v.aval, "shape", ()))
            assert sorted(shape) != sorted((batch, *w_shape)), (eqn.primitive, shape)
            assert math.prod(shape) != batch * w_size, (eqn.primitive, shape)
        if eqn.primitive is lax.conv_general_dilated_p:
            convs += 1
            assert math.prod(eqn.invars[1].aval.shape) < batch * w_size
    assert convs == 2  # the base conv and the one with the A kernels


def test_no_per_example_kernel_in_jaxpr():
    w, a, b, scale, idx, x = _hwio_case()
    lora = lx.BatchedLoraArray(
        jnp.asarray(w), a, b, scale=scale, indices=idx, in_axes=(0, 1, 2), out_axes=3
    )
    jaxpr = jax.make_jaxpr(lx.quaxify(_flax_conv))(lora, x)
    _assert_no_per_example_kernel(jaxpr, w.shape, len(idx))
    # Under vmap (scalar indices): each example convolves with its own A alone.
    f = lx.quaxify(_flax_conv)

    def one(i, xe):
        lora_e = lx.with_indices(lora, i)
        return f(lora_e, xe[None])[0]

    jaxpr = jax.make_jaxpr(jax.vmap(one))(idx, x)
    _assert_no_per_example_kernel(jaxpr, w.shape, len(idx))


def test_precision_and_preferred_element_type_pass_through():
    w, a, b, scale, idx, x = _hwio_case()
    bf = lambda v: jnp.asarray(v, jnp.bfloat16)  # noqa: E731
    lora = lx.BatchedLoraArray(
        bf(w), bf(a), bf(b), scale=scale, indices=idx, in_axes=(0, 1, 2), out_axes=3
    )
    kw = dict(precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    f = lx.quaxify(lambda w, x: _flax_conv(w, x, **kw))
    out = jax.jit(f)(lora, bf(x))
    assert out.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(f)(lora, bf(x))
    eqns = [
        e
        for e in walk_eqns(jaxpr)
        if e.primitive in (lax.conv_general_dilated_p, lax.dot_general_p)
    ]
    assert len(eqns) == 3  # base conv, A conv, B contraction
    for e in eqns:
        assert e.params["preferred_element_type"] == jnp.float32
        assert e.params["precision"] in (
            lax.Precision.HIGHEST,
            (lax.Precision.HIGHEST, lax.Precision.HIGHEST),
        )
    # Against the float64 reference of the bf16-rounded values.
    w32, a32, b32, x32 = (np.asarray(bf(v), np.float32) for v in (w, a, b, x))
    args = (w32, a32, b32, scale, idx, (0, 1, 2), (3,))
    expected = conv_rows(x32, merged_kernels(*args), _flax_conv, 0, 0)
    mag = conv_rows(
        np.abs(x32), merged_kernels(*args, abs_weight=True), _flax_conv, 0, 0
    )
    assert_close_to_reference(out, expected, mag, RTOL_BF16)


@pytest.mark.parametrize("n", [3, 1])
def test_out_of_range_traced_indices_give_nan_rows(n):
    w, a, b, scale, _, x = _hwio_case(batch=4, n=n)
    idx = np.array([0, n, -1, -3], np.int32)

    @jax.jit
    def run(idx, x):
        lora = lx.BatchedLoraArray(
            jnp.asarray(w),
            a,
            b,
            scale=scale,
            indices=idx,
            in_axes=(0, 1, 2),
            out_axes=3,
        )
        return lx.quaxify(_flax_conv)(lora, x)

    out = np.asarray(run(idx, x))
    assert np.isnan(out[[1, 3]]).all()
    good = np.array([0, 0, -1, -1], np.int32)  # rows 1 and 3 not compared
    args = (w, a, b, scale, good, (0, 1, 2), (3,))
    expected = conv_rows(x, merged_kernels(*args), _flax_conv, 0, 0)
    mag = conv_rows(np.abs(x), merged_kernels(*args, abs_weight=True), _flax_conv, 0, 0)
    rows = [0, 2]
    assert_close_to_reference(out[rows], expected[rows], mag[rows], RTOL_F32)


# --- errors -------------------------------------------------------------------


def _lora(layout=((0, 1, 2), (3,)), indices=(0, 1), shape=(3, 3, 4, 6), **kw):
    rng = np.random.default_rng(0)
    ins, outs = layout
    in_shape = tuple(shape[ax] for ax in ins)
    out_shape = tuple(shape[ax] for ax in outs)
    return lx.BatchedLoraArray(
        jnp.asarray(nonzero(rng, shape)),
        nonzero(rng, (2, *in_shape, 2)),
        nonzero(rng, (2, 2, *out_shape)),
        scale=1.0,
        indices=indices,
        in_axes=ins,
        out_axes=outs,
        **kw,
    )


@pytest.mark.parametrize("groups", ["feature", "batch"])
def test_grouped_convolutions_are_refused(groups):
    # Feature groups: 4 input features in 2 groups of 2; batch groups: 2
    # examples in 2 groups, each its own half of the 6 output features.
    lora = _lora(shape=(3, 3, 2, 6))
    x = np.random.default_rng(1).standard_normal(
        (2, 5, 5, 4 if groups == "feature" else 2)
    )
    x = x.astype(np.float32)
    count = {f"{groups}_group_count": 2}
    conv = lambda w, x: _flax_conv(w, x, **count)  # noqa: E731
    with pytest.raises(lx.UnsupportedOperationError, match=f"{groups}_group_count=2"):
        lx.quaxify(conv)(lora, x)
    # Opted in, with one adapter for the call: the dense kernel.
    lora = lora.replace(indices=1, allow_materialise=True)
    out = lx.quaxify(conv)(lora, x)
    expected = conv(
        jnp.asarray(
            merged_kernels(lora.w, lora.a, lora.b, lora.scale, 1, (0, 1, 2), (3,)),
            jnp.float32,
        ),
        x,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layout",
    [
        ((0, 1), (2, 3)),  # the in-feature axis as an out-axis
        ((2, 3), (0, 1)),  # spatial axes as out-axes
        ((0, 1, 3), (2,)),  # in- and out-features swapped
    ],
)
def test_a_layout_that_is_not_conv_lora_is_refused(layout):
    lora = _lora(layout)
    x = jnp.ones((2, 5, 5, 4))
    with pytest.raises(lx.UnsupportedOperationError) as err:
        lx.quaxify(_flax_conv)(lora, x)
    msg = str(err.value)
    assert "in_axes=(0, 1, 2), out_axes=(3,)" in msg
    assert "out_axes=3)" in msg  # the LoraRule to write
    assert f"in_axes={layout[0]}" in msg


def test_a_wrong_layout_materialises_when_opted_in_with_scalar_indices():
    layout = ((0, 1), (2, 3))
    lora = _lora(layout, indices=1, allow_materialise=True)
    x = np.asarray(np.random.default_rng(1).standard_normal((2, 5, 5, 4)), np.float32)
    out = lx.quaxify(_flax_conv)(lora, x)
    w_1 = merged_kernels(lora.w, lora.a, lora.b, lora.scale, np.array([1, 1]), *layout)
    expected = conv_rows(x, w_1, _flax_conv, 0, 0)
    mag = conv_rows(
        np.abs(x),
        merged_kernels(
            lora.w,
            lora.a,
            lora.b,
            lora.scale,
            np.array([1, 1]),
            *layout,
            abs_weight=True,
        ),
        _flax_conv,
        0,
        0,
    )
    assert_close_to_reference(out, expected, mag, RTOL_F32)
    with pytest.raises(lx.UnsupportedOperationError, match="per-example indices"):
        lx.quaxify(_flax_conv)(lora.replace(indices=np.array([0, 1])), x)


def test_adapted_input_is_refused():
    lora = _lora()
    with pytest.raises(lx.UnsupportedOperationError, match="only be the\\s+kernel"):
        lx.quaxify(lambda w, k: _flax_conv(k, w))(lora, jnp.ones((3, 3, 3, 4)))
    with pytest.raises(lx.UnsupportedOperationError, match="two BatchedLoraArrays"):
        lx.quaxify(lambda w, k: _flax_conv(k, w))(lora, lora)


def test_indices_that_do_not_label_the_batch_are_refused():
    lora = _lora(indices=(0, 1, 0))
    with pytest.raises(lx.IndicesShapeError, match=r"free axes \(2, 5, 5\)"):
        lx.quaxify(_flax_conv)(lora, jnp.ones((2, 5, 5, 4)))


# --- models -------------------------------------------------------------------

IDX = np.array([0, 2, -1, 1, 2])
RANKS = (2, 3, 4)


def _stack(model, rules, seed=0, std=0.3):
    """Adapters of ranks RANKS with random non-zero A and B."""
    adapters = [
        randomize(
            lx.init_adapter(model, rules(r), key=jax.random.PRNGKey(seed + j)), j, std
        )
        for j, r in enumerate(RANKS)
    ]
    return lx.stack_adapters(adapters)


class EqxCNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, 6, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(6, 4, 3, stride=2, dilation=1, key=k2)
        self.head = eqx.nn.Linear(4, 5, key=k3)

    def __call__(self, x):  # (C, H, W): one example
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        return self.head(h.mean((1, 2)))


def eqx_rules(r):
    # Equinox kernels are (O, I, kh, kw): the out-feature axis is 0.
    return [
        lx.LoraRule(r"conv\d/weight", rank=r, alpha=2 * r, out_axes=0),
        lx.LoraRule(r"head/weight", rank=r),
    ]


def test_equinox_cnn_both_vmap_styles():
    model = EqxCNN(jax.random.PRNGKey(0))
    stack = _stack(model, eqx_rules)
    served = lx.loraify(model, stack, jnp.asarray(IDX))
    xs = jax.random.normal(jax.random.PRNGKey(1), (len(IDX), 3, 8, 8))
    run_one = eqx.filter_jit(lambda m, x: m(x))
    want = per_row_reference(model, stack, IDX, run_one, xs)
    base = per_row_reference(model, stack, -np.ones_like(IDX), run_one, xs)
    assert_adapters_matter(want, base, IDX, atol=F32_TOL["atol"])
    outside, inside = vmap_styles(lambda m, x: m(x))
    np.testing.assert_allclose(outside(served, xs), want, **F32_TOL)
    np.testing.assert_allclose(inside(served, xs, jnp.asarray(IDX)), want, **F32_TOL)


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(6, 4, (3, 3), strides=2, padding="VALID", rngs=rngs)
        self.head = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x):  # (B, H, W, C)
        h = nnx.relu(self.conv1(x))
        h = nnx.relu(self.conv2(h))
        return self.head(h.mean((1, 2)))


def nnx_rules(r):
    # Flax kernels are (kh, kw, I, O): the out-feature axis is the last.
    return [
        lx.LoraRule(r"conv\d/kernel", rank=r, alpha=2 * r, out_axes=-1),
        lx.LoraRule(r"head/kernel", rank=r),
    ]


def nnx_merged(module, adapter: lx.Adapter):
    """A clone of `module` with `w + s · a b` merged in float64 NumPy."""
    layouts = {lay.path: lay for lay in adapter.layouts}
    updates = []
    for path, var in nnx.to_flat_state(nnx.state(module)):
        key = "/".join(map(str, path)) + "/value"
        if key in adapter.weights:
            a, b = (np.asarray(v, np.float64) for v in adapter.weights[key])
            w = np.asarray(var[...], np.float64)
            merged = w + adapter.scale(key) * weight_delta(a, b, layouts[key])
            updates.append((path, jnp.asarray(merged.astype(np.float32))))
    assert len(updates) == len(adapter.weights)
    ref = nnx.clone(module)
    nnx.update(ref, nnx.from_flat_state(updates))
    return ref


def nnx_reference(module, stack, idx, x, call=lambda m, x: m(x)):
    run = jax.jit(call)
    models = {}
    rows = []
    for e, i in enumerate(np.asarray(idx)):
        i = int(i)
        if i not in models:
            models[i] = module if i < 0 else nnx_merged(module, stack[i])
        rows.append(np.asarray(run(models[i], x[e : e + 1]))[0])
    return np.stack(rows)


def test_flax_nnx_cnn_batched_forward():
    model = NnxCNN(nnx.Rngs(0))
    stack = _stack(model, nnx_rules)
    served = lx.loraify(model, stack, jnp.asarray(IDX))
    x = jax.random.normal(jax.random.PRNGKey(1), (len(IDX), 8, 8, 3))
    out = jax.jit(lx.quaxify(lambda m, x: m(x)))(served, x)
    want = nnx_reference(model, stack, IDX, x)
    base = np.asarray(model(x))
    assert_adapters_matter(want, base, IDX, atol=F32_TOL["atol"])
    np.testing.assert_allclose(out, want, **F32_TOL)


class PatchEmbed(nnx.Module):
    """A ViT's patch embedding (a conv with stride == kernel size) and a linear
    layer on the tokens."""

    def __init__(self, rngs, patch=4, dim=6):
        self.proj = nnx.Conv(
            3, dim, (patch, patch), strides=patch, padding="VALID", rngs=rngs
        )
        self.mlp = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x):  # (B, H, W, 3) -> (B, T, dim)
        h = self.proj(x)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        return self.mlp(nnx.gelu(h))


def vit_rules(r):
    return [
        lx.LoraRule(r"proj/kernel", rank=r, out_axes=-1),
        lx.LoraRule(r"mlp/kernel", rank=r),
    ]


def test_vit_patch_embedding_per_sequence_and_per_patch_indices():
    model = PatchEmbed(nnx.Rngs(0))
    stack = _stack(model, vit_rules)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 12, 3))  # 2 x 3 patches
    forward = jax.jit(lx.quaxify(lambda m, x: m(x)))
    # One adapter per image.
    idx = np.array([2, -1, 0])
    out = forward(lx.loraify(model, stack, jnp.asarray(idx)), x)
    want = nnx_reference(model, stack, idx, x)
    assert_adapters_matter(want, np.asarray(model(x)), idx, atol=F32_TOL["atol"])
    np.testing.assert_allclose(out, want, **F32_TOL)
    # One adapter per patch (token): (B, T) indices label the conv's (N, h, w)
    # output positions and the linear layer's (B, T) tokens alike.
    tok = np.array([[0, 1, 2, -1, 0, 1], [-1, -1, 2, 2, 1, 0], [1, 1, 1, 0, 0, -1]])
    out = forward(lx.loraify(model, stack, jnp.asarray(tok)), x)
    per_adapter = {
        i: nnx_reference(model, stack, np.full(len(x), i), x) for i in range(-1, 3)
    }
    want = np.stack(
        [[per_adapter[int(tok[b, t])][b, t] for t in range(6)] for b in range(3)]
    )
    np.testing.assert_allclose(out, want, **F32_TOL)


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (lambda k: eqx.nn.Conv1d(3, 4, 3, stride=2, dilation=2, key=k), (3, 9)),
        (lambda k: eqx.nn.Conv3d(2, 3, 2, padding=1, key=k), (2, 3, 4, 3)),
        # A transposed conv is a conv with input dilation: the same rule.
        (lambda k: eqx.nn.ConvTranspose2d(3, 4, 3, stride=2, key=k), (3, 5, 5)),
    ],
    ids=["Conv1d", "Conv3d", "ConvTranspose2d"],
)
def test_equinox_conv_layers(layer, x_shape):
    model = layer(jax.random.PRNGKey(0))
    stack = _stack(model, lambda r: [lx.LoraRule("weight", rank=r, out_axes=0)])
    served = lx.loraify(model, stack, jnp.asarray(IDX))
    xs = jax.random.normal(jax.random.PRNGKey(1), (len(IDX), *x_shape))
    run_one = eqx.filter_jit(lambda m, x: m(x))
    want = per_row_reference(model, stack, IDX, run_one, xs)
    outside, inside = vmap_styles(lambda m, x: m(x))
    np.testing.assert_allclose(outside(served, xs), want, **F32_TOL)
    np.testing.assert_allclose(inside(served, xs, jnp.asarray(IDX)), want, **F32_TOL)


def test_flax_linen_conv():
    from flax import linen

    module = linen.Conv(5, (3, 3), strides=2, kernel_dilation=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (len(IDX), 9, 9, 3))
    params = module.init(jax.random.PRNGKey(0), x[:1])
    stack = _stack(params, lambda r: [lx.LoraRule("kernel", rank=r, out_axes=-1)])
    out = jax.jit(lx.quaxify(module.apply))(lx.loraify(params, stack, IDX), x)
    run_one = jax.jit(lambda p, xe: module.apply(p, xe[None])[0])
    want = per_row_reference(params, stack, IDX, run_one, x)
    base = per_row_reference(params, stack, -np.ones_like(IDX), run_one, x)
    assert_adapters_matter(want, base, IDX, atol=F32_TOL["atol"])
    np.testing.assert_allclose(out, want, **F32_TOL)
