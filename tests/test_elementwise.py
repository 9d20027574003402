"""A weight scaled by a constant before use (`W * c`, `c * W`, `W / c`, `-W`; Gemma
4's per-layer projection is `w * w_scale`) keeps the low-rank form: a scalar folds
into the scales, a multiplier along the out-axes (and stack axes) into B, one along
the in-axes into A. Every case is compared with the float64 per-example reference
`x · ((w + s·A_i B_i) * c)`; a multiplier along both in- and out-axes is an error
that names them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from tests.helpers import (
    RTOL_F32,
    DotCase,
    assert_close_to_reference,
    dense_weight_per_example,
    dot_cases,
    dot_fn,
    make_lora,
    reference_dot_general,
)


@dataclasses.dataclass(frozen=True)
class ScaleCase:
    dot: DotCase
    kind: str  # "scalar", "out", "in"
    op: str  # "mul", "rmul", "div", "neg"
    seed: int

    def multiplier(self):
        """`c`: the weight's rank, size 1 where it does not vary (or a scalar)."""
        d = self.dot
        rng = np.random.default_rng(self.seed)
        if self.kind == "scalar":
            return np.float32(rng.uniform(0.5, 2.0))
        nd = len(d.w_shape)
        group = d.out_axes if self.kind == "out" else d.in_axes
        varying = {ax % nd for ax in (*group, *d.stack_axes)}
        shape = [d.w_shape[ax] if ax in varying else 1 for ax in range(nd)]
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)

    def apply(self, W, c):
        return {
            "mul": lambda: W * c,
            "rmul": lambda: c * W,
            "div": lambda: W / c,
            "neg": lambda: -W,
        }[self.op]()


@st.composite
def scale_cases(draw):
    return ScaleCase(
        draw(dot_cases(idx_ndims=(1, 2))),
        draw(st.sampled_from(["scalar", "out", "in"])),
        draw(st.sampled_from(["mul", "rmul", "div", "neg"])),
        draw(st.integers(0, 2**31 - 1)),
    )


@given(scale_cases())
def test_scaled_weight_matches_reference(case: ScaleCase):
    d = case.dot
    w, a, b, scale, idx, x = d.arrays()
    c = case.multiplier()
    dot = dot_fn(d)
    out = jax.jit(lx.quaxify(lambda W, x: dot(case.apply(W, c), x)))(
        d.lora(w, a, b, scale, idx), x
    )
    args = (d.in_axes, d.out_axes, d.stack_axes)
    k = idx.ndim
    w_e = case.apply(dense_weight_per_example(w, a, b, scale, idx, *args), c)
    w_abs = dense_weight_per_example(w, a, b, scale, idx, *args, abs_weight=True)
    w_abs = np.abs(case.apply(w_abs, c))
    expected = reference_dot_general(x, w_e, d.dimension_numbers, d.lora_is_lhs, k)
    mag = reference_dot_general(
        np.abs(x.astype(np.float64)), w_abs, d.dimension_numbers, d.lora_is_lhs, k
    )
    assert_close_to_reference(out, expected, mag, RTOL_F32)


def _lora():
    return make_lora((6, 5), n=3, rank=2, indices=np.array([0, 2, -1, 1], np.int32))


X = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)


def _rows(w, a, b, s, c):
    return np.stack(
        [
            X[e] @ ((w + (s[i] * a[i] @ b[i] if i >= 0 else 0)) * c)
            for e, i in enumerate([0, 2, -1, 1])
        ]
    )


def test_constant_inside_a_while_loop_and_a_traced_scale():
    """The multiplier as a NumPy constant inside `fori_loop` (a typed literal in
    the loop body), and as a traced value: it is part of the frozen base (no
    gradient reaches it), and the adapters' gradients are those of the scaled
    weight."""
    lora, (w, a, b, s) = _lora()
    w_scale = np.float32(0.25)

    def looped(W, x):
        return jax.lax.fori_loop(0, 2, lambda i, h: h + x @ (W * w_scale), x @ W * 0)

    out = jax.jit(lx.quaxify(looped))(lora, X)
    np.testing.assert_allclose(out, 2 * _rows(w, a, b, s, 0.25), rtol=1e-5, atol=1e-5)

    def loss(c, a_, b_):
        W = lora.replace(a=a_, b=b_)
        return jnp.sum(jnp.tanh(lx.quaxify(lambda W, x: x @ (W * c))(W, X)))

    def reference(a_, b_, c):
        rows = [
            X[e] @ ((w + (s[i] * a_[i] @ b_[i] if i >= 0 else 0)) * c)
            for e, i in enumerate([0, 2, -1, 1])
        ]
        return jnp.sum(jnp.tanh(jnp.stack(rows)))

    c = jnp.float32(1.5)
    got, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(c, lora.a, lora.b)
    ref, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(
        jnp.asarray(a), jnp.asarray(b), c
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert grads[0] == 0  # frozen, with the base
    for g, r in zip(grads[1:], ref_grads):
        assert np.abs(r).max() > 1e-2
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_not_low_rank_is_an_error_or_materialised_when_allowed():
    lora, (w, a, b, s) = _lora()
    full = np.random.default_rng(3).uniform(0.5, 2, (6, 5)).astype(np.float32)
    with pytest.raises(
        lx.UnsupportedOperationError, match=r"varies along axes \(0, 1\)"
    ):
        lx.quaxify(lambda W, x: x @ (W * full))(lora, X)
    with pytest.raises(lx.UnsupportedOperationError, match="`mul` has no rule"):
        lx.quaxify(lambda W: W * W)(lora)
    # Opted in, one example at a time (scalar indices) it is the dense weight.
    opted = lora.replace(allow_materialise=True)
    one = jax.vmap(
        lambda i, x: lx.quaxify(lambda W, x: x @ (W * full))(
            opted.replace(indices=i), x
        )
    )(jnp.array([0, 2, -1, 1]), X)
    np.testing.assert_allclose(one, _rows(w, a, b, s, full), rtol=1e-5, atol=1e-5)
