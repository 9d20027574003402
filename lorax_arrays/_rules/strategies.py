"""How the low-rank term `s · (x · A[i]) · B[i]` is computed.

Every rewrite is first brought to one canonical problem:

    x:   (S, G, R, d_in)   S = stack (dot_general batch) groups, G = indexed rows
                           (examples, or tokens with per-token indices), R = tokens
                           that share a row's adapter
    a:   (S, n, d_in, r)   every adapter's A, in-axes flattened
    b:   (S, n, r, d_out)  every adapter's B, out-axes flattened
    ids: (G,)              adapter per row, clipped to [0, n)
    s:   (G,)              that adapter's scale, 0 for base-only rows (-1)

and every strategy returns `(S, G, R, d_out)`. They agree to float tolerance; they
differ in cost:

- `gather`: gathers `A[i]`, `B[i]` once per row. For one adapter per sequence,
  and for decode on CPU (one token per row), where `· B[i]` is a multiply-add
  over the rank instead of `G` one-row matmuls.
- `dense`: `x · A` for every adapter, masked by a one-hot. For few adapters,
  per-token indices and decode.
- `segment`: sorts tokens by adapter, grouped matmul, unsorts (Punica's SGMV).
  For per-token indices and many adapters.

`auto` picks one from the shapes and the backend (`choose`).
With a single adapter (`n == 1`) they are all the plain LoRA product: two matmuls
and a per-row scale, no gather, no mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._core.errors import UnsupportedOperationError
from .._core.indices import clamp_indices, scale_rows
from .._core.lax import convert, explicit_spec, take
from .._core.options import STRATEGIES as STRATEGIES, check_strategy as check_strategy

_call_strategy: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lorax_arrays_strategy", default=None
)
# Which grouped-matmul kernel `segment` uses: "tiled" (sort, pad each adapter's
# tokens to whole tiles, one small matmul per tile) or "ragged"
# (`jax.lax.ragged_dot`). None = by backend: ragged_dot is slow on CPU.
_segment_kernel: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lorax_arrays_segment_kernel", default=None
)


@contextlib.contextmanager
def call_strategy(strategy: str | None):
    """Forces `strategy` for every BatchedLoraArray traced inside the block."""
    token = _call_strategy.set(strategy)
    try:
        yield
    finally:
        _call_strategy.reset(token)


def current_strategy() -> str | None:
    """The strategy forced for this call (`lx.quaxify(f, strategy=...)`), if any."""
    return _call_strategy.get()


@contextlib.contextmanager
def segment_kernel(kernel: str | None):
    if kernel not in (None, "tiled", "ragged"):
        raise ValueError(f"segment kernel must be 'tiled' or 'ragged', got {kernel!r}")
    token = _segment_kernel.set(kernel)
    try:
        yield
    finally:
        _segment_kernel.reset(token)


class StrategyChoice(NamedTuple):
    """One decision of `resolve`, as `lx.explain_strategies` reports it."""

    primitive: str
    shapes: dict[str, Any]
    strategy: str
    reason: str


# Where `resolve` records its decisions while `record_strategies` is active.
_recorded: contextvars.ContextVar[list[StrategyChoice] | None] = contextvars.ContextVar(
    "lorax_arrays_recorded_strategies", default=None
)


@contextlib.contextmanager
def record_strategies():
    """Collects every `resolve` decision traced inside the block into the list it
    yields."""
    records: list[StrategyChoice] = []
    token = _recorded.set(records)
    try:
        yield records
    finally:
        _recorded.reset(token)


def resolve(
    array_strategy: str,
    shapes: tuple[int, ...],
    *,
    primitive: str = "dot_general",
    operands: dict[str, Any] | None = None,
    explicit: bool = False,
) -> str:
    """The strategy to use: a per-call override, else the array's, else `auto`.

    `shapes` are the canonical sizes `(S, G, R, d_in, d_out, n, rank)`;
    `operands` (the operands' shapes, by name) and `primitive` only label the
    decision when it is being recorded (`record_strategies`). `explicit`: the
    operands live on an explicit-sharding mesh, where only `gather` says where
    each of its results goes (`auto` picks it; the others are refused).
    """
    forced = _call_strategy.get()
    strategy = forced or array_strategy
    if explicit and strategy not in ("auto", "gather"):
        raise UnsupportedOperationError(
            f"strategy={strategy!r} on an explicit-sharding mesh "
            "(`jax.sharding.AxisType.Explicit`): only 'gather' places its results "
            "there yet. Use strategy='gather' or 'auto' (which picks it on such "
            "meshes)."
        )
    if explicit:
        chosen = "gather"
    else:
        chosen = choose(*shapes) if strategy == "auto" else strategy
    records = _recorded.get()
    if records is not None:
        records.append(
            _explained(primitive, shapes, operands, forced, chosen, strategy)
        )
    return chosen


def _explained(primitive, shapes, operands, forced, chosen, strategy):
    names = ("S", "G", "R", "d_in", "d_out", "n_adapters", "rank")
    sizes = dict(zip(names, shapes))
    if forced:
        reason = f"forced for this call: `lx.quaxify(f, strategy={forced!r})`"
    elif strategy != "auto":
        reason = f"the array's own `strategy={strategy!r}`"
    elif sizes["G"] <= 1:
        reason = "auto: a single indexed row (G = 1), whose adapter is gathered once"
    elif _rowwise_b(sizes["G"], sizes["R"], sizes["rank"]):
        reason = (
            f"auto: decode on CPU (G = {sizes['G']} rows of one token, rank "
            f"{sizes['rank']}): gathered, with `· B[i]` a multiply-add over the rank "
            "(measured by benchmarks/decode_forms.py)"
        )
    else:
        reason = (
            "auto: the cheapest by the cost model (flops plus bytes moved, for the "
            f"{jax.default_backend()} backend) for G = {sizes['G']} indexed rows of "
            f"R = {sizes['R']} tokens over {sizes['n_adapters']} adapters"
        )
    if sizes["n_adapters"] == 1:
        reason += "; with one adapter every strategy is the plain LoRA product"
    return StrategyChoice(primitive, {**(operands or {}), **sizes}, chosen, reason)


def choose(s: int, g: int, r_tok: int, d_in: int, d_out: int, n: int, rank: int):
    """`auto`: the cheapest strategy by a rough cost model (flops, plus bytes moved
    weighted by the backend's flops-per-byte). The sizes of the canonical problem;
    `s` (the stack groups) multiplies every cost alike, so it never changes the
    choice."""
    del s
    if g <= 1:
        return "gather"
    if _rowwise_b(g, r_tok, rank):
        # Decode on CPU: `gather` with its multiply-add `· B[i]`. Measured
        # (`benchmarks/decode_forms.py`): near `segment` in a scanned layer
        # stack, and 2-10x faster than `segment` and `dense` when each layer is
        # its own product; this cost model does not see the difference.
        return "gather"
    per_byte = 4.0 if jax.default_backend() == "cpu" else 64.0
    m = g * r_tok
    width = rank * (d_in + d_out)
    tile = _tile_size(m, n)
    cost = {
        "gather": 2 * m * width + per_byte * 4 * 2 * g * width,
        "dense": 2 * m * n * width + per_byte * 4 * n * width,
        "segment": 2 * (m + n * tile) * width
        + per_byte * 4 * (n * width + 3 * m * (d_in + d_out)),
    }
    return min(cost, key=cost.get)


def low_rank(strategy, x, a, b, ids, s, *, precision=None, pref=None):
    """`s[g] · (x[:, g] · a[:, ids[g]]) · b[:, ids[g]]` for the canonical problem."""
    if a.shape[1] == 1:  # one adapter: every strategy is the plain LoRA product
        return _single(x, a, b, s, precision, pref)
    fn = {"gather": _gather, "dense": _dense, "segment": _segment}[strategy]
    return fn(x, a, b, ids, s, precision, pref)


# Isolation: every strategy returns exactly 0 on base rows (scale 0) and leaves
# each row untouched by every adapter but its own, even a non-finite one. Each
# applies the row's scale last, with `scale_rows` (a base row reads adapter 0's
# factors; its zero scale is a select, not `0 * u`). `_dense`, which multiplies
# every row by every adapter, also selects by its one-hot instead of multiplying,
# and reads non-finite B entries as 0, flagging the rows of their adapter NaN.


def _bmm(x, y, precision, pref):
    """`(S, G, t, i) · (S, G, i, o) -> (S, G, t, o)`: one batched `dot_general`."""
    dn = (((3,), (2,)), ((0, 1), (0, 1)))
    return lax.dot_general(x, y, dn, precision=precision, preferred_element_type=pref)


def _on_rows(s, u):
    """`s` (G,) shaped to broadcast over the G axis of `u` `(S, G, R, ...)`."""
    return lax.reshape(s, (1, s.shape[0]) + (1,) * (u.ndim - 2))


def _scaled(u, s):
    """`u * s` over the G axis of `(S, G, R, ...)`; exactly 0 on base rows
    (`scale_rows`)."""
    return scale_rows(u, _on_rows(s, u))


def _single(x, a, b, s, precision, pref):
    """`n == 1`: `((x · A) · B) * s` with plain matmuls, no gather and no mask. The
    per-row scale (0 for base-only rows) is applied last, as in `_gather`: to the
    rank-wide `x · A` it could overflow a float16 intermediate (`alpha / r` of
    1e5) although the row's result is small."""
    s_, _, d_in, rank = a.shape
    dn = (((3,), (1,)), ((0,), (0,)))
    a1 = lax.reshape(a, (s_, d_in, rank))
    t = lax.dot_general(x, a1, dn, precision=precision, preferred_element_type=pref)
    t = convert(t, x.dtype)  # (S, G, R, r)
    b1 = lax.reshape(b, (s_, rank, b.shape[-1]))
    u = lax.dot_general(t, b1, dn, precision=precision, preferred_element_type=pref)
    return _scaled(u, s)


# Where `_gather` computes a decode product's `· B[i]` as a multiply-add over
# the rank (`_times_rows_b`), and `auto` picks `gather` for it: the measured
# ranks (8 and 16) and rows (8 to 64; more rows of one token each are per-token
# indices, which the cost model decides).
_ROWWISE_MAX_RANK = 16
_ROWWISE_MAX_ROWS = 64


def _gather(x, a, b, ids, s, precision, pref):
    x_spec = explicit_spec(x)
    if x_spec is not None and explicit_spec(ids) != (x_spec[1],):
        # An explicit-sharding mesh: the gathered rows must be placed as x's rows
        # (host-made indices arrive replicated).
        ids = jax.sharding.reshard(ids, jax.sharding.PartitionSpec(x_spec[1]))
        s = jax.sharding.reshard(s, jax.sharding.PartitionSpec(x_spec[1]))
    a_g = take(a, ids, 1)  # (S, G, d_in, r)
    t = convert(_bmm(x, a_g, precision, pref), x.dtype)
    if _rowwise_b(x.shape[1], x.shape[2], b.shape[2]):
        return _scaled(_times_rows_b(t, b, ids, pref), s)
    b_g = take(b, ids, 1)  # (S, G, r, d_out)
    return _scaled(_bmm(t, b_g, precision, pref), s)


def _rowwise_b(g: int, r_tok: int, rank: int) -> bool:
    """Whether `_gather` takes `· B[i]` as a multiply-add over the rank: decode
    (up to 64 rows of one token each) on CPU, at the ranks measured."""
    return (
        r_tok == 1
        and g <= _ROWWISE_MAX_ROWS
        and rank <= _ROWWISE_MAX_RANK
        and jax.default_backend() == "cpu"
    )


def _times_rows_b(t, b, ids, pref):
    """`t · B[ids]` for one token per row (`t: (S, G, 1, r)`), as `Σ_k t[k] ·
    B[ids, k, :]`: the rows gathered once, then products and a halving sum over
    the rank, elementwise over `d_out`. On CPU the batched matmul of `G` one-row
    products cost up to 2.3x as much in an unscanned model, about the same in a
    scanned layer stack (`benchmarks/decode_forms.py`). The gather
    stays its own op (the barrier): fused into the sum, XLA CPU copies the whole
    `B` slice of a scanned layer at every step, which costs more with more
    adapters. Sums in at least float32, as a dot accumulates; returns the dot's
    dtype."""
    s_, g, _, rank = t.shape
    d_out = b.shape[-1]
    out = pref or t.dtype
    acc = jnp.promote_types(out, jnp.float32)
    b_g = lax.optimization_barrier(take(b, ids, 1))  # (S, G, r, d_out)
    t = convert(lax.reshape(t, (s_, g, rank)), acc)
    p = lax.mul(lax.broadcast_in_dim(t, b_g.shape, (0, 1, 2)), convert(b_g, acc))
    u = _halving_sum(p, 2)  # (S, G, d_out)
    return convert(lax.reshape(u, (s_, g, 1, d_out)), out)


def _halving_sum(p, axis):
    """`p` summed over `axis` by adding halves: elementwise adds only, so XLA CPU
    vectorises over the other axes (its reduction over a non-minor axis does
    not)."""
    odd = []
    while p.shape[axis] > 1:
        n = p.shape[axis]
        if n % 2:
            odd.append(lax.slice_in_dim(p, n - 1, n, axis=axis))
            n -= 1
        half = n // 2
        p = lax.add(
            lax.slice_in_dim(p, 0, half, axis=axis),
            lax.slice_in_dim(p, half, n, axis=axis),
        )
    for q in odd:
        p = lax.add(p, q)
    return lax.squeeze(p, (axis,))


def _dense(x, a, b, ids, s, precision, pref):
    s_, g, r_tok, d_in = x.shape
    n = a.shape[1]
    # mask[g, j] = s[g] if ids[g] == j else 0: a scaled one-hot.
    hit = lax.eq(
        lax.broadcast_in_dim(ids, (g, n), (0,)),
        lax.broadcasted_iota(ids.dtype, (g, n), 1),
    )
    dn = (((3,), (2,)), ((0,), (0,)))  # x · A for every adapter: (S, G, R, n, r)
    t = lax.dot_general(x, a, dn, precision=precision, preferred_element_type=pref)
    # Selected by the one-hot, not multiplied by it: another adapter's non-finite
    # A gives 0 here, not 0 · NaN. The scale comes last (as in `_single`).
    keep = lax.broadcast_in_dim(hit, t.shape, (1, 3))
    t = convert(lax.select(keep, t, lax.full(t.shape, 0, t.dtype)), x.dtype)
    # Every row meets every adapter's B below: non-finite entries are read as 0
    # and the rows of their adapter flagged NaN instead.
    finite = jnp.isfinite(b)
    b_ok = jnp.all(finite, axis=(2, 3))  # (S, n)
    b = jnp.where(finite, b, jnp.zeros((), b.dtype))
    dn = (((3, 4), (1, 2)), ((0,), (0,)))  # summed over adapters and rank
    u = _scaled(
        lax.dot_general(t, b, dn, precision=precision, preferred_element_type=pref),
        s,
    )
    row_ok = take(b_ok, ids, 1) | (s == 0)[None, :]  # (S, G); base rows are fine
    nan = jnp.full((), jnp.nan, u.dtype)
    return jnp.where(lax.reshape(row_ok, row_ok.shape + (1, 1)), u, nan)


def _tile_size(m: int, n: int) -> int:
    """Tokens per tile: large enough to be a real matmul, small enough that padding
    each adapter's group to whole tiles (at most n tiles of padding) stays cheap."""
    target = max(1, m // (4 * n))
    return int(min(128, max(8, 2 ** math.floor(math.log2(target)))))


# Largest tokens x adapters for which `_group_ranks` counts with a one-hot.
_ONEHOT_MAX = 2**22


def _group_ranks(tok_ids, n):
    """Each token's rank among the tokens of its adapter (in token order), and the
    token count per adapter: where a stable sort by adapter would put it, without
    the sort. A cumulative one-hot count when `(tokens, n)` is small, else one
    argsort and a scatter (no second sort for the inverse)."""
    m = tok_ids.shape[0]
    if m * n <= _ONEHOT_MAX:
        onehot = (tok_ids[:, None] == jnp.arange(n, dtype=tok_ids.dtype)).astype(
            jnp.int32
        )
        seen = jnp.cumsum(onehot, axis=0)  # (m, n): tokens of each adapter so far
        return jnp.sum(seen * onehot, axis=1) - 1, seen[-1]
    order = jnp.argsort(tok_ids, stable=True)
    counts = jnp.bincount(tok_ids, length=n)
    where = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
    start = jnp.cumsum(counts) - counts
    return where - start[tok_ids], counts


def _segment(x, a, b, ids, s, precision, pref):
    s_, g, r_tok, d_in = x.shape
    n = a.shape[1]
    m = g * r_tok
    tok_ids = jnp.repeat(ids, r_tok, total_repeat_length=m) if r_tok > 1 else ids
    xt = x.reshape(s_, m, d_in)
    rank, counts = _group_ranks(tok_ids, n)
    kernel = _segment_kernel.get()
    if kernel is None:
        kernel = "tiled" if jax.default_backend() == "cpu" else "ragged"
    if kernel == "ragged":
        start = jnp.cumsum(counts) - counts
        dest = start[tok_ids] + rank  # each token's row in adapter-sorted order
        x_sorted = _scatter_rows(xt, dest, m)
        # ragged_dot has no batching rule over its group axis: loop over the
        # (static, usually single) stack groups instead.
        u = jnp.stack(
            [
                _ragged(x_sorted[j], a[j], b[j], counts, precision, pref)
                for j in range(s_)
            ]
        )
    else:
        u, dest = _tiled(xt, a, b, tok_ids, rank, counts, precision, pref)
    u = take(u, dest, 1)  # back to token order
    return _scaled(u.reshape(s_, g, r_tok, -1), s)


def _scatter_rows(xt, dest, rows):
    """`out[:, dest[t]] = xt[:, t]` into `rows` zero rows (`dest` has no repeats)."""
    out = jnp.zeros((xt.shape[0], rows, xt.shape[2]), xt.dtype)
    return out.at[:, dest].set(xt, unique_indices=True, mode="promise_in_bounds")


def _ragged(x_sorted, a, b, counts, precision, pref):
    t = jax.lax.ragged_dot(
        x_sorted, a, counts, precision=precision, preferred_element_type=pref
    ).astype(x_sorted.dtype)
    return jax.lax.ragged_dot(
        t, b, counts, precision=precision, preferred_element_type=pref
    )


def _tiled(xt, a, b, tok_ids, rank, counts, precision, pref):
    """Grouped matmul without ragged_dot: each adapter's tokens are laid out
    contiguously and padded to whole tiles; each tile gathers its adapter's factors
    once. Returns the padded result and each token's row in it."""
    s_, m, d_in = xt.shape
    n = a.shape[1]
    tile = _tile_size(m, n)
    shift = jnp.asarray(tile.bit_length() - 1, counts.dtype)  # tile is a power of 2
    n_tiles = -(-m // tile) + n  # every group adds at most one partial tile
    padded = lax.shift_left(lax.shift_right_logical(counts + (tile - 1), shift), shift)
    padded_end = jnp.cumsum(padded)
    dest = (padded_end - padded)[tok_ids] + rank
    tile_start = jnp.arange(n_tiles, dtype=padded_end.dtype) * tile
    # The adapter of each tile: how many groups end at or before its start.
    tile_ids = jnp.sum(padded_end[None, :] <= tile_start[:, None], axis=1)
    tile_ids = clamp_indices(tile_ids.astype(jnp.int32), n)
    x_pad = _scatter_rows(xt, dest, n_tiles * tile).reshape(s_, n_tiles, tile, d_in)
    a_t = take(a, tile_ids, 1)  # (S, tiles, d_in, r)
    b_t = take(b, tile_ids, 1)  # (S, tiles, r, d_out)
    t = convert(_bmm(x_pad, a_t, precision, pref), xt.dtype)
    u = _bmm(t, b_t, precision, pref)
    return u.reshape(s_, n_tiles * tile, -1), dest
