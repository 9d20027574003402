"""A traced adapter index outside `[-1, n)` never serves another adapter's output
(nor the base model's): its rows come out NaN, whatever computes them (every
strategy, the single-adapter path, lookups, tied heads, scans, vmap). Concrete
indices are refused before anything runs (tests/test_array.py).

The reference is the float64 per-example dense computation with the bad examples'
weights set to NaN: exactly the output elements that those examples touch are NaN
there, and every other element must match the reference as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from lorax_arrays._rules.strategies import segment_kernel
from tests.helpers import (
    RTOL_F32,
    STRATEGY_VARIANTS,
    assert_close_to_reference,
    dot_cases,
    dot_fn,
    make_lora,
    reference_with_nan_rows,
)


def _bad_values(n: int) -> list[int]:
    return [n, n + 3, -2, -(2**31), 2**31 - 1]


def _assert_nan_exactly_where_expected(out, expected, mag):
    out = np.asarray(out, np.float64)
    nan = np.isnan(expected)
    assert nan.any(), "the case has no bad row to check"
    np.testing.assert_array_equal(np.isnan(out), nan)
    assert_close_to_reference(out[~nan], expected[~nan], mag[~nan], RTOL_F32)


@given(
    dot_cases(idx_ndims=(1, 2)),
    st.sampled_from(STRATEGY_VARIANTS),
    st.data(),
)
def test_out_of_range_rows_are_nan_for_every_strategy(case, variant, data):
    w, a, b, scale, idx, x = case.arrays()
    n = case.n_adapters
    flat = idx.reshape(-1).copy()
    where = data.draw(
        st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=flat.size)
    )
    for pos in where:
        flat[pos] = data.draw(st.sampled_from(_bad_values(n)))
    idx = flat.reshape(idx.shape)
    bad = (idx < -1) | (idx >= n)
    strategy, _, kernel = variant.partition(":")

    # The array is built with valid indices and given the bad ones under `jit`,
    # where nothing on the host can see them.
    lora = case.lora(w, a, b, scale, np.zeros_like(idx))
    fn = lx.quaxify(dot_fn(case), strategy=strategy)

    @jax.jit
    def run(lora, x, i):
        return fn(lora.replace(indices=i), x)

    with segment_kernel(kernel or None):
        out = run(lora, x, jnp.asarray(idx))
    expected, mag = reference_with_nan_rows(case, x, w, a, b, scale, idx, bad)
    _assert_nan_exactly_where_expected(out, expected, mag)


@pytest.mark.parametrize("n", [1, 3])
def test_index_past_the_last_adapter_is_not_the_last_adapter(n):
    """The case that used to fail: index 7 with 3 adapters was clamped and served
    adapter 2. Now that row is NaN, and the other rows are still right."""
    lora, (w, a, b, scale) = make_lora((5, 4), n=n, rank=2, indices=np.zeros(3, int))
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    idx = np.array([n - 1, 7, -1], np.int32)

    @jax.jit
    def run(lora, i):
        return lx.quaxify(lambda W, x: x @ W)(lora.replace(indices=i), x)

    out = np.asarray(run(lora, jnp.asarray(idx)))
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()
    last = w + scale[n - 1] * (a[n - 1] @ b[n - 1])
    np.testing.assert_allclose(out[0], x[0] @ last, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[2], x[2] @ w, rtol=1e-4, atol=1e-4)


def test_lookups_and_tied_heads_give_nan_rows():
    """`E[tokens]` and `h @ E.T` on an adapted table, per example and per token."""
    v, d = 11, 6
    lora, (w, a, b, scale) = make_lora(
        (v, d), n=3, rank=2, indices=np.zeros(4, np.int32)
    )
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, v, (4, 5)), jnp.int32)
    h = jnp.asarray(rng.standard_normal((4, 5, d)), jnp.float32)

    def model(E, tokens, h):
        return E[tokens], h @ E.T

    @jax.jit
    def run(lora, i):
        return lx.quaxify(model)(lora.replace(indices=i), tokens, h)

    for idx in (
        np.array([0, 3, -1, -5], np.int32),
        np.array([[0, 3, 1, -1, 2]] * 2 + [[9, 0, 0, 0, 0]] * 2, np.int32),
    ):
        rows, logits = map(np.asarray, run(lora, jnp.asarray(idx)))
        bad = (idx < -1) | (idx >= 3)
        bad_tok = np.broadcast_to(
            bad.reshape(bad.shape + (1,) * (2 - bad.ndim)), (4, 5)
        )
        for out in (rows, logits):
            assert np.isnan(out[bad_tok]).all()
            assert np.isfinite(out[~bad_tok]).all()
        good = np.where(
            bad_tok,
            -1,
            np.broadcast_to(
                idx.reshape(bad_tok.shape[: idx.ndim] + (1,) * (2 - idx.ndim)), (4, 5)
            ),
        )
        for e, t in zip(*np.nonzero(~bad_tok)):
            i = good[e, t]
            we = w if i < 0 else w + scale[i] * a[i] @ b[i]
            np.testing.assert_allclose(
                rows[e, t], we[tokens[e, t]], rtol=1e-4, atol=1e-4
            )
            np.testing.assert_allclose(
                logits[e, t], we @ np.asarray(h[e, t]), rtol=1e-4, atol=1e-4
            )


def test_scan_and_vmap_give_nan_rows():
    """A scanned layer stack (per-example indices are not sliced) and a per-example
    model under `jax.vmap` (scalar indices): the bad example is NaN, others right."""
    layers, d = 3, 4
    lora, (w, a, b, scale) = make_lora(
        (layers, d, d), (1,), (2,), (0,), n=2, rank=2, indices=np.zeros(3, np.int32)
    )
    x = np.random.default_rng(3).standard_normal((3, d)).astype(np.float32)

    def stack(W, x):
        return jax.lax.scan(lambda h, Wl: (jnp.tanh(h @ Wl), None), x, W)[0]

    def one(W, x):  # one example, scalar index
        return stack(W, x[None])[0]

    idx = jnp.array([1, 2, -1], jnp.int32)
    scanned = jax.jit(lambda L, i: lx.quaxify(stack)(L.replace(indices=i), x))
    vmapped = jax.jit(
        jax.vmap(
            lambda L, x, i: lx.quaxify(one)(lx.with_indices(L, i), x),
            in_axes=(None, 0, 0),
        )
    )
    for out in (scanned(lora, idx), vmapped(lora, x, idx)):
        out = np.asarray(out)
        assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
        for e, i in ((0, 1), (2, -1)):
            h = x[e]
            for layer in range(layers):
                we = w[layer]
                if i >= 0:
                    we = we + scale[i] * a[layer, i] @ b[layer, i]
                h = np.tanh(h @ we)
            np.testing.assert_allclose(out[e], h, rtol=1e-4, atol=1e-4)
