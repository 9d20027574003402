"""The row positions an activation carries (`RowIds`, `_rules/rows.py`) follow its
rows exactly through any sequence of the operations models apply to them, drawn by
Hypothesis: the positions after the sequence equal the sequence applied, in
NumPy, to an array holding each element's position. A grouped matmul trusts these
positions to pick each row's adapter, so a wrong one would serve another
request's adapter.

Also: rows combined across requests are `MIXED`; elements combined with rows for
no request keep their request; positions in a scatter-add agree only when every
contribution is for the same request."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import quax
from hypothesis import given, settings, strategies as st
from jax import lax

import lorax_arrays as lx  # noqa: F401  (registers the rules)
from lorax_arrays._core.rows import MIXED, RowIds

B, T, D = 3, 4, 5


def _tagged(rng):
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    pos = np.arange(B * T, dtype=np.int32).reshape(B, T, 1)
    return RowIds(jnp.asarray(x), jnp.asarray(pos), (B, T)), np.broadcast_to(
        pos, x.shape
    ).astype(np.int64)


def _flatten(v, P, data):
    if v.ndim != 3:
        return v, P
    return v.reshape(-1, v.shape[-1]), P.reshape(-1, P.shape[-1])


def _unflatten(v, P, data):
    if v.ndim != 2 or v.shape[0] % 2:
        return v, P
    shape = (2, v.shape[0] // 2, v.shape[1])
    return v.reshape(shape), P.reshape(shape)


def _swap(v, P, data):
    if v.ndim != 3:
        return v, P
    return jnp.swapaxes(v, 0, 1), np.swapaxes(P, 0, 1)


def _index(v, P, data):
    perm = data.draw(st.permutations(range(v.shape[0])))
    return v[jnp.asarray(perm)], P[np.asarray(perm)]


def _take(v, P, data):
    idx = data.draw(
        st.lists(st.integers(0, v.shape[0] - 1), min_size=1, max_size=2 * v.shape[0])
    )
    return jnp.take(v, jnp.asarray(idx), axis=0), P[np.asarray(idx)]


def _repeat(v, P, data):
    return jnp.repeat(v, 2, axis=0), np.repeat(P, 2, axis=0)


def _scatter_back(v, P, data):
    perm = np.asarray(data.draw(st.permutations(range(v.shape[0]))))
    out = np.empty_like(P)
    out[perm] = P
    return jnp.zeros_like(v).at[jnp.asarray(perm)].set(v), out


def _sort_by_keys(v, P, data):
    keys = np.asarray(
        data.draw(st.lists(st.integers(0, 3), min_size=v.shape[0], max_size=v.shape[0]))
    )
    full = jnp.broadcast_to(
        jnp.asarray(keys).reshape((-1,) + (1,) * (v.ndim - 1)), v.shape
    )
    order = np.argsort(keys, kind="stable")
    return lax.sort((full, v), dimension=0, num_keys=1)[1], P[order]


def _argsort_gather(v, P, data):
    """`order = argsort(keys)` then `v[order]` (the MoE token sort)."""
    keys = np.asarray(
        data.draw(st.lists(st.integers(0, 3), min_size=v.shape[0], max_size=v.shape[0]))
    )
    order = jnp.argsort(jnp.asarray(keys))  # stable, as NumPy's below
    return v[order], P[np.argsort(keys, kind="stable")]


def _concat(v, P, data):
    return jnp.concatenate([v, v[::-1]], axis=0), np.concatenate([P, P[::-1]], axis=0)


def _slice(v, P, data):
    if v.shape[0] < 2:
        return v, P
    return v[1:], P[1:]


def _elementwise(v, P, data):
    return jnp.tanh(v) * 2.0 + v, P


def _features(v, P, data):
    """A product over the feature axis (a projection) and back."""
    w = jnp.ones((v.shape[-1], 3), v.dtype)
    return (v @ w) @ w.T, P


OPS = [
    _flatten, _unflatten, _swap, _index, _take, _repeat, _scatter_back,
    _sort_by_keys, _argsort_gather, _concat, _slice, _elementwise, _features,
]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(OPS), min_size=1, max_size=6), st.data())
def test_positions_follow_the_rows(ops, data):
    x, P = _tagged(np.random.default_rng(0))
    reference = [P]

    def f(v):
        P = reference[0]
        for op in ops:
            v, P = op(v, P, data)
        reference[0] = P
        return v

    out = quax.quaxify(f)(x)
    assert isinstance(out, RowIds), [op.__name__ for op in ops]
    got = np.broadcast_to(np.asarray(out.pos), out.array.shape)
    np.testing.assert_array_equal(
        got, reference[0], err_msg=str([o.__name__ for o in ops])
    )


def test_rows_combined_across_requests_are_mixed():
    x, _ = _tagged(np.random.default_rng(1))
    out = quax.quaxify(lambda v: v.sum(axis=0))(x)  # over the batch: (T, D)
    assert (np.asarray(out.pos) == MIXED).all()
    out = quax.quaxify(lambda v: v.sum(axis=-1))(x)  # over features: kept
    np.testing.assert_array_equal(out.pos, np.arange(B * T).reshape(B, T))
    out = quax.quaxify(lambda v: v - v.mean(axis=0))(x)  # each row still its own
    np.testing.assert_array_equal(
        np.broadcast_to(out.pos, (B, T, D)), np.broadcast_to(x.pos, (B, T, D))
    )


def test_scatter_add_agrees_only_within_a_request():
    x, _ = _tagged(np.random.default_rng(2))

    def f(v, segments):
        flat = v.reshape(B * T, D)
        return jnp.zeros((B * T, D)).at[segments].add(flat)

    same = jnp.arange(B * T)  # each row to itself
    out = quax.quaxify(f)(x, same)
    np.testing.assert_array_equal(out.pos[:, 0], np.arange(B * T))
    pairs = jnp.arange(B * T) // 2  # rows 2k and 2k+1 (different tokens) meet
    out = quax.quaxify(f)(x, pairs)
    pos = np.asarray(out.pos[:, 0])
    assert (pos[: B * T // 2] == MIXED).all()  # two positions each
    assert (pos[B * T // 2 :] == MIXED).all()  # none: for no request


def test_positions_under_jit_and_vmap_free_ops():
    x, P = _tagged(np.random.default_rng(3))
    f = jax.jit(quax.quaxify(lambda v: jnp.flip(v.reshape(B * T, D), 0)[::2]))
    out = f(x)
    want = np.flip(P.reshape(B * T, D), 0)[::2]
    np.testing.assert_array_equal(np.broadcast_to(out.pos, out.array.shape), want)
