"""Lean `lax` helpers for the rewrites' hot path.

Every op a rule emits is traced once per matmul and compiled by XLA, so these skip
the layers `jax.numpy` adds (bounds handling, type promotion, identity transposes
and reshapes): fewer equations, quicker traces and compiles.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax import lax
from jaxtyping import Array


def take(x: Array, safe: Array, axis: int) -> Array:
    """`jnp.take(x, safe, axis)` for indices already in range: a single `gather`
    with no bounds handling, which is quicker to trace and to compile."""
    dnums = lax.GatherDimensionNumbers(
        offset_dims=tuple(
            d if d < axis else d + safe.ndim - 1 for d in range(x.ndim) if d != axis
        ),
        collapsed_slice_dims=(axis,),
        start_index_map=(axis,),
    )
    sizes = tuple(1 if d == axis else x.shape[d] for d in range(x.ndim))
    return lax.gather(
        x,
        lax.expand_dims(safe, (safe.ndim,)),
        dnums,
        sizes,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def transpose(x: Array, perm: Sequence[int]) -> Array:
    """`lax.transpose`, or `x` itself when `perm` is the identity."""
    perm = tuple(perm)
    return x if perm == tuple(range(x.ndim)) else lax.transpose(x, perm)


def reshape(x: Array, shape: Sequence[int]) -> Array:
    """`lax.reshape`, or `x` itself when the shape is unchanged."""
    shape = tuple(shape)
    return x if tuple(x.shape) == shape else lax.reshape(x, shape)


def convert(x: Array, dtype) -> Array:
    """`lax.convert_element_type`, or `x` itself when the dtype is unchanged."""
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)
