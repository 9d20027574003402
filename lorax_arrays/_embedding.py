"""Embedding lookups on an adapted table: `E[tokens]` keeps the low-rank form.

For a table `w: (vocab, d)` adapted with `in_axes=(0,)` (the vocabulary axis is what
a one-hot token contracts with) and `out_axes=(1,)`, the lookup of token `t` for an
example using adapter `i` is `w[t] + s_i * a[i, t] @ b[i]`: a gather of one row of A,
never of the dense `W + AB`. This is the delta PEFT uses for embeddings.
"""

from __future__ import annotations

import jax.numpy as jnp
import quax
from jax import lax

from ._array import (
    BatchedLoraArray,
    UnsetIndicesError,
    gathered_scale,
    swap_in_out,
)
from ._errors import IndicesShapeError, UnsupportedOperationError


def _on_w(primitive, w, args, params):
    if isinstance(w, quax.Value):
        return quax.quaxify(lambda v, *a: primitive.bind(v, *a, **params))(w, *args)
    return primitive.bind(w, *args, **params)


def _lookup_view(lora: BatchedLoraArray, axis: int, what: str):
    """`(a, b)` with the looked-up axis as A's single input axis."""
    if lora.stack_axes or lora.ndim != 2:
        raise UnsupportedOperationError(
            f"{what} on a BatchedLoraArray of shape {lora.shape} (stack_axes="
            f"{lora.stack_axes}): row lookups are supported on 2-D tables (slice a "
            "layer stack with lax.scan first)."
        )
    view = lora if lora.in_axes == (axis,) else swap_in_out(lora)
    return view.a, view.b


def _rows_delta(lora, a, b, tokens, what):
    """`s[i] * a[i, tok] @ b[i]` for tokens whose leading axes are the indices'."""
    if lora.indices is None:
        raise UnsetIndicesError.for_array(lora)
    idx = lora.indices
    k = idx.ndim
    if tuple(tokens.shape[:k]) != tuple(idx.shape):
        raise IndicesShapeError(
            f"{what}: token ids of shape {tuple(tokens.shape)} index an adapted "
            f"embedding table, but the adapter indices have shape {tuple(idx.shape)}"
            "; the leading axes of the token ids must equal the indices' shape "
            "(give per-token indices if the model flattens batch and sequence)."
        )
    n, vocab = a.shape[0], a.shape[1]
    safe = jnp.clip(idx, 0, n - 1)
    safe_b = safe.reshape(safe.shape + (1,) * (tokens.ndim - k))
    rows = a[safe_b, jnp.clip(tokens, 0, vocab - 1)]  # (*tokens.shape, r)
    b_g = jnp.take(b, safe, axis=0)  # (*I, r, d)
    rest = tokens.ndim - k
    u = lax.dot_general(
        rows,
        b_g.astype(rows.dtype),
        (((rows.ndim - 1,), (k,)), (tuple(range(k)), tuple(range(k)))),
    )  # (*I, *rest, d)
    s = gathered_scale(lora.scale, idx).astype(u.dtype)
    return u * s.reshape(s.shape + (1,) * (rest + 1))


@quax.register(lax.gather_p)
def _(operand: BatchedLoraArray, start_indices, **params):
    what = "Embedding lookup (gather)"
    dn = params["dimension_numbers"]
    sizes = tuple(params["slice_sizes"])
    shape = tuple(operand.shape)
    rows = [ax for ax in range(len(shape)) if sizes[ax] != shape[ax]]
    ok = len(shape) == 2 and len(rows) == 1 and not dn.operand_batching_dims
    if ok:
        (axis,) = rows
        ok = (
            sizes[axis] == 1
            and axis in dn.start_index_map
            and set(dn.collapsed_slice_dims) <= {axis}
        )
    if not ok:
        raise UnsupportedOperationError(
            f"`gather` on a BatchedLoraArray of shape {shape} with {dn} and "
            f"slice_sizes={sizes}: only whole-row lookups (`E[tokens]`, "
            "`jnp.take(E, tokens, axis=0)`) keep the low-rank form. Pass "
            "`allow_materialise=True` to build dense weights for this op."
        )
    a, b = _lookup_view(operand, axis, what)
    base = _on_w(lax.gather_p, operand.w, (start_indices,), params)
    tokens = start_indices[..., list(dn.start_index_map).index(axis)]
    delta = _rows_delta(operand, a, b, tokens, what)  # (*batch, d)
    if axis not in dn.collapsed_slice_dims:  # the size-1 row axis is kept
        delta = jnp.expand_dims(delta, -2 if axis == 0 else -1)
    n_offset = len(dn.offset_dims)
    delta = jnp.moveaxis(delta, tuple(range(-n_offset, 0)), tuple(dn.offset_dims))
    return base + delta.astype(base.dtype)


@quax.register(lax.dynamic_slice_p)
def _(operand: BatchedLoraArray, *starts, slice_sizes):
    what = "Embedding lookup (dynamic_slice)"
    shape = tuple(operand.shape)
    sizes = tuple(slice_sizes)
    rows = [ax for ax in range(len(shape)) if sizes[ax] != shape[ax]]
    if len(shape) != 2 or len(rows) != 1 or sizes[rows[0]] != 1 or len(starts) != 2:
        raise UnsupportedOperationError(
            f"`dynamic_slice` of a BatchedLoraArray of shape {shape} to {sizes}: only "
            "single-row lookups (an Equinox Embedding) keep the low-rank form."
        )
    (axis,) = rows
    a, b = _lookup_view(operand, axis, what)
    base = _on_w(lax.dynamic_slice_p, operand.w, starts, dict(slice_sizes=sizes))
    token = jnp.asarray(starts[axis])
    if operand.indices is not None and operand.indices.ndim:
        token = jnp.broadcast_to(token, operand.indices.shape)
    delta = _rows_delta(operand, a, b, token, what)  # (*I, d)
    if delta.ndim != 1:
        raise IndicesShapeError(
            f"{what}: one token is looked up, but the adapter indices have shape "
            f"{tuple(operand.indices.shape)}. Inside `jax.vmap`, set one example's "
            "scalar index with `lx.with_indices`."
        )
    delta = jnp.expand_dims(delta, axis)
    return base + delta.astype(base.dtype)
