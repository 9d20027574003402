"""Adapted weights passed into a `jax.shard_map` body: each `BatchedLoraArray`
argument is split into its component arrays, each with the `PartitionSpec` that
follows from the weight's own in_spec, and rebuilt from the per-shard pieces in the
body, where the rules serve it as anywhere else.

quax's trace has no `process_shard_map`; `quax_compat.py` adds one, which uses
this module for the spec arithmetic (it touches no private API).

How a weight's in_spec reaches its parts (the factors' layout is
`Layout.factor_shapes`: `a` `(*stack, N, *in, r)`, `b` `(*stack, N, r, *out)`):

- `w`: the in_spec itself.
- a stack axis of `w` (the experts of a MoE, say) is in `a` and `b`, split the same
  way: each shard holds its own experts' adapters;
- an in-axis only in `a` (and `in_scale`): the body's `x_s @ w_s` and
  `(x_s @ a_s) @ b` are both partial sums over that axis, and the body's own `psum`
  adds them up, which is right because `b` is applied linearly:
  `Σ_s (x_s a_s) b = (Σ_s x_s a_s) b = x a b`;
- an out-axis only in `b` (and `out_scale`): each shard its own output columns;
- the adapter axis `N` and the rank axis `r` are never split; `scale`,
  `head_scale` and `generations` are replicated.
- `indices` label the activation's rows, so they are split the way the rows are:
  like the shard_map's plain inputs whose leading axes (the trailing free axes
  before the feature axis, for `batch_axis=-1`) have the indices' shape. No such
  input: replicated. Inputs that disagree: refused, as which of them holds the
  rows cannot be told from the shapes.

Registers `pvary` for `BatchedLoraArray`: in a body, JAX marks an operand as varying
over mesh axes (`pvary`) when it meets one that varies over more (the expert
weights, split over "expert", times activations split over "data"). The weight, its
factors and the variants' vectors are marked alike; the scales and the indices
(which belong to the rows) are left as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import quax
from jax import lax
from jax._src.core import pvary_p
from jax.sharding import PartitionSpec as P

from .._core.array import BatchedLoraArray
from .._core.errors import UnsupportedOperationError
from .._core.rows import MIXED, RowIds

_FIELDS = tuple(f.name for f in dataclasses.fields(BatchedLoraArray))
_REPLICATED = ("scale", "head_scale", "generations")


def _parts(spec: Any, ndim: int) -> tuple[Any, ...]:
    """The spec's entries, one per axis of an `ndim`-d array (`None`: unsplit)."""
    parts = tuple(spec.partitions)
    return parts + (None,) * (ndim - len(parts))


def _row_axes(shape: Sequence[int], k: int, batch_axis: int) -> tuple[int, ...]:
    """Where an input of `shape` would hold `k` row axes: leading for
    `batch_axis=0`, just before the last (feature) axis otherwise."""
    if batch_axis == 0:
        return tuple(range(k)) if len(shape) >= k else ()
    n = len(shape)
    return tuple(range(n - 1 - k, n - 1)) if n >= k + 1 else ()


def _indices_spec(
    lora: BatchedLoraArray,
    where: int,
    values: Sequence[Any],
    specs: Sequence[Any],
) -> P:
    """The spec of `lora.indices` in the body: the rows' split (module docstring)."""
    idx = lora.indices
    k = idx.ndim
    if k == 0:
        return P()
    found: dict[tuple[Any, ...], list[int]] = {}
    for i, (v, spec) in enumerate(zip(values, specs, strict=True)):
        if (isinstance(v, quax.Value) and not isinstance(v, RowIds)) or not isinstance(
            spec, P
        ):
            continue
        shape = tuple(v.shape)
        axes = _row_axes(shape, k, lora.batch_axis)
        if not axes or tuple(shape[a] for a in axes) != tuple(idx.shape):
            continue
        parts = _parts(spec, len(shape))
        found.setdefault(tuple(parts[a] for a in axes), []).append(i)
    if len(found) > 1:
        splits = "; ".join(
            f"argument(s) {args} split as {P(*split)}" for split, args in found.items()
        )
        raise UnsupportedOperationError(
            f"`jax.shard_map` argument {where} is an adapted weight (shape "
            f"{tuple(lora.shape)}) with per-row adapter indices of shape "
            f"{tuple(idx.shape)}. The indices label the activation's rows, so they "
            "are split in the body the way the rows are, taken from the plain "
            "arguments whose row axes have that shape; here those arguments are "
            f"split differently ({splits}), so which holds the rows is ambiguous. "
            "Give every argument with the rows' shape the same in_spec on its row "
            "axes (split the rows alike, or replicate them all)."
        )
    split = next(iter(found), (None,) * k)
    return P(*split)


