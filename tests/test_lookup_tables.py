"""Row lookups on tables with more than one output axis (Gemma 4's per-layer
embedding table `(V, L, P)`): `E[tokens]` is still `w[t] + s·A[i, t] @ B[i]`, with
B's out group laid out on the table's other axes in their own order. Compared with
each example's (or token's) row of the float64 per-example dense table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from tests.helpers import dense_weight_per_example, make_lora

V, L, P, B, T = 11, 3, 4, 4, 5
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
LAYOUTS = pytest.mark.parametrize(
    "in_axes, out_axes, shape",
    [((0,), (1, 2), (V, L, P)), ((0,), (2, 1), (V, L, P)), ((2,), (0, 1), (L, P, V))],
    ids=["V,L,P", "V,P,L order", "vocab last"],
)
IDX = {
    "per-example": np.array([0, 2, -1, 1], np.int32),
    "per-token": np.array([[0, 1, -1, 2, 2]] * 2 + [[-1, 0, 0, 1, 2]] * 2, np.int32),
}


def _expected(dense, idx, in_axis):
    """Each token's row of its own dense table, the other axes in their order."""

    def table(e, t):
        return np.moveaxis(dense[e] if idx.ndim == 1 else dense[e, t], in_axis, 0)

    rows = [[table(e, t)[int(TOKENS[e, t])] for t in range(T)] for e in range(B)]
    return np.stack([np.stack(r) for r in rows])


@LAYOUTS
@pytest.mark.parametrize("kind", list(IDX))
@pytest.mark.parametrize(
    "lookup",
    [
        lambda E, t, ax: jnp.take(E, t, axis=ax),
        lambda E, t, ax: E[(slice(None),) * ax + (t,)],
    ],
    ids=["take", "index"],
)
def test_multi_axis_table_lookup(in_axes, out_axes, shape, kind, lookup):
    idx = IDX[kind]
    lora, (w, a, b, s) = make_lora(shape, in_axes, out_axes, n=3, rank=2, indices=idx)
    ax = in_axes[0]
    out = jax.jit(lx.quaxify(lambda E, t: lookup(E, t, ax)))(lora, TOKENS)
    dense = dense_weight_per_example(w, a, b, s, idx, in_axes, out_axes)
    expected = _expected(dense, idx, ax)
    base = _expected(np.broadcast_to(w, dense.shape), idx, ax)
    assert np.abs(expected - base).max() > 1e-1  # the adapters matter
    if ax != 0:  # looked up along axis 2 of (L, P, V): the token axes are there
        out = jnp.moveaxis(out, (ax, ax + 1), (0, 1))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_single_row_under_vmap_and_per_layer_use():
    """`E[t]` for one token, one example at a time (scalar index, `dynamic_slice`),
    then the per-layer slices a Gemma-4 layer stack reads."""
    idx = IDX["per-example"]
    lora, (w, a, b, s) = make_lora((V, L, P), (0,), (1, 2), n=3, rank=2, indices=idx)

    def one(E, t):  # t: one token id
        row = jax.lax.dynamic_index_in_dim(E, t, 0, keepdims=False)  # (L, P)
        return jnp.stack([jnp.tanh(row[layer]) for layer in range(L)])

    run = jax.jit(
        jax.vmap(
            lambda E, t, i: lx.quaxify(one)(lx.with_indices(E, i), t),
            in_axes=(None, 0, 0),
        )
    )
    out = run(lora, TOKENS[:, 0], jnp.asarray(idx))
    dense = dense_weight_per_example(w, a, b, s, idx, (0,), (1, 2))
    expected = np.tanh(np.stack([dense[e][int(TOKENS[e, 0])] for e in range(B)]))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_lookup_along_one_axis_of_a_group_is_refused():
    lora, _ = make_lora(
        (V, L, P), (0, 1), (2,), n=3, rank=2, indices=IDX["per-example"]
    )
    with pytest.raises(lx.UnsupportedOperationError, match="single in-axis"):
        lx.quaxify(lambda E, t: jnp.take(E, t, axis=1))(lora, TOKENS[:, :2] % L)
