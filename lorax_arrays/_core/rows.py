"""`RowIds`: an activation that knows which request each of its rows belongs to.

A grouped-matmul MoE layer sorts its tokens by expert before `lax.ragged_dot`, so
the rows reaching the expert weights are no longer in batch order and no shape
convention can say which request (and so which adapter) each one is. `RowIds`
carries that answer with the values: `array` is the activation and `pos` says,
for every element, which position of the *row space* (the shape of the adapter
indices, `space`) it belongs to. The rules of `_rules/rows.py` apply to `pos`
what the model applies to `array` (gathers, sorts, reshapes, scatters, ...), so
at the grouped matmul each row's adapter is `indices.ravel()[pos]`, read from
the adapted weight's own indices.

`pos` has `array`'s rank; each of its axes is either `array`'s length (the
positions vary along it: a row axis) or 1 (they do not: a feature axis). A
position says which request an element is *for*: an elementwise operation on
elements for `b` and for no one is for `b`. It is `MIXED` where an element is for
no one request (a reduction across the batch, a padding row): such a row has no
one adapter and is served NaN if it meets one. A
tag that cannot be followed through an operation is dropped (the result is a
plain array), never guessed: an adapted grouped matmul on untagged rows refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jaxtyping import Array, Int

from .indices import regroup

# The position of an element that mixes several requests' rows.
MIXED = -1
POS_DTYPE = jnp.int32


class RowIds(quax.ArrayValue):
    """An activation with the row-space position of each of its elements.

    **Arguments:**

    - `array`: the activation.
    - `pos`: `int32`, `array`'s rank, each axis `array`'s length or 1: the
      position (row-major, in `space`) of the request each element belongs to, or
      `MIXED`.
    - `space`: the shape of the adapter indices the positions index.
    """

    array: Any
    pos: Int[Array, ...]
    space: tuple[int, ...] = eqx.field(static=True)

    def __check_init__(self):
        shape, pos = tuple(self.array.shape), tuple(self.pos.shape)
        if len(pos) != len(shape) or any(p not in (1, s) for p, s in zip(pos, shape)):
            raise ValueError(  # an internal invariant: a rule bug, not user input
                f"RowIds: positions of shape {pos} for an array of shape {shape}."
            )

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self) -> Any:
        """The activation; its rows' positions are dropped."""
        return self.array


def live(x: Any) -> bool:
    """Whether `x` is a `RowIds` whose positions are positions: under
    differentiation JAX may hand a rule one whose `pos` is a cotangent (`float0`),
    which stands for no rows."""
    return isinstance(x, RowIds) and jnp.issubdtype(x.pos.dtype, jnp.integer)


def tag(array: Any, pos: Any, space: tuple[int, ...]) -> Any:
    """`array` with positions `pos` (None: `array` untagged)."""
    if pos is None:
        return array
    return RowIds(array, jnp.asarray(pos, POS_DTYPE), tuple(space))


def untag(x: Any) -> Any:
    """The plain array of `x` (a `RowIds` or anything else)."""
    return x.array if isinstance(x, RowIds) else x


def source_positions(shape: Sequence[int], space: tuple[int, ...]) -> np.ndarray | None:
    """The positions of an argument of `shape` whose leading axes are the row space
    `space`, or a row-major regrouping of it (`(B, T)` indices against a
    `(B*T, D)` argument, `_indices.regroup`); None otherwise. As for the dense
    rules, a `(B*T, D)` argument is not matched to per-sequence `(B,)` indices:
    that would guess how it was flattened."""
    shape = tuple(int(s) for s in shape)
    if not space or not shape:
        return None
    j = regroup(space, shape)
    if j is None:
        return None
    pos = np.arange(int(np.prod(space)), dtype=np.int32).reshape(shape[:j])
    return pos.reshape(shape[:j] + (1,) * (len(shape) - j))


_TOP, _BOTTOM = np.iinfo(np.int32).max, np.iinfo(np.int32).min


def agree(lo: Any, hi: Any) -> Any:
    """From the least and greatest position of a set of elements, computed with
    `MIXED` ignored (`low`/`high`): their common position, or `MIXED` when they
    differ or there were none."""
    return jnp.where(lo == hi, lo, MIXED)


def low(pos: Any) -> Any:
    """`pos` with `MIXED` made the largest value (ignored by a minimum)."""
    return jnp.where(pos == MIXED, _TOP, pos)


def high(pos: Any) -> Any:
    """`pos` with `MIXED` made the smallest value (ignored by a maximum)."""
    return jnp.where(pos == MIXED, _BOTTOM, pos)


def combine(tags: Sequence[Any]) -> Any:
    """The positions of an element made from elements at `tags` (broadcasting
    against each other): the request they are all for, ignoring those for none
    (`MIXED`); `MIXED` where two differ."""
    tags = [t for t in tags if t is not None]
    if not tags:
        return None
    out = tags[0]
    for t in tags[1:]:
        if t is out:
            continue
        out = jnp.where(
            out == MIXED, t, jnp.where((t == MIXED) | (t == out), out, MIXED)
        )
    return out


def reduce_positions(pos: Any, axes: Sequence[int]) -> Any:
    """The positions after reducing `axes` away: the one request the reduced
    elements are for (`MIXED` ones ignored), `MIXED` where they differ."""
    axes = tuple(sorted(int(a) for a in axes))
    vary = tuple(a for a in axes if pos.shape[a] > 1)
    if vary:
        lo = jnp.min(low(pos), axis=vary, keepdims=True)
        hi = jnp.max(high(pos), axis=vary, keepdims=True)
        pos = agree(lo, hi)
    return jnp.squeeze(pos, axis=axes) if axes else pos


def row_positions(x: RowIds, axis: int = 0) -> Any:
    """The position of each row along `axis` of `x` (shape `(x.shape[axis],)`),
    every other axis reduced away (`MIXED` where a row mixes requests)."""
    others = [a for a in range(x.pos.ndim) if a != axis]
    r = reduce_positions(x.pos, others).reshape(-1)
    return jnp.broadcast_to(r, (x.array.shape[axis],))
