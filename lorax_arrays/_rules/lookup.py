"""Dispatch rules for lookups: `E[tokens]` keeps the low-rank form.

Registers: `gather`, `dynamic_slice`. Also here: `squeezed_lookup`, which the
`squeeze` rule (`_rules/shape.py`) hands a squeeze that leaves a single row.

For a table `w: (vocab, d)` adapted with `in_axes=(0,)` (the vocabulary axis is what
a one-hot token contracts with) and `out_axes=(1,)`, the lookup of token `t` for an
example using adapter `i` is `w[t] + s_i * a[i, t] @ b[i]`: a gather of one row of A,
never of the dense `W + AB`. This is the delta PEFT uses for embeddings. The other
group may have several axes (Gemma 4's per-layer table `(V, L, P)` with
`out_axes=(1, 2)`): the row is `a[i, t] @ b[i]` laid out on them. A lookup along an
out axis (`E[:, j]`) reads the table the other way round (`swap_in_out`, with the
head scales). A lookup along a stack axis, or along one axis of a multi-axis group,
is not a row lookup.

Also here, because they are the other ways JAX indexes a table:

- `dynamic_slice` of any other block (`W[i]` with a traced `i` on a layer stack,
  `lax.dynamic_index_in_dim`), and a `gather` of one layer (`jnp.take(W, i,
  axis=0)`), slice `w`, and `a`/`b` along the same axes: the result is still a
  BatchedLoraArray;
- a squeeze that removes every in-axis (or out-axis), which is what a static lookup
  `E[3]` becomes after `slice`: the row itself, for scalar indices.
- a `gather` of whole entries along stack axes, `w[experts]` on an expert stack
  `(E, D, F)` with `experts: (B, T, k)` (`_entries_gather`): a BatchedLoraArray
  whose stack axes are `(B, T, k)`, each entry's factors gathered with its
  example's adapter already chosen.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import quax
from jax import lax

from .._core import lax as _lax
from .._core.array import BatchedLoraArray, bind, swap_in_out
from .._core.errors import IndicesShapeError, UnsupportedOperationError
from .._core.indices import (
    align_indices,
    clamp_indices,
    gathered_scale,
    require_indices,
    scalar_needed_message,
    scale_rows,
    zero_base_rows,
)
from .._core.lax import convert, take
from .._core.layout import Layout


def _lookup_view(lora: BatchedLoraArray, axis: int) -> BatchedLoraArray | None:
    """The array read so that `axis` is its single in-axis (as it is, or the other
    way round: `swap_in_out`), or None when a lookup along `axis` is not a row
    lookup: a stack axis, or one axis of a multi-axis group."""
    if lora.stack_axes:
        return None
    if lora.in_axes == (axis,):
        return lora
    if lora.out_axes == (axis,):
        return swap_in_out(lora)
    return None


def _rows_delta(view: BatchedLoraArray, tokens, what):
    """`s[i] * a[i, tok] @ b[i]` for a table `view` read along its single in-axis:
    shaped `(*tokens.shape, *rest)`, `rest` the table's other axes in their order,
    for tokens whose leading axes are the indices' (or a row-major regrouping of
    them: `(B*T,)` tokens with `(B, T)` indices; or other axes, by the array's
    `batch_axis`)."""
    table = f"{what}: the token ids (shape {tuple(tokens.shape)}) of an adapted table"
    idx, lead, start = align_indices(
        require_indices(view), tokens.shape, table, view.batch_axis
    )
    k = len(lead)
    n, rank = view.a.shape[0], view.rank
    out_shape = view.layout.out_shape(view.shape)
    b = _lax.reshape(view.b, (n, rank, math.prod(out_shape)))
    nd = tokens.ndim
    if start:  # the indexed axes first, and back afterwards
        perm = [*range(start, start + k), *range(start), *range(start + k, nd)]
        u = _rows_delta_leading(view, b, _lax.transpose(tokens, perm), idx, k)
        u = _lax.transpose(u, [*[perm.index(d) for d in range(nd)], nd])
    else:
        u = _rows_delta_leading(view, b, tokens, idx, k)
    # The table's other axes, in the weight's own order.
    u = _lax.reshape(u, (*tokens.shape, *out_shape))
    order = sorted(range(len(out_shape)), key=lambda j: view.out_axes[j])
    return _lax.transpose(u, [*range(nd), *(nd + j for j in order)])


def _rows_delta_leading(lora, b, tokens, idx, k):
    """`_rows_delta` for tokens whose first `k` axes are the (aligned) indices',
    with `b` flattened to `(n, r, d)`: `(*tokens.shape, d)`."""
    a = lora.a
    n, vocab, rank = a.shape
    safe = clamp_indices(idx, n)
    # rows[..] = a[safe[i], tokens[i, ..]]: one gather over (adapter, row) pairs.
    pairs = [
        lax.broadcast_in_dim(safe, tokens.shape, tuple(range(k))),
        clamp_indices(tokens, vocab),
    ]
    pairs = lax.concatenate(
        [lax.expand_dims(p, (tokens.ndim,)) for p in pairs], tokens.ndim
    )
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(tokens.ndim,), collapsed_slice_dims=(0, 1), start_index_map=(0, 1)
    )
    rows = lax.gather(
        a, pairs, dnums, (1, 1, rank), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )  # (*tokens.shape, r)
    b_g = take(b, safe, 0)  # (*I, r, d)
    rest = tokens.ndim - k
    u = lax.dot_general(
        rows,
        convert(b_g, rows.dtype),
        (((rows.ndim - 1,), (k,)), (tuple(range(k)), tuple(range(k)))),
    )  # (*I, *rest, d)
    s = gathered_scale(lora.scale, idx)
    return scale_rows(u, s.reshape(s.shape + (1,) * (rest + 1)))


@quax.register(lax.gather_p)
def _(operand: BatchedLoraArray, start_indices, **params):
    what = "Embedding lookup (gather)"
    dn = params["dimension_numbers"]
    sizes = tuple(params["slice_sizes"])
    shape = tuple(operand.shape)
    rows = [ax for ax in range(len(shape)) if sizes[ax] != shape[ax]]
    view = None
    if len(rows) == 1 and not dn.operand_batching_dims:
        (axis,) = rows
        if (
            sizes[axis] == 1
            and axis in dn.start_index_map
            and set(dn.collapsed_slice_dims) <= {axis}
        ):
            view = _lookup_view(operand, axis)
    if view is None:
        block = _stack_gather(operand, start_indices, dn, sizes)
        if block is None:
            block = _entries_gather(operand, start_indices, dn, sizes, params)
        if block is not None:
            return block
        if operand.allow_materialise:  # opted in: dense per-example weights
            return BatchedLoraArray.default(
                lax.gather_p, (operand, start_indices), params
            )
        raise UnsupportedOperationError(
            f"`gather` on a BatchedLoraArray of shape {shape} (in_axes="
            f"{operand.in_axes}, out_axes={operand.out_axes}, stack_axes="
            f"{operand.stack_axes}) with {dn} and slice_sizes={sizes}: only "
            "whole-row lookups along the table's single in-axis (or single "
            "out-axis), `E[tokens]` or `jnp.take(E, tokens, axis=0)`, and "
            "gathers of whole entries along stack axes (`w[experts]`, "
            "`jnp.take(w, experts, axis=0)` on an expert stack) keep the "
            "low-rank form (slice a layer stack with lax.scan first). Pass "
            "`allow_materialise=True` to build dense weights for this op."
        )
    _no_variants(operand, what)
    base = bind(lax.gather_p, operand.frozen_w, start_indices, **params)
    tokens = start_indices[..., list(dn.start_index_map).index(axis)]
    delta = _rows_delta(view, tokens, what)  # (*batch, *other axes)
    if axis not in dn.collapsed_slice_dims:  # the size-1 row axis is kept
        delta = jnp.expand_dims(delta, axis - len(shape))
    n_offset = len(dn.offset_dims)
    delta = jnp.moveaxis(delta, tuple(range(-n_offset, 0)), tuple(dn.offset_dims))
    return base + delta.astype(base.dtype)


@quax.register(lax.dynamic_slice_p)
def _(operand: BatchedLoraArray, *starts, slice_sizes):
    what = "Embedding lookup (dynamic_slice)"
    shape = tuple(operand.shape)
    sizes = tuple(slice_sizes)
    rows = [ax for ax in range(len(shape)) if sizes[ax] != shape[ax]]
    view = None
    if len(rows) == 1 and sizes[rows[0]] == 1:
        (axis,) = rows
        view = _lookup_view(operand, axis)
    if view is None:
        return _dynamic_block(operand, starts, sizes)
    _no_variants(operand, what)
    base = bind(lax.dynamic_slice_p, operand.frozen_w, *starts, slice_sizes=sizes)
    token = jnp.asarray(starts[axis])
    if operand.indices is not None and operand.indices.ndim:
        token = jnp.broadcast_to(token, operand.indices.shape)
    delta = _rows_delta(view, token, what)  # (*I, *other axes)
    if delta.ndim != len(shape) - 1:
        raise IndicesShapeError(
            scalar_needed_message(
                f"{what}: one token is looked up", operand.indices.shape
            )
        )
    delta = jnp.expand_dims(delta, axis)
    return base + delta.astype(base.dtype)


def _stack_gather(lora: BatchedLoraArray, start_indices, dn, sizes):
    """One layer of a stack by `gather` (`jnp.take(W, i, axis=0)`, scalar `i`): the
    same block as `dynamic_slice` (out-of-range `i` is clamped, not filled), then
    the collapsed axes squeezed. `None` when the gather is not of that form."""
    shape = tuple(lora.shape)
    rows = [ax for ax in range(len(shape)) if sizes[ax] != shape[ax]]
    n_out = len(shape) - len(dn.collapsed_slice_dims)
    if not (
        rows
        and all(ax in lora.stack_axes and sizes[ax] == 1 for ax in rows)
        and set(dn.start_index_map) == set(rows)
        and set(dn.collapsed_slice_dims) <= set(rows)
        and not dn.operand_batching_dims
        and tuple(start_indices.shape) == (len(rows),)
        and tuple(dn.offset_dims) == tuple(range(n_out))
    ):
        return None
    starts = [0] * len(shape)
    for j, ax in enumerate(dn.start_index_map):
        starts[ax] = start_indices[j]
    block = _dynamic_block(lora, starts, sizes)
    dims = tuple(dn.collapsed_slice_dims)
    if dims:
        block = quax.quaxify(lambda v: lax.squeeze(v, dims))(block)
    return block


def _entries_gather(lora: BatchedLoraArray, start_indices, dn, sizes, params):
    """Whole entries gathered along stack axes (`w[experts]` or `jnp.take(w,
    experts, axis=0)` on an expert stack `(E, D, F)` with `experts: (B, T, k)`):
    a new `BatchedLoraArray` whose stack axes are the gather's index batch axes
    (`(B, T, k)`) followed by the stack axes left whole. `None` when the gather is
    not of that form.

    Each entry's adapter is chosen here, once: the array's indices label the
    leading axes of the index batch shape (the array's `batch_axis` and row-major
    regrouping apply, as for an activation), are broadcast over it, and the factors
    are gathered per entry *and* per adapter, `a[experts, idx]` and `b[experts,
    idx]`, so nothing of size `(B, T, k, n_adapters, ...)` is built. The guarded
    scale (`gathered_scale`: 0 for -1 rows, NaN for out-of-range indices) is folded
    into the gathered `b`. The result has a single adapter of scale 1 and scalar
    index 0, so every entry's product (`einsum("BTD,BTKDF->BTKF")`, the stack
    axes as batch or free axes of `dot_general`) is its own low-rank product.

    The scale folded in is `scale`, also when the entries are later read the other
    way round (contracted over their out-axes): a `head_scale` that differs from
    `scale` belongs to embedding tables, which are not entry stacks.
    """
    shape = tuple(lora.shape)
    gathered = tuple(dn.start_index_map)
    kept = [ax for ax in range(len(shape)) if ax not in gathered]
    n_batch = start_indices.ndim - 1
    if not (
        gathered
        and n_batch >= 1
        and not lora.has_variants  # DoRA/IA3 vectors: not carried over yet
        and not dn.operand_batching_dims
        and all(ax in lora.stack_axes and sizes[ax] == 1 for ax in gathered)
        and set(dn.collapsed_slice_dims) == set(gathered)
        and len(set(gathered)) == len(gathered)
        and all(
            sizes[ax] == shape[ax] for ax in range(len(shape)) if ax not in gathered
        )
        and start_indices.shape[-1] == len(gathered)
    ):
        return None
    batch_shape = tuple(start_indices.shape[:-1])
    out_nd = n_batch + len(kept)
    position = dict(zip(kept, dn.offset_dims))  # operand axis -> output axis
    batch_pos = [d for d in range(out_nd) if d not in dn.offset_dims]
    # The adapter of every entry, from the array's indices.
    what = (
        f"the index array of a gather (index batch shape {batch_shape}) taking "
        f"whole entries along stack axes {gathered} of an adapted weight of shape "
        f"{shape}"
    )
    idx, lead, start = align_indices(
        require_indices(lora), batch_shape, what, lora.batch_axis
    )
    idx = lax.broadcast_in_dim(idx, batch_shape, tuple(range(start, start + len(lead))))
    safe = clamp_indices(idx, lora.n_adapters).astype(jnp.int32)
    scale = gathered_scale(lora.scale, idx)  # (*batch_shape,)
    # Start indices into the factors: the entry along each gathered stack axis,
    # then the adapter.
    ns = lora.layout.n_stack
    cols = [start_indices[..., j].astype(jnp.int32) for j in range(len(gathered))]
    starts = jnp.stack([*cols, safe], axis=-1)
    factor_axes = (*(lora.stack_axes.index(ax) for ax in gathered), ns)
    rem_stack = [j for j, ax in enumerate(lora.stack_axes) if ax not in gathered]

    def gather_factor(f):
        f_sizes = [1 if d in factor_axes else f.shape[d] for d in range(f.ndim)]
        n_off = f.ndim - len(factor_axes)
        dnums = lax.GatherDimensionNumbers(
            offset_dims=tuple(range(n_batch, n_batch + n_off)),
            collapsed_slice_dims=tuple(sorted(factor_axes)),
            start_index_map=factor_axes,
        )
        g = lax.gather(f, starts, dnums, f_sizes, mode=lax.GatherScatterMode.CLIP)
        # (*batch, *kept stack, ...) -> with a single adapter axis after the stack
        return lax.expand_dims(g, (n_batch + len(rem_stack),))

    a = gather_factor(lora.a)
    b = gather_factor(lora.b)
    # A base entry reads adapter 0: both factors zeroed (`scale_rows` on B,
    # `zero_base_rows` on A), so a non-finite adapter 0 never reaches it.
    b = scale_rows(b, lax.broadcast_in_dim(scale, b.shape, tuple(range(n_batch))))
    a = zero_base_rows(a, lax.broadcast_in_dim(scale, a.shape, tuple(range(n_batch))))
    layout = Layout(
        tuple(position[ax] for ax in lora.in_axes),
        tuple(position[ax] for ax in lora.out_axes),
        (*batch_pos, *(position[lora.stack_axes[j]] for j in rem_stack)),
    )
    w = bind(lax.gather_p, lora.frozen_w, start_indices, **params)
    return lora.replace(
        w=w,
        a=a,
        b=b,
        scale=jnp.ones((1,), lora.scale.dtype),
        head_scale=None,
        indices=jnp.zeros((), jnp.int32),
        generations=None,
        layout=layout,
        compact=False,
    )


def _dynamic_block(lora: BatchedLoraArray, starts, sizes) -> BatchedLoraArray:
    """`(W + AB)[block]` at dynamic offsets is `W[block] + A[in part] B[out part]`:
    still low rank. `A` is sliced on its in and stack axes, `B` on its out and stack
    axes, with the same (clamped) starts. The common case: one layer of a stack
    inside `fori_loop` (`lax.dynamic_index_in_dim(W, i)`, `W[i]` with a traced `i`),
    a dynamic slice of the stack axis followed by a squeeze."""
    starts = [jnp.asarray(st, jnp.int32) for st in starts]
    zero = jnp.zeros((), jnp.int32)

    def cut(a, b):  # also the variants' vectors, laid out as rank-1 factors
        a_starts, a_sizes = [zero] * a.ndim, list(a.shape)
        b_starts, b_sizes = [zero] * b.ndim, list(b.shape)
        for ax in range(lora.ndim):
            if sizes[ax] == lora.shape[ax]:
                continue
            pos_a, pos_b = lora.layout.factor_axes(ax)
            if pos_a is not None:
                a_starts[pos_a], a_sizes[pos_a] = starts[ax], sizes[ax]
            if pos_b is not None:
                b_starts[pos_b], b_sizes[pos_b] = starts[ax], sizes[ax]
        return (
            lax.dynamic_slice(a, a_starts, a_sizes),
            lax.dynamic_slice(b, b_starts, b_sizes),
        )

    w = bind(lax.dynamic_slice_p, lora.frozen_w, *starts, slice_sizes=tuple(sizes))
    return lora.map_factors(cut, w=w)


def _no_variants(lora: BatchedLoraArray, what: str) -> None:
    if lora.has_variants:
        raise UnsupportedOperationError(
            f"{what} on a BatchedLoraArray of shape {tuple(lora.shape)} whose "
            "adapters include DoRA or IA3 vectors: those are served in products "
            "`x @ W` only, not in lookups of rows or columns of the weight (PEFT's "
            "DoRA on an embedding is not supported yet). Serve plain LoRA adapters "
            "on this leaf."
        )


def squeezed_lookup(lora: BatchedLoraArray, dims: tuple[int, ...]):
    """A squeeze that removes every (size-1) in-axis or every out-axis: what is left
    is no longer a weight but a looked-up row or column. A static lookup `E[3]` (an
    Equinox Embedding called with a Python int) is a slice, then this squeeze.

    The result is a plain array the size of the row, `w[3] + s_i * a[i, 3] @ b[i]`,
    which needs one adapter for the whole call: scalar indices (inside `jax.vmap`).
    It is computed as a lookup is (the rank-`r` product of the squeezed factors,
    the row's own size), never by materialising `W + AB`, so it needs no
    `allow_materialise`; per-example indices are refused with or without it, since
    one row cannot hold each example's adapter.
    """
    _no_variants(lora, f"Squeezing axes {tuple(dims)} (a static lookup)")
    indices = require_indices(lora)
    if indices.ndim:
        raise UnsupportedOperationError(
            scalar_needed_message(
                f"Squeezing axes {tuple(dims)} of a BatchedLoraArray of shape "
                f"{lora.shape} (in_axes={lora.in_axes}, out_axes={lora.out_axes}) "
                "leaves no input or no output axis: the result is one row or "
                "column of the table (a static lookup such as `E[3]`; look rows up "
                "with an array of token ids instead, `E[tokens]`)",
                indices.shape,
            )
        )
    safe = clamp_indices(indices, lora.n_adapters)
    s = gathered_scale(lora.scale, indices)
    ns = lora.layout.n_stack
    a, b = lora.layout.squeeze_factors(lora.a, lora.b, dims)
    delta = lora.layout.squeezed(dims).dense_delta(take(a, safe, ns), take(b, safe, ns))
    w = bind(lax.squeeze_p, lora.frozen_w, dimensions=dims)
    w = quax.quaxify(jnp.asarray)(w) if isinstance(w, quax.Value) else w
    s = s.reshape(s.shape + (1,) * (delta.ndim - s.ndim))
    return (w + scale_rows(delta, s)).astype(w.dtype)
