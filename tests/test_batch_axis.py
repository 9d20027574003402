"""Which axes of an activation the indices label: the leading free axes by
default, or others by `batch_axis` (`-1`: the trailing ones, for time-major
models). The rewrite cannot tell `(T, B, D)` from `(B, T, D)` when `T == B`, so the
convention must be stated, and a time-major model must be able to state its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from tests.fast_init import random_adapters
from tests.helpers import check_dot, dot_cases, dot_fn, make_lora
from tests.model_helpers import einsum_merge


@st.composite
def moved_cases(draw):
    """A `dot_cases` layout whose indexed free axes sit at a random position among
    x's free axes (not first), with the `batch_axis` that says where, counted from
    the front or (negative) from the back."""
    case = draw(dot_cases(idx_ndims=(1, 2)))
    (c_l, c_r), (b_l, b_r) = case.dimension_numbers
    c_x, b_x = (c_r, b_r) if case.lora_is_lhs else (c_l, b_l)
    free = [d for d in range(len(case.x_shape)) if d not in c_x and d not in b_x]
    k = len(case.idx_shape)
    sizes = [case.x_shape[d] for d in free]
    extra = sizes[k:]
    start = draw(st.integers(0, len(extra)))
    sizes = extra[:start] + sizes[:k] + extra[start:]
    x_shape = list(case.x_shape)
    for d, size in zip(free, sizes):
        x_shape[d] = size
    stop = start + k
    batch_axis = draw(st.sampled_from([start, stop - len(free) - 1]))
    case = dataclasses.replace(case, x_shape=tuple(x_shape))
    return case, start, batch_axis


@given(moved_cases())
def test_indices_on_any_free_axes(args):
    case, start, batch_axis = args
    w, a, b, scale, idx, x = case.arrays()
    lora = case.lora(w, a, b, scale, idx, batch_axis=batch_axis)
    out = jax.jit(lx.quaxify(dot_fn(case)))(lora, x)
    check_dot(
        x,
        w,
        a,
        b,
        scale,
        idx,
        case.in_axes,
        case.out_axes,
        case.stack_axes,
        case.dimension_numbers,
        case.lora_is_lhs,
        out,
        start=start,
    )


# -- a time-major model, with T == B -------------------------------------------------

T = B = 4
V, D, H = 9, 5, 6


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.standard_normal((V, D)), jnp.float32),
        "w_in": jnp.asarray(rng.standard_normal((D, H)) / D**0.5, jnp.float32),
        "w_rec": jnp.asarray(rng.standard_normal((H, H)) / H**0.5, jnp.float32),
    }


def time_major(p, tokens):
    """An RNN over time-major tokens `(T, B)`: a lookup and a projection of the
    whole sequence `(T, B, .)`, then a scan over time whose steps are `(B, H)`."""
    u = p["embed"][tokens] @ p["w_in"]  # (T, B, H)

    def step(h, u_t):
        h = jnp.tanh(u_t + h @ p["w_rec"])
        return h, h

    return jax.lax.scan(step, jnp.zeros((tokens.shape[1], H)), u)[1]  # (T, B, H)


RULES = [
    lx.LoraRule("embed", 3, in_axes=0, out_axes=1),
    lx.LoraRule("w_in|w_rec", 3),
]
IDX = np.array([2, -1, 0, 1], np.int32)


def _adapters(p):
    return lx.stack_adapters(random_adapters(p, [RULES] * 3, seed=7))


def _per_example_reference(p, stack, tokens):
    """Each example (a column of the time-major tokens) run alone, with its
    adapter merged in NumPy."""
    cols = []
    for e, i in enumerate(IDX):
        pe = p if i < 0 else einsum_merge(p, stack[int(i)], xp=np)
        cols.append(np.asarray(time_major(pe, tokens[:, e : e + 1]))[:, 0])
    return np.stack(cols, axis=1)


def test_time_major_model_serves_each_column_its_adapter():
    p = _weights()
    stack = _adapters(p)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (T, B)), jnp.int32)
    ref = _per_example_reference(p, stack, tokens)
    run = jax.jit(lx.quaxify(time_major))
    out = run(lx.loraify(p, stack, IDX, batch_axis=-1), tokens)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    # The adapters matter, and the default convention (leading axes = batch) reads
    # this model's time axis as the batch: with T == B nothing can tell, and the
    # rows come out wrong. That is why the convention is documented and settable.
    base = np.asarray(time_major(p, tokens))
    assert np.abs(ref - base)[:, [0, 2, 3]].max(axis=(0, 2)).min() > 1e-2
    wrong = run(lx.loraify(p, stack, IDX), tokens)
    assert not np.allclose(wrong, ref, rtol=1e-3, atol=1e-3)
    # with_indices can set it too (and keeps it otherwise).
    served = lx.with_indices(lx.loraify(p, stack, IDX), IDX, batch_axis=-1)
    np.testing.assert_allclose(run(served, tokens), ref, rtol=2e-5, atol=2e-5)
    again = lx.with_indices(served, IDX)
    assert (
        jax.tree.leaves(again, is_leaf=lambda x: isinstance(x, lx.BatchedLoraArray))[
            0
        ].batch_axis
        == -1
    )


def test_time_major_mismatch_suggests_batch_axis():
    """With T != B the default convention fails loudly, and says what to pass."""
    lora, _ = make_lora((D, H), n=3, indices=np.array([0, 1, 2], np.int32))
    x = jnp.ones((7, 3, D))  # (T, B, D), time-major
    with pytest.raises(lx.IndicesShapeError, match=r"batch_axis=-1"):
        lx.quaxify(lambda W, x: x @ W)(lora, x)
    with pytest.raises(TypeError, match="batch_axis` must be an int"):
        lora.replace(batch_axis="time")
