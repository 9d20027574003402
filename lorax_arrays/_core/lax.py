"""Lean `lax` helpers for the rewrites' hot path.

Every op a rule emits is traced once per matmul and compiled by XLA, so these skip
the layers `jax.numpy` adds (bounds handling, type promotion, identity transposes
and reshapes): fewer equations, quicker traces and compiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
from jax.sharding import PartitionSpec
from jaxtyping import Array

try:  # not exported by `jax.lax` (JAX 0.10)
    from jax._src.lax.lax import ragged_dot_general_p
except ImportError:  # pragma: no cover
    ragged_dot_general_p = None


def explicit_spec(x: Any) -> tuple | None:
    """The partition spec of `x` under an explicit-sharding mesh (one entry per
    axis), or None when its sharding is not explicit (the usual jit + GSPMD mode,
    where the compiler places the ops)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or not any(p is not None for p in spec):
        return None
    return tuple(spec) + (None,) * (x.ndim - len(spec))


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

    def gather(x, safe):
        return lax.gather(
            x,
            lax.expand_dims(safe, (safe.ndim,)),
            dnums,
            sizes,
            mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
        )

    x_spec, i_spec = explicit_spec(x), explicit_spec(safe)
    if x_spec is None and i_spec is None:
        return gather(x, safe)
    # An explicit-sharding mesh: JAX cannot tell where a gather's rows go, so say
    # it (as `.at[].get(out_sharding=)` does): the rows follow the indices, the
    # other axes the table.
    x_spec = x_spec or (None,) * x.ndim
    i_spec = i_spec or (None,) * safe.ndim
    spec = PartitionSpec(*x_spec[:axis], *i_spec, *x_spec[axis + 1 :])
    return jax.sharding.auto_axes(gather, out_sharding=spec)(x, safe)


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


def update_index(full: Array, part: Array, index: Any, axis: int) -> Array:
    """`lax.dynamic_update_index_in_dim(full, part, index, axis)` with `part`
    cast to `full`'s dtype and, on an explicit-sharding mesh, placed as `full`'s
    other axes are (JAX requires the update's sharding to be the operand's)."""
    part = part.astype(full.dtype)
    spec = explicit_spec(full)
    if spec is not None:
        part = jax.sharding.reshard(
            part, PartitionSpec(*spec[:axis], *spec[axis + 1 :])
        )
    return lax.dynamic_update_index_in_dim(full, part, index, axis)


def _varying(x: Array) -> frozenset:
    """The mesh axes `x` varies over in a `shard_map` body (`aval.mat.varying`;
    `aval.vma` before JAX 0.10)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    found = getattr(mat, "varying", None) if mat is not None else None
    return frozenset(found if found is not None else getattr(aval, "vma", ()))


def match_varying(*xs: Array) -> list[Array]:
    """`xs`, each marked as varying over every mesh axis any of them varies over
    (in a `shard_map` body with `check_vma`, where a primitive's operands must
    agree; elsewhere, `xs` as they are). For the operands a rule builds itself."""
    vmas = [_varying(x) for x in xs]
    union = frozenset().union(*vmas)
    if not union:
        return list(xs)
    return [
        x if vma == union else lax.pcast(x, tuple(sorted(union - vma)), to="varying")
        for x, vma in zip(xs, vmas)
    ]
