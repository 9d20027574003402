"""Every strategy for the low-rank term (gather, dense, segment with either
grouped-matmul kernel) matches the float64 reference on the same random layouts as
tests/test_dot_general.py; strategies can be forced per array or per call."""

from __future__ import annotations

import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from lorax_arrays._rules import strategies as _strategies
from lorax_arrays._rules.strategies import choose, segment_kernel
from tests.helpers import (
    STRATEGY_VARIANTS,
    DotCase,
    check_dot,
    dot_cases,
    dot_fn,
    random_lora,
    walk_eqns,
)


def _run(case: DotCase, variant: str):
    w, a, b, scale, idx, x = case.arrays()
    lora = case.lora(w, a, b, scale, idx)
    strategy, _, kernel = variant.partition(":")
    with segment_kernel(kernel or None):
        out = jax.jit(lx.quaxify(dot_fn(case), strategy=strategy))(lora, x)
    return out, (w, a, b, scale, idx, x)


@given(dot_cases(idx_ndims=(1, 2)), st.sampled_from(STRATEGY_VARIANTS))
def test_every_strategy_matches_reference(case: DotCase, variant: str):
    out, (w, a, b, scale, idx, x) = _run(case, variant)
    case.check(x, w, a, b, scale, idx, out)


def _primitives(f, *args):
    return {e.primitive.name for e in walk_eqns(jax.make_jaxpr(f)(*args))}


def _lora(strategy="auto", idx=(0, 2, -1, 1)):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((3, 6, 2)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 2, 5)), jnp.float32)
    return lx.BatchedLoraArray(
        w,
        a,
        b,
        scale=0.5,
        indices=jnp.array(idx),
        in_axes=0,
        out_axes=1,
        strategy=strategy,
    )


def _from_numpy(w, a, b, scale, idx, strategy):
    """A `(d_in, d_out)` BatchedLoraArray from NumPy parts."""
    return lx.BatchedLoraArray(
        *map(jnp.asarray, (w, a, b)),
        scale=jnp.asarray(scale),
        indices=jnp.asarray(idx),
        in_axes=0,
        out_axes=1,
        strategy=strategy,
    )


def test_strategy_per_array_and_per_call():
    """The jaxpr shows which strategy ran: segment scatters tokens into adapter
    order, dense compares indices with every adapter (a one-hot against an
    iota), gather does neither; a per-call strategy overrides the array's."""
    x = jnp.ones((4, 3, 6))
    matmul = lambda W, x: x @ W  # noqa: E731
    seg = _primitives(lx.quaxify(matmul), _lora("segment"), x)
    dense = _primitives(lx.quaxify(matmul), _lora("dense"), x)
    gather = _primitives(lx.quaxify(matmul), _lora("gather"), x)
    assert "scatter" in seg and "scatter" not in gather | dense
    assert "iota" in dense and "iota" not in gather
    forced = lx.quaxify(matmul, strategy="segment")
    assert "scatter" in _primitives(forced, _lora("dense"), x)
    outs = [
        lx.quaxify(matmul, strategy=s)(_lora(), x)
        for s in ("gather", "dense", "segment")
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-5, atol=1e-5)


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="Unknown strategy 'fast'"):
        _lora("fast")
    with pytest.raises(ValueError, match="gather, segment, dense"):
        lx.quaxify(lambda W, x: x @ W, strategy="fast")


def test_auto_choices():
    """`auto` by shape, (S, G, R, d_in, d_out, n, rank): per-sequence prefill
    gathers (one gather per row feeds 128 tokens); a single indexed row gathers;
    per-token indices over 2 adapters go dense (a one-hot over 2 costs less than
    moving tokens); per-token indices over 4-64 adapters segment; decode (up to 64
    rows of one token, rank <= 16) gathers on CPU, with its multiply-add `· B[i]`
    (`benchmarks/decode_forms.py`: near segment in a scanned layer stack, far
    ahead of it when each layer is its own product). Each case is one of the
    regimes the benchmark suite measures."""
    cases = {
        (1, 16, 128, 1024, 4096, 16, 16): "gather",  # W1 prefill
        (1, 1, 128, 1024, 4096, 64, 16): "gather",  # one row (early return)
        (1, 2048, 1, 1024, 4096, 2, 16): "dense",  # per token, 2 adapters
        (1, 2048, 1, 1024, 4096, 4, 16): "segment",  # per token, 4 adapters
        (1, 2048, 1, 1024, 4096, 64, 16): "segment",  # per token, 64 adapters
        (1, 64, 1, 1024, 4096, 8, 16): "gather",  # W3 decode, 8 adapters
        (1, 64, 1, 1024, 4096, 8, 32): "segment",  # the same at rank 32 (unmeasured)
        (1, 64, 1, 1024, 4096, 64, 16): "gather",  # W3 decode, 64 adapters
    }
    # The CPU weighting of bytes against flops (the suite measured it there).
    with unittest.mock.patch.object(_strategies.jax, "default_backend", lambda: "cpu"):
        got = {shape: choose(*shape) for shape in cases}
    assert got == cases
    # Every strategy is reachable: the cost model is not stuck on one answer.
    assert set(got.values()) == {"gather", "dense", "segment"}


