"""One tenant's adapter never changes another tenant's rows.

An adapter can turn non-finite while serving (a diverged training step published
to the bank, a corrupt upload that got past a check). Whatever computes the
low-rank term (every strategy, the single-adapter path, lookups, tied heads,
convolutions, gathered experts, the variants' vectors), that adapter's NaN or
Inf stays in its own rows: every other row, other adapters' and the base
model's, is bit-identical to the clean run. The adapter is poisoned *inside*
the jitted function, so both runs are the same compiled program and bit
equality is the right test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from jax import lax

import lorax_arrays as lx
from lorax_arrays._rules.strategies import segment_kernel
from tests.helpers import (
    STRATEGY_VARIANTS,
    dot_cases,
    dot_fn,
    make_lora,
    reference_with_nan_rows,
)

POISONS = [np.nan, np.inf, -np.inf]


def _poisoned(lora: lx.BatchedLoraArray, field: str, k, value, on):
    """`lora` with adapter `k`'s `field` (a factor, a vector or its scale) all
    `value` where `on`; traced, so the host never sees it."""
    ns = lora.layout.n_stack
    arr = getattr(lora, field)
    axis = 0 if field == "scale" else ns
    hit = lax.broadcasted_iota(jnp.int32, arr.shape, axis) == k
    return lora.replace(
        **{field: jnp.where(on & hit, jnp.asarray(value, arr.dtype), arr)}
    )


def _runs(fn, lora, field, k, value, *args):
    """The clean and the poisoned output of one compiled program."""

    @jax.jit
    def run(lora, on, *args):
        return fn(_poisoned(lora, field, k, value, on), *args)

    clean = np.asarray(run(lora, jnp.asarray(False), *args))
    dirty = np.asarray(run(lora, jnp.asarray(True), *args))
    return clean, dirty


def _assert_isolated(clean, dirty, touched):
    """Untouched elements bit-identical; touched ones (the poisoned adapter's
    rows) not finite, so the corruption is visible where it belongs."""
    assert np.isfinite(clean).all()
    np.testing.assert_array_equal(dirty[~touched], clean[~touched])
    assert not np.isfinite(dirty[touched]).any()


@given(
    dot_cases(idx_ndims=(1, 2)),
    st.sampled_from(STRATEGY_VARIANTS),
    st.sampled_from(["a", "b", "scale", "in_scale", "out_scale"]),
    st.sampled_from(POISONS),
    st.data(),
)
def test_a_non_finite_adapter_stays_in_its_own_rows(case, variant, field, value, data):
    w, a, b, scale, idx, x = case.arrays()
    n = case.n_adapters
    k = data.draw(st.integers(0, n - 1), label="poisoned adapter")
    # At least one base row and one row of the poisoned adapter (when there is
    # room): the base rows read adapter `k` when k == 0.
    flat = idx.reshape(-1)
    flat[0] = k
    if flat.size > 1:
        flat[-1] = -1
    rng = np.random.default_rng(case.seed)
    kw = {}
    ns = len(case.stack_axes)
    if field in ("in_scale", "out_scale"):
        kw["in_scale"] = rng.uniform(0.5, 1.5, a.shape[:-1] + (1,)).astype(np.float32)
        out_shape = b.shape[: ns + 1] + (1,) + b.shape[ns + 2 :]
        kw["out_scale"] = rng.uniform(0.5, 1.5, out_shape).astype(np.float32)
    lora = case.lora(w, a, b, scale, idx, **kw)
    strategy, _, kernel = variant.partition(":")
    fn = lx.quaxify(dot_fn(case), strategy=strategy)
    try:
        with segment_kernel(kernel or None):
            clean, dirty = _runs(fn, lora, field, k, value, x)
    except lx.UnsupportedOperationError:
        assume(not kw)  # the variants' vectors on a layout they refuse
        raise
    touched, _ = reference_with_nan_rows(case, x, w, a, b, scale, idx, idx == k)
    _assert_isolated(clean, dirty, np.isnan(touched))


@pytest.mark.parametrize("strategy", ["gather", "dense", "segment"])
@pytest.mark.parametrize("field", ["a", "b"])
def test_lookups_tied_heads_and_rows_of_a_poisoned_table(strategy, field):
    """`E[tokens]` and `h @ E.T` on an adapted table, per example: adapter 0
    poisoned, base rows (which read adapter 0) and adapter 1's rows unchanged."""
    v, d = 11, 6
    idx = np.array([0, 1, -1, 0, -1], np.int32)
    lora, _ = make_lora((v, d), n=3, rank=2, indices=idx, strategy=strategy)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, v, (5, 4)), jnp.int32)
    h = jnp.asarray(rng.standard_normal((5, 4, d)), jnp.float32)
    rows = idx == 0
    for fn in (lambda E, t: E[t], lambda E, hh: hh @ E.T):
        arg = tokens if fn.__code__.co_varnames[1] == "t" else h
        clean, dirty = _runs(lx.quaxify(fn), lora, field, 0, np.nan, arg)
        touched = np.broadcast_to(rows[:, None, None], clean.shape)
        _assert_isolated(clean, dirty, touched)