def split_specs(
    lora: BatchedLoraArray,
    spec: Any,
    where: int,
    values: Sequence[Any],
    specs: Sequence[Any],
) -> dict[str, P]:
    """The `PartitionSpec` of each array field of `lora` (passed to shard_map as
    argument `where`, with in_spec `spec`) in the body; `values` and `specs` are
    all the shard_map's arguments, for the indices' rows."""
    if isinstance(lora.w, quax.Value):
        raise UnsupportedOperationError(
            f"`jax.shard_map` argument {where} is an adapted weight whose base weight "
            f"is a {type(lora.w).__name__} (shape {tuple(lora.shape)}): lorax_arrays "
            "splits plain base weights into a shard_map body, not quantised ones. "
            "Compute this weight's product outside the shard_map body, or serve it "
            "with a plain (dequantised) base weight."
        )
    if not isinstance(spec, P) or spec.unreduced or spec.reduced:
        raise UnsupportedOperationError(
            f"`jax.shard_map` argument {where} is an adapted weight (shape "
            f"{tuple(lora.shape)}) with in_spec {spec!r}; its factors are split "
            "from a plain PartitionSpec (no unreduced/reduced axes). Give it one, "
            "such as P('expert', None, 'tp')."
        )
    parts = _parts(spec, len(lora.shape))
    a_spec, b_spec = (P(*s) for s in lora.layout.factor_specs(parts))
    out = {"w": P(*parts), "a": a_spec, "b": b_spec}
    out |= {"in_scale": a_spec, "out_scale": b_spec}
    out |= {name: P() for name in _REPLICATED}
    if lora.indices is not None:
        out["indices"] = _indices_spec(lora, where, values, specs)
    return out


def split_arguments(
    values: Sequence[Any], specs: Sequence[Any], mesh: Any = None
) -> tuple[list[Any], tuple[Any, ...], Callable[[Sequence[Any]], list[Any]]]:
    """A shard_map's arguments with each `BatchedLoraArray` split into its array
    fields, and each activation carrying its rows' positions (`RowIds`) into its
    array and its positions.

    **Arguments:**

    - `values`: the arguments: plain arrays, `BatchedLoraArray`s and `RowIds`.
    - `specs`: their in_specs, one each.
    - `mesh`: the shard_map's mesh (for the positions of split rows).

    **Returns:**

    `(arrays, array_specs, rebuild)`: the flat arrays to bind shard_map over,
    their in_specs, and `rebuild(pieces)`, which takes the body's per-shard pieces
    (one per array, in order) back to one value per argument.
    """
    arrays: list[Any] = []
    out_specs: list[Any] = []
    plan: list[tuple[Any, tuple[str, ...]]] = []  # (lora or None, its fields)
    index_specs = []
    for i, (v, spec) in enumerate(zip(values, specs, strict=True)):
        if isinstance(v, RowIds):
            parts = _parts(spec, v.ndim) if isinstance(spec, P) else (None,) * v.ndim
            pos_spec = P(*(p if n > 1 else None for p, n in zip(parts, v.pos.shape)))
            arrays += [v.array, v.pos]
            out_specs += [spec, pos_spec]
            plan.append((v, ("rows",)))
            continue
        if not isinstance(v, BatchedLoraArray):
            arrays.append(v)
            out_specs.append(spec)
            plan.append((None, ()))
            continue
        field_specs = split_specs(v, spec, i, values, specs)
        if v.indices is not None and v.indices.ndim > 0:
            index_specs.append(tuple(field_specs["indices"]))
        names = tuple(
            n for n in _FIELDS if n in field_specs and getattr(v, n) is not None
        )
        arrays += [getattr(v, n) for n in names]
        out_specs += [field_specs[n] for n in names]
        plan.append((v, names))
    local = _local_rows(index_specs, mesh)

    def rebuild(pieces: Sequence[Any]) -> list[Any]:
        it = iter(pieces)
        out = []
        for lora, names in plan:
            if lora is None:
                out.append(next(it))
                continue
            if names == ("rows",):
                array, pos = next(it), next(it)
                out.append(local(lora.space, array, pos))
                continue
            fields = {n: getattr(lora, n) for n in _FIELDS}
            fields |= {n: next(it) for n in names}
            out.append(BatchedLoraArray.unchecked(**fields))
        return out

    return arrays, tuple(out_specs), rebuild


def _local_rows(index_specs: list[tuple[Any, ...]], mesh: Any) -> Callable:
    """How a `RowIds` is rebuilt in the body: its positions must index the body's
    own share of the adapter indices. Replicated indices: as they are. Indices
    split along their first axis only: the shard's positions, offset to its share
    (others' rows, which a consistent split never sends, are `MIXED`). Any other
    split, or weights split differently: the positions are dropped (a grouped
    matmul in the body then refuses, saying the rows lost them)."""

    def as_is(space, array, pos):
        return RowIds(array, pos, space)

    def dropped(space, array, pos):
        return array

    splits = set(index_specs)
    if not splits or all(all(p is None for p in s) for s in splits):
        return as_is
    if len(splits) > 1 or mesh is None:
        return dropped
    split = splits.pop()
    if any(p is not None for p in split[1:]):
        return dropped
    names = split[0] if isinstance(split[0], tuple) else (split[0],)
    shards = 1
    for name in names:
        shards *= mesh.shape[name]

    def offset(space, array, pos):
        if space[0] % shards:
            return array
        share = (space[0] // shards, *space[1:])
        size = 1
        for n in share:
            size *= n
        start = lax.axis_index(names) * size
        inside = (pos >= start) & (pos < start + size)
        return RowIds(array, jnp.where(inside, pos - start, MIXED), share)

    return offset


@quax.register(pvary_p)
def _(x: BatchedLoraArray, *, axes):
    def vary(v):
        return None if v is None else pvary_p.bind(v, axes=axes)

    return x.replace(
        w=vary(x.w),
        a=vary(x.a),
        b=vary(x.b),
        in_scale=vary(x.in_scale),
        out_scale=vary(x.out_scale),
    )
