"""`materialise()` returns the array's own shape or refuses, and the squeezed-row
lookup (`E[3]`) computes its row in low-rank form, never through `materialise`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import lorax_arrays as lx
from tests.helpers import dense_weight_per_example, make_lora

V, D = 7, 5


def _table(indices, allow_materialise=False, shape=(V, D), in_axes=(0,), out_axes=(1,)):
    return make_lora(
        shape,
        in_axes,
        out_axes,
        indices=indices,
        allow_materialise=allow_materialise,
    )


@pytest.mark.parametrize("index", [2, -1])
def test_materialise_with_a_scalar_index_has_the_arrays_shape(index):
    lora, (w, a, b, scale) = _table(index, allow_materialise=True)
    dense = lora.materialise()
    assert dense.shape == lora.aval().shape and dense.dtype == lora.aval().dtype
    ref = dense_weight_per_example(w, a, b, scale, np.array(index), (0,), (1,))
    np.testing.assert_allclose(np.asarray(dense), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(4,), (2, 3)])
def test_materialise_with_per_example_indices_refuses(shape):
    # One dense weight of the array's shape cannot hold each example's adapter
    # (it used to return a stack of weights, (*indices.shape, *w.shape)).
    lora, _ = _table(np.zeros(shape, np.int32), allow_materialise=True)
    with pytest.raises(lx.UnsupportedOperationError, match="per-example") as info:
        lora.materialise()
    assert str(shape) in str(info.value) and "with_indices" in str(info.value)


def test_materialise_without_indices_names_the_fix():
    lora, _ = _table(None, allow_materialise=True)
    with pytest.raises(ValueError, match="with_indices"):
        lora.materialise()


@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("index", [0, 2, -1])
def test_static_row_lookup_is_low_rank_without_the_opt_in(allow, index):
    lora, (w, a, b, scale) = _table(index, allow_materialise=allow)
    dense = dense_weight_per_example(w, a, b, scale, np.array(index), (0,), (1,))
    got = jax.jit(lx.quaxify(lambda e: (e[3], e[:, 1])))(lora)
    np.testing.assert_allclose(np.asarray(got[0]), dense[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), dense[:, 1], rtol=1e-5, atol=1e-6)
    # Nothing the size of the table is built (the frozen base, `stop_gradient(w)`,
    # aside).
    jaxpr = jax.make_jaxpr(lx.quaxify(lambda e: e[3]))(lora)
    sizes = [
        int(np.prod(v.aval.shape))
        for eqn in jaxpr.eqns
        if eqn.primitive.name != "stop_gradient"
        for v in eqn.outvars
    ]
    assert max(sizes) < V * D


def test_static_row_lookup_without_the_opt_in_never_calls_materialise(monkeypatch):
    lora, _ = _table(1)

    def refuse(self):
        raise AssertionError("materialise called")

    monkeypatch.setattr(lx.BatchedLoraArray, "materialise", refuse)
    lx.quaxify(lambda e: e[3])(lora)


@pytest.mark.parametrize("allow", [False, True])
def test_static_row_lookup_with_per_example_indices_refuses(allow):
    lora, _ = _table(np.array([0, 1, -1], np.int32), allow_materialise=allow)
    with pytest.raises(lx.UnsupportedOperationError, match="per-example"):
        lx.quaxify(lambda e: e[3])(lora)
