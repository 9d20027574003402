"""What the adapter `indices` mean, in one place.

`indices` say which adapter each example (or token) uses; `-1` means the base weight
alone. Their path through the library, in order:

1. `coerce_indices`: what `lx.loraify`, `lx.with_indices` and the
    `BatchedLoraArray` constructor accept (Python ints and lists become int32;
    floats and bools are refused, never truncated).
2. `check_indices`: run by `BatchedLoraArray.__check_init__`: the dtype always,
    the range `[-1, n_adapters - 1]` when the values are concrete (not under `jit`).
3. `require_indices`: a rule that needs them raises `UnsetIndicesError` if they
    were never set.
4. `regroup`: a rule lines them up with the leading free axes of the activation
    (or of the token ids): equal, or a row-major regrouping of them, so `(B, T)`
    indices serve a `(B, T, D)` attention input and the `(B*T, D)` input of an MLP
    that flattens them. An array's `batch_axis` moves that span (`-1`: the
    trailing free axes, for time-major models). `align_indices` reshapes them onto
    it or raises `IndicesShapeError`, with advice that works for every layer of
    the model.
5. `clamp_indices` and `gathered_scale`: what the strategies (`_rules/strategies.py`)
    and the lookups receive: ids clamped into `[0, n)` (so `-1` reads adapter 0),
    and each row's scale, `0` where the index is `-1` and NaN where a traced index
    (of any integer dtype) lies outside `[-1, n)` (so that row is NaN, never
    another adapter's output). `scale_rows` applies that scale: a row of scale 0
    gets exactly 0, not `0 * (adapter 0's term)`, so a non-finite adapter 0 never
    reaches a base row (isolation), and the product is formed in the scale's
    precision (a float16 activation times `alpha / r` above 65504 stays finite).

Each kind of error has one message, built here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from . import lax as _lax
from .errors import IndicesShapeError, LoraIndexError, UnsetIndicesError

# -- 1. coercion ------------------------------------------------------------------


def coerce_indices(indices: Any) -> Array | None:
    """`indices` as a JAX integer array (or `None`, meaning not set yet).

    Python ints and sequences of them become int32; arrays keep their dtype.
    Anything that is not integer (floats, bools) raises `TypeError`: `0.7` must
    not silently become adapter 0.
    """
    if indices is None:
        return None
    if isinstance(indices, (list, tuple, int, float, bool)):
        values = _as_numpy(indices)
        check_representable(values)
        if values.size == 0 or np.issubdtype(values.dtype, np.integer):
            values = values.astype(np.int32)
        indices = values
    elif isinstance(indices, (np.ndarray, np.generic)):
        # Checked as given: converting first (int64 to JAX's int32, uint64 to
        # uint32) would wrap `2**32 + 1` to adapter 1.
        check_representable(np.asarray(indices))
    indices = jnp.asarray(indices)
    check_dtype(indices)
    return indices


def _as_numpy(indices: Any) -> np.ndarray:
    """Python values as a NumPy array; ints too large for int64 raise
    `LoraIndexError` quoting them (NumPy would give an object array or raise
    `OverflowError`)."""
    try:
        values = np.asarray(indices)
    except OverflowError:
        values = np.asarray(indices, dtype=object)
    if values.dtype == object:
        flat = [v for v in values.reshape(-1) if isinstance(v, int)]
        if flat:
            bad = max(flat, key=abs)
            raise LoraIndexError(unrepresentable_message(bad))
    return values


# Indices are served as int32 (JAX's default integer): no adapter number beyond this.
_INDEX_MAX = 2**31 - 1


def check_representable(values: np.ndarray) -> None:
    """`LoraIndexError` when concrete integer `values` hold a number beyond int32,
    quoting it as given: on the way to int32 it would wrap, `2**32 + 1` to adapter
    1. (Numbers within int32 are range-checked against the adapter count later,
    by `check_indices`.)"""
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < -_INDEX_MAX - 1:
        raise LoraIndexError(unrepresentable_message(lo))
    if hi > _INDEX_MAX:
        raise LoraIndexError(unrepresentable_message(hi))


def unrepresentable_message(bad: int) -> str:
    return (
        f"adapter index {bad} is out of range: indices are adapter numbers (0, 1, "
        "...) or -1 for the base weight alone."
    )


def check_dtype(indices: Any) -> None:
    """`TypeError` unless `indices` has an integer dtype."""
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(
            "`indices` must be an integer array (adapter numbers, -1 for the base "
            f"weight); got dtype {indices.dtype}. Convert with "
            "`jnp.asarray(indices, jnp.int32)`."
        )


# -- 2. range ---------------------------------------------------------------------


def check_indices(indices: Any, n_adapters: int) -> None:
    """The dtype always; the range `[-1, n_adapters - 1]` only when the values are
    concrete (under `jit` they are unknown: out-of-range rows come out NaN, see
    `gathered_scale`)."""
    check_dtype(indices)
    if isinstance(indices, jax.core.Tracer) or indices.size == 0:
        return
    values = np.asarray(indices)
    lo, hi = int(values.min()), int(values.max())
    if lo < -1 or hi >= n_adapters:
        raise LoraIndexError(out_of_range_message(lo if lo < -1 else hi, n_adapters))


def out_of_range_message(bad: int, n_adapters: int) -> str:
    return (
        f"adapter index {bad} is out of range: there are {n_adapters} adapters, "
        f"so indices must lie in [-1, {n_adapters - 1}] (-1 = base weight only)."
    )


# -- 3. set or not ----------------------------------------------------------------


def require_indices(lora: Any) -> Array:
    """`lora.indices`, or `UnsetIndicesError` when they were never set."""
    if lora.indices is None:
        raise UnsetIndicesError.for_array(lora)
    return lora.indices


# -- issued indices (AdapterBank) -------------------------------------------------
#
# An AdapterBank hands out `token * slots + slot` for a request served by `slot`,
# where `token` is the slot's *generation*: a number drawn, process-wide, each
# time a slot's content changes (a load, an eviction, a removal, an update). The
# value itself says what it was issued for, so a copy of it (`np.asarray(idx)`,
# `idx.tolist()`, `jnp.array(idx)`, an index passed traced into `jit`) still does,
# and another bank's slots (which never hold the same token) do not match it.
#
# They are decoded where they are given, once per call for every leaf (by
# `lx.loraify(tree, bank, idx)` and `lx.with_indices`, on the host when concrete
# and on the device when traced), so the arrays hold slot numbers and no rule pays
# for the check: a value that is not its slot's current issue becomes `n`, out of
# range, and its rows are NaN by `gathered_scale`.


def issued_value(token: int, slot: int, slots: int) -> int:
    """The index an `AdapterBank` hands out for `slot` at generation `token`."""
    return token * slots + slot


def decode_issued(indices: Array, generations: Array) -> Array:
    """Slot numbers from issued indices: `-1` stays `-1`; a value whose slot's
    generation is its token becomes that slot; anything else becomes `n` (out of
    range: its row is NaN). One gather per row, from the `(slots,)` generations.
    """
    n = generations.shape[0]
    if not isinstance(indices, jax.core.Tracer) and not isinstance(
        generations, jax.core.Tracer
    ):  # concrete: on the host, no device ops dispatched one by one
        return jnp.asarray(decode_issued_on_host(indices, generations))
    idx = indices.astype(jnp.int32) if indices.dtype != jnp.int32 else indices
    info = jnp.iinfo(indices.dtype)
    if info.max > _INDEX_MAX:  # uint32, int64, uint64: would wrap into int32
        big = indices > np.asarray(_INDEX_MAX).astype(indices.dtype)
        if info.min < -_INDEX_MAX - 1:
            big = big | (indices < np.asarray(-_INDEX_MAX - 1).astype(indices.dtype))
        idx = jnp.where(big, np.int32(-2), idx)
    slot = lax.rem(jnp.maximum(idx, 0), np.int32(n))
    token = lax.div(jnp.maximum(idx, 0), np.int32(n))
    current = _lax.take(generations.astype(jnp.int32), slot, 0)
    ok = (idx >= 0) & (current == token)
    return jnp.where(idx == -1, np.int32(-1), jnp.where(ok, slot, np.int32(n)))


def decode_issued_on_host(indices: Any, generations: Any) -> np.ndarray:
    """`decode_issued` for concrete values, in NumPy: int32 slot numbers, `-1`, or
    `n` where a value is not the current issue of its slot (so a caller can
    refuse it: `first_stale`)."""
    values = np.asarray(indices).astype(np.int64)
    gens = np.asarray(generations).astype(np.int64)
    n = gens.shape[0]
    slot = np.where(values >= 0, values % n, 0)
    ok = (values >= 0) & (gens[slot] == values // n)
    return np.where(values == -1, -1, np.where(ok, slot, n)).astype(np.int32)


def first_stale(indices: Any, decoded: np.ndarray, n: int) -> int | None:
    """The first value of `indices` that decoded to `n` (not a current issue), or
    None."""
    bad = np.flatnonzero(decoded.reshape(-1) == n)
    return int(np.asarray(indices).reshape(-1)[bad[0]]) if bad.size else None


def scalar_needed_message(what: str, indices_shape: Sequence[int]) -> str:
    """The one message for an operation whose result cannot hold one adapter per
    example: it needs a single adapter for the whole call (scalar indices)."""
    return (
        f"{what}, but the adapter indices have shape {tuple(indices_shape)} "
        "(per-example indices), and a single result cannot hold each example's "
        "adapter. Run the model per example under `jax.vmap` and set one "
        "example's scalar index inside it with `lx.with_indices` (see the docs' "
        "batching styles)."
    )


# -- 4. lining up with the activation ---------------------------------------------


def _is_regrouping(old: Sequence[int], new: Sequence[int]) -> bool:
    """Whether `new` comes from `old` by merging runs of consecutive axes or
    splitting single axes (size-1 axes aside): the reshapes under which row-major
    order keeps every row's position unambiguous. `(B, T) <-> (B*T,)` is one;
    `(2, 3) -> (3, 2)` is not."""
    old = [s for s in old if s != 1]
    new = [s for s in new if s != 1]
    i = j = 0
    while i < len(old) and j < len(new):
        if old[i] == new[j]:
            i, j = i + 1, j + 1
        elif old[i] < new[j]:  # merge old axes into new[j]
            p, i = old[i], i + 1
            while p < new[j] and i < len(old):
                p, i = p * old[i], i + 1
            if p != new[j]:
                return False
            j += 1
        else:  # split old[i] into new axes
            p, j = new[j], j + 1
            while p < old[i] and j < len(new):
                p, j = p * new[j], j + 1
            if p != old[i]:
                return False
            i += 1
    return i == len(old) and j == len(new)


def regroup(indices_shape: Sequence[int], free_shape: Sequence[int]) -> int | None:
    """How many leading axes of `free_shape` the indices stand for, or None.

    Equal shapes first; else the shortest prefix of `free_shape` of the same size
    that is a row-major regrouping of `indices_shape` (merging or splitting
    consecutive axes): `(B, T)` indices against free axes `(B*T, D)` give 1.
    """
    indices_shape, free_shape = tuple(indices_shape), tuple(free_shape)
    k = len(indices_shape)
    if free_shape[:k] == indices_shape:
        return k
    total = math.prod(indices_shape)
    for j in range(1, len(free_shape) + 1):
        size = math.prod(free_shape[:j])
        if size == total and _is_regrouping(indices_shape, free_shape[:j]):
            return j
        if size > total:
            break
    return None


def align_indices(
    indices: Array, free_shape: Sequence[int], what: str, batch_axis: int = 0
) -> tuple[Array, tuple[int, ...], int]:
    """`indices` reshaped (row-major) onto the axes of `free_shape` that they stand
    for, those axes' shape, and the position of the first of them;
    `IndicesShapeError` when they stand for none. `what` names the activation for
    the message.

    `batch_axis` (the array's own) says where those axes sit: from free axis
    `batch_axis` on when it is `>= 0` (`0`: the leading axes, the default), or
    ending at free axis `len(free_shape) + batch_axis` when negative (`-1`: the
    trailing free axes, for a time-major `(T, B, D)` activation).
    """
    free_shape = tuple(free_shape)
    span = _index_span(tuple(indices.shape), free_shape, batch_axis)
    if span is None:
        raise IndicesShapeError(
            shape_mismatch_message(indices.shape, free_shape, what, batch_axis)
        )
    lead = free_shape[span[0] : span[1]]
    return _lax.reshape(indices, lead), lead, span[0]


def _index_span(
    indices_shape: tuple[int, ...], free_shape: tuple[int, ...], batch_axis: int
) -> tuple[int, int] | None:
    """`(start, stop)`: the free axes the indices stand for, or None."""
    n = len(free_shape)
    if batch_axis >= 0:
        if batch_axis > n:
            return None
        j = regroup(indices_shape, free_shape[batch_axis:])
        return None if j is None else (batch_axis, batch_axis + j)
    stop = n + batch_axis + 1
    if stop < 0:
        return None
    # Regrouping merges or splits consecutive axes, so it reads the same reversed.
    j = regroup(indices_shape[::-1], free_shape[:stop][::-1])
    return None if j is None else (stop - j, stop)


def _per_token_shape(indices_shape, free_shape) -> tuple[int, ...] | None:
    """`(*indices_shape, T)` when the leading free axes hold `T` rows per index
    (a flattened `B*T` axis against per-sequence `(B,)` indices)."""
    total = math.prod(indices_shape)
    if total == 0:
        return None
    for j in range(1, len(free_shape) + 1):
        size = math.prod(free_shape[:j])
        if size > total and size % total == 0:
            shape = (*indices_shape, size // total)
            if _is_regrouping(shape, free_shape[:j]):
                return shape
    return None


def shape_mismatch_message(indices_shape, free_shape, what: str, batch_axis=0) -> str:
    """The one message for indices that do not line up with an activation."""
    indices_shape, free_shape = tuple(indices_shape), tuple(free_shape)
    where = (
        "Its leading free axes"
        if batch_axis == 0
        else f"Its free axes from axis {batch_axis} on"
        if batch_axis > 0
        else "Its trailing free axes"
        if batch_axis == -1
        else f"Its free axes ending at axis {batch_axis}"
    )
    msg = (
        f"The adapter indices have shape {indices_shape}, but {what} has free "
        f"axes {free_shape} (batch_axis={batch_axis}). {where} must equal the "
        "indices' shape, or be a row-major regrouping of them (merged or split "
        "consecutive axes: (B, T) indices serve both a (B, T, D) and a flattened "
        "(B*T, D) activation)."
    )
    if batch_axis == 0 and _index_span(indices_shape, free_shape, -1) is not None:
        return msg + (
            " They do match its trailing free axes: if the model is time-major "
            "(activations (T, B, D)), say so with `batch_axis=-1` "
            "(`lx.loraify(..., batch_axis=-1)` or `lx.with_indices(tree, indices, "
            "batch_axis=-1)`)."
        )
    per_token = _per_token_shape(indices_shape, free_shape)
    if per_token is not None:
        t = per_token[-1]
        row = "[:, None]" if len(indices_shape) == 1 else "[..., None]"
        return msg + (
            f" This layer sees {t} rows per index, as when a model flattens batch "
            "and sequence into one axis (B*T) for its MLP: give per-token indices "
            f"of shape (B, T) = {per_token}, which serve every layer, flattened or "
            "not: "
            f"`lx.with_indices(tree, jnp.broadcast_to(indices{row}, {per_token}))` "
            f"(the same as `jnp.repeat(indices{row}, {t}, axis=-1)`), not the flat "
            f"`jnp.repeat(indices, {t})`, which the unflattened layers refuse."
        )
    return msg + (
        " If the model runs per example under `jax.vmap`, set scalar indices "
        "inside the vmapped function (`lx.with_indices(model, index)`)."
    )


# -- 5. what the strategies receive -------------------------------------------------


def clamp_indices(indices: Array, n: int) -> Array:
    """Indices clamped into `[0, n)`: `-1` (base only) reads adapter 0, whose term
    the zero scale of `gathered_scale` then removes. Also used for token ids and
    tile ids, which must stay in bounds for the in-bounds gathers."""
    top = min(n - 1, int(jnp.iinfo(indices.dtype).max))  # n may not fit (uint8)
    lo, hi = np.zeros((), indices.dtype), np.full((), top, indices.dtype)
    return lax.clamp(lo, indices, hi)


def gathered_scale(scale: Array, indices: Array) -> Array:
    """`scale[indices]`, 0 where `indices == -1`, and NaN where `indices` lies
    outside `[-1, n_adapters)`.

    The NaN is how a traced out-of-range index is reported: a clamp alone would
    give that row the last adapter's output, another adapter's. Every rule scales
    its low-rank term by this, so the row's output is NaN, whichever strategy or
    lookup computes it. (An empty `AdapterBank` slot has NaN scales, to the same
    end.)

    One gather from the table `[0, *scale, NaN]` at `clamp(indices + 1)` computed
    in unsigned arithmetic, where every negative number below -1 wraps past the
    end: as many jaxpr equations (six) as the unguarded
    `select(i >= 0, scale[i], 0)` it replaced.
    """
    return guarded_take(scale, 0.0, indices)


def guarded_take(rows: Array, base: float, indices: Array, axis: int = 0) -> Array:
    """`rows[indices]` along `axis` (the adapter axis, `n` long): `base` for a
    `-1` (base) index and NaN for one outside `[-1, n)`, whatever `rows` hold, so
    a base row never reads an adapter's (possibly non-finite) values and a bad
    traced index is reported. One gather from the table `[base, *rows, NaN]` at
    `guard_rows(indices)`; the result has `indices`' axes in place of `axis`."""
    edge = rows.shape[:axis] + (1,) + rows.shape[axis + 1 :]
    table = lax.concatenate(
        [np.full(edge, base, rows.dtype), rows, np.full(edge, np.nan, rows.dtype)],
        axis,
    )
    return _lax.take(table, guard_rows(indices, rows.shape[axis]), axis)


def guard_rows(indices: Array, n: int) -> Array:
    """Each index's row in a table `[base, adapter 0, ..., adapter n-1, invalid]`:
    `indices + 1` for `-1 <= indices < n`, and `n + 1` for every other value, of
    any integer dtype.

    Signed: `indices + 1` in unsigned arithmetic, where every negative number
    below -1 wraps past the end, clamped. Unsigned (which has no -1): `+ 1` would
    wrap the largest value (`uint8` 255, `uint32` 2**32 - 1) to row 0, the base,
    so those are clamped to `n` first, which stays representable and lands on the
    invalid row."""
    dtype = indices.dtype
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        if n + 1 > int(jnp.iinfo(dtype).max):  # n + 1 must fit: widen first
            wide = np.dtype(f"uint{16 * dtype.itemsize}")
            return guard_rows(lax.convert_element_type(indices, wide), n)
        row = lax.clamp(np.zeros((), dtype), indices, np.full((), n, dtype))
        return lax.add(row, np.ones((), dtype))
    unsigned = np.dtype(f"uint{8 * dtype.itemsize}")
    row = lax.convert_element_type(lax.add(indices, np.ones((), dtype)), unsigned)
    return lax.clamp(np.zeros((), unsigned), row, np.full((), n + 1, unsigned))


def scale_rows(u: Array, s: Array) -> Array:
    """`u * s` (`s` broadcasting against `u`, one scale per row), but exactly 0
    where `s == 0` (a base row), whatever `u` holds there.

    A base row computes with adapter 0's factors (its index is clamped to 0), so
    `0 * u` would be NaN for it if adapter 0 were non-finite: one tenant's
    corrupt adapter would change base rows. The product is formed in the wider
    of the two dtypes and cast back, so a float16 `u` times a scale beyond
    float16's range gives the true (representable) result, not infinity."""
    s = jnp.asarray(s)
    wide = jnp.promote_types(u.dtype, s.dtype)
    prod = (u.astype(wide) * s.astype(wide)).astype(u.dtype)
    return jnp.where(s == 0, jnp.zeros((), u.dtype), prod)


def zero_base_rows(u: Array, s: Array) -> Array:
    """`u` with the rows where `s == 0` (base rows, `s` broadcasting against `u`)
    set to exactly 0: for a low-rank term whose scale was applied earlier, on a
    narrower intermediate, and which a later product with a non-finite factor
    could have made NaN there."""
    return jnp.where(jnp.asarray(s) == 0, jnp.zeros((), u.dtype), u)