@pytest.mark.parametrize("strategy", ["auto", "gather", "dense", "segment"])
@pytest.mark.parametrize("idx_shape", [(4,), (4, 3)])
def test_single_adapter_is_the_plain_lora_product(strategy, idx_shape):
    """With one adapter every strategy runs two plain matmuls and a per-row scale:
    no factor is gathered, no one-hot is built, no token is moved; rows with -1
    still see the base weight alone."""
    rng = np.random.default_rng(1)
    w, a, b, scale = random_lora(rng, (6, 5), (0,), (1,), n_adapters=1, rank=3)
    idx = np.array([0, -1, 0, -1] if len(idx_shape) == 1 else [[0, -1, 0]] * 4)
    idx = idx.astype(np.int32)
    x = rng.standard_normal((4, 3, 6)).astype(np.float32)
    lora = _from_numpy(w, a, b, scale, idx, strategy)
    f = lx.quaxify(lambda W, x: x @ W)
    eqns = list(walk_eqns(jax.make_jaxpr(f)(lora, x)))
    names = {e.primitive.name for e in eqns}
    assert not names & {"scatter", "iota", "sort"}  # no move, no one-hot
    factor_gathers = [
        e for e in eqns if e.primitive.name == "gather" and e.invars[0].aval.ndim > 1
    ]
    assert not factor_gathers
    out = jax.jit(f)(lora, x)
    dn = (((2,), (0,)), ((), ()))
    check_dot(x, w, a, b, scale, idx, (0,), (1,), (), dn, False, out)


@pytest.mark.parametrize("onehot_max", [2**22, 0], ids=["one-hot", "argsort"])
@settings(max_examples=settings().max_examples // 2)  # eager: a compile per length
@given(
    ids=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    n_extra=st.integers(0, 3),
)
def test_group_ranks_match_a_stable_sort(onehot_max, ids, n_extra):
    """Each token's place within its adapter's group, and the group sizes, equal
    what a stable argsort gives, by either method (one-hot count, or argsort for
    large `tokens x adapters`)."""
    ids_np = np.array(ids, np.int32)
    n = int(ids_np.max()) + 1 + n_extra
    with unittest.mock.patch.object(_strategies, "_ONEHOT_MAX", onehot_max):
        ranks, counts = _strategies._group_ranks(jnp.asarray(ids_np), n)
    order = np.argsort(ids_np, kind="stable")
    start = np.concatenate([[0], np.cumsum(np.bincount(ids_np, minlength=n))[:-1]])
    expected = np.empty_like(ids_np)
    expected[order] = np.arange(len(ids_np)) - start[ids_np[order]]
    np.testing.assert_array_equal(ranks, expected)
    np.testing.assert_array_equal(counts, np.bincount(ids_np, minlength=n))


@given(dot_cases(idx_ndims=(1, 2)), st.sampled_from(["tiled", "ragged"]))
def test_segment_with_argsort_grouping_matches_reference(case: DotCase, kernel):
    """The large-batch grouping path (argsort, forced here) end to end."""
    with unittest.mock.patch.object(_strategies, "_ONEHOT_MAX", 0):
        out, (w, a, b, scale, idx, x) = _run(case, f"segment:{kernel}")
    case.check(x, w, a, b, scale, idx, out)


@pytest.mark.parametrize("strategy", ["gather", "dense", "segment"])
@pytest.mark.parametrize("n", [1, 3])
def test_float16_rows_with_a_scale_beyond_float16(strategy, n):
    """`alpha / r` above float16's largest value (65504) with float16 weights and
    activations: the scale is applied in float32, and last, so a row whose true
    result is small is that result, not infinity."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 5)).astype(np.float16)
    a = rng.standard_normal((n, 6, 2)).astype(np.float16)
    b = (rng.standard_normal((n, 2, 5)) * 1e-5).astype(np.float16)
    scale = np.full((n,), 2e5, np.float32)
    idx = np.array([0, n - 1, -1, 0], np.int32)
    x = rng.standard_normal((4, 6)).astype(np.float16)
    lora = _from_numpy(w, a, b, scale, idx, strategy)
    out = np.asarray(jax.jit(lx.quaxify(lambda W, x: x @ W))(lora, x), np.float64)
    assert np.isfinite(out).all()
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    for e, i in enumerate(idx):
        we = f64(w) if i < 0 else f64(w) + scale[i] * f64(a[i]) @ f64(b[i])
        want = f64(x[e]) @ we
        np.testing.assert_allclose(out[e], want, rtol=2e-2, atol=2e-2)