@pytest.mark.parametrize("strategy", ["gather", "dense", "segment"])
@pytest.mark.parametrize("field", ["a", "b", "scale"])
@pytest.mark.parametrize("value", POISONS)
def test_decode_rows_with_a_poisoned_adapter(strategy, field, value):
    """Decode: one token per row (`gather` on CPU then takes `· B[i]` as a
    multiply-add over the rank), adapter 0 poisoned: its rows non-finite, the
    base rows (which read adapter 0) and adapter 1's and 2's rows unchanged."""
    idx = np.array([0, 1, -1, 2, 0, -1, 1], np.int32)
    lora, _ = make_lora((6, 5), n=3, rank=3, indices=idx, strategy=strategy)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((7, 6)), jnp.float32)
    clean, dirty = _runs(lx.quaxify(lambda w, x: x @ w), lora, field, 0, value, x)
    touched = np.broadcast_to((idx == 0)[:, None], clean.shape)
    _assert_isolated(clean, dirty, touched)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("field", ["a", "b"])
def test_convolution_with_a_poisoned_adapter(n, field):
    """A 1-D conv with an adapted kernel `(K, I, O)`: every adapter's A side by
    side in one conv, then each row's own channels."""
    rng = np.random.default_rng(4)
    k_, i_, o_ = 3, 4, 5
    idx = np.array([0, -1, n - 1, -1], np.int32)
    lora, _ = make_lora((k_, i_, o_), (0, 1), (2,), n=n, rank=2, indices=idx)
    x = jnp.asarray(rng.standard_normal((4, 7, i_)), jnp.float32)

    def conv(W, x):
        return lax.conv_general_dilated(
            x, W, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )

    clean, dirty = _runs(lx.quaxify(conv), lora, field, 0, np.inf, x)
    rows = idx == 0
    _assert_isolated(clean, dirty, np.broadcast_to(rows[:, None, None], clean.shape))


@pytest.mark.parametrize("field", ["a", "b"])
def test_gathered_experts_with_a_poisoned_adapter(field):
    """`w[experts]` on an expert stack `(E, D, F)` with per-example adapters."""
    e_, d, f, k = 4, 6, 5, 2
    rng = np.random.default_rng(5)
    idx = np.array([0, -1, 1, 0], np.int32)
    lora, _ = make_lora((e_, d, f), (1,), (2,), (0,), n=2, rank=2, indices=idx)
    x = jnp.asarray(rng.standard_normal((4, 3, d)), jnp.float32)
    experts = jnp.asarray(rng.integers(0, e_, (4, 3, k)), jnp.int32)

    def moe(W, x, experts):
        return jnp.einsum("BTD,BTKDF->BTKF", x, W[experts])

    clean, dirty = _runs(lx.quaxify(moe), lora, field, 0, np.nan, x, experts)
    rows = idx == 0
    _assert_isolated(
        clean, dirty, np.broadcast_to(rows[:, None, None, None], clean.shape)
    )
