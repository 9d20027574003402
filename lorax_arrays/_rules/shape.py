"""Dispatch rules that change how the weight is laid out without building W + AB.

Registers: `transpose`, `convert_element_type`, `copy`, `reshape`, `slice`,
`split`, `squeeze`, and `broadcast_in_dim` when it is the identity (what
`jnp` indexing emits after a gather, `w[experts]`, with no new axes to add).

`transpose` permutes the layout, `convert_element_type` casts the base weight (the
low-rank term is computed in the activation's dtype), `reshape` merges or splits axes
inside one group, `copy` is the identity, and `slice`, `split` and `squeeze` cut the
factor that carries each cut axis. Each asks the array's `Layout` what becomes of
its axis groups and factors.
"""

from __future__ import annotations

import jax.numpy as jnp
import quax
from jax import lax

from .._core.array import BatchedLoraArray, bind
from .._core.errors import UnsupportedOperationError
from .._core.layout import LayoutError
from .lookup import squeezed_lookup


@quax.register(lax.transpose_p)
def _(operand: BatchedLoraArray, *, permutation):
    return operand.replace(
        w=bind(lax.transpose_p, operand.frozen_w, permutation=permutation),
        layout=operand.layout.transposed(permutation),
    )


@quax.register(lax.convert_element_type_p)
def _(operand: BatchedLoraArray, **params):
    new_dtype = params["new_dtype"]
    if not jnp.issubdtype(new_dtype, jnp.inexact):
        raise UnsupportedOperationError(
            f"Casting a BatchedLoraArray to the non-floating dtype {new_dtype} has "
            "no low-rank meaning. Cast the activations instead."
        )
    return operand.replace(
        w=bind(lax.convert_element_type_p, operand.frozen_w, **params)
    )


@quax.register(lax.copy_p)
def _(operand: BatchedLoraArray, **params):
    return operand


@quax.register(lax.broadcast_in_dim_p)
def _(operand: BatchedLoraArray, **params):
    shape, dims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
    if shape == tuple(operand.shape) and dims == tuple(range(len(shape))):
        return operand  # the identity
    return BatchedLoraArray.default(lax.broadcast_in_dim_p, (operand,), params)


@quax.register(lax.reshape_p)
def _(operand: BatchedLoraArray, **params):
    old, new = tuple(operand.shape), tuple(params["new_sizes"])
    try:
        if params.get("dimensions") is not None:
            raise LayoutError("it is not a plain row-major reshape")
        layout, _, _ = operand.layout.reshaped(operand.a, operand.b, old, new)
    except LayoutError as why:
        raise UnsupportedOperationError(
            f"Cannot reshape a BatchedLoraArray of shape {old} (in_axes="
            f"{operand.in_axes}, out_axes={operand.out_axes}, stack_axes="
            f"{operand.stack_axes}) to {new}: {why}. Reshapes may only merge or "
            "split axes within the input group or within the output group. Pass "
            "`allow_materialise=True` to build the dense weight instead."
        ) from None
    w = bind(lax.reshape_p, operand.frozen_w, **params)

    def reshape(a, b):
        return operand.layout.reshaped(a, b, old, new)[1:]

    return operand.map_factors(reshape, w=w, layout=layout)


@quax.register(lax.slice_p)
def _(operand: BatchedLoraArray, **params):
    """A static slice of any axes: `(W + AB)[:, cols] = W[:, cols] + A · B[:, cols]`
    (fused QKV kernels, `W[i]` on a layer stack)."""
    shape = operand.shape
    strides = params.get("strides") or (1,) * len(shape)

    def cut(a, b):
        for axis, (lo, hi, st) in enumerate(
            zip(params["start_indices"], params["limit_indices"], strides)
        ):
            if (lo, hi, st) == (0, shape[axis], 1):
                continue
            ax_a, ax_b = operand.layout.factor_axes(axis)
            if ax_a is not None:
                a = lax.slice_in_dim(a, lo, hi, st, axis=ax_a)
            if ax_b is not None:
                b = lax.slice_in_dim(b, lo, hi, st, axis=ax_b)
        return a, b

    return operand.map_factors(cut, w=bind(lax.slice_p, operand.frozen_w, **params))


@quax.register(lax.split_p)
def _(operand: BatchedLoraArray, *, sizes, axis):
    """`jnp.split(W, n, axis)`: each piece keeps the low-rank form."""
    pieces = bind(lax.split_p, operand.frozen_w, sizes=sizes, axis=axis)
    ax_a, ax_b = operand.layout.factor_axes(axis)
    parts: dict[int, tuple] = {}  # each factor split once, for all the pieces

    def split(x, ax):
        if id(x) not in parts:  # (holding x, so its id is not reused)
            parts[id(x)] = (x, lax.split(x, sizes, ax))
        return parts[id(x)][1]

    def piece(j):
        def cut(a, b):
            a = a if ax_a is None else split(a, ax_a)[j]
            b = b if ax_b is None else split(b, ax_b)[j]
            return a, b

        return cut

    return [operand.map_factors(piece(j), w=w) for j, w in enumerate(pieces)]


@quax.register(lax.squeeze_p)
def _(operand: BatchedLoraArray, *, dimensions):
    """Dropping size-1 axes (`W[i]` on a layer stack is a slice then a squeeze)."""
    dims = sorted(d % operand.ndim for d in dimensions)
    layout = operand.layout.squeezed(dims)
    if not layout.in_axes or not layout.out_axes:  # `E[3]`: a row, not a weight
        return squeezed_lookup(operand, tuple(dims))
    w = bind(lax.squeeze_p, operand.frozen_w, dimensions=dimensions)

    def squeeze(a, b):
        return operand.layout.squeeze_factors(a, b, dims)

    return operand.map_factors(squeeze, w=w, layout=layout)
