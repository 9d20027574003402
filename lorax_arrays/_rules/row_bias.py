"""`RowBias`: a frozen bias vector plus each adapter's update to it, one chosen
per example or token, and its dispatch rules.

A PEFT adapter with `modules_to_save` (a classification head trained in full)
ships its own bias for each saved Linear. The weight is served as an exact
full-rank LoRA (`W_i - W`); the bias, a vector added to the activation, cannot
be, so it is served by this array: `b + deltas[i]` for a row of adapter `i`, `b`
for a base row (`-1`).

Registers, for `RowBias`: `reshape` and `broadcast_in_dim` that only add or drop
size-1 axes (Flax's `jnp.reshape(bias, (1, ..., 1, -1))`, `jnp`'s rank
promotion), `convert_element_type`, `copy`, and `add` with an activation (either
side), which builds each row's bias there: `x + (b + deltas[indices])`, the
indices lining up with the activation's leading axes as a LoRA's do
(`batch_axis`). A `broadcast_in_dim` onto a shape with more than size-1 leading
axes gives the per-row bias as a plain array of that shape. Anything else is an
`UnsupportedOperationError` naming the primitive (with scalar indices, inside
`jax.vmap`, the array is one vector and is materialised instead).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from .._core import lax as _lax
from .._core.array import bind_materialised
from .._core.errors import UnsupportedOperationError
from .._core.indices import (
    UnsetIndicesError,
    align_indices,
    check_indices,
    coerce_indices,
    guarded_take,
)


class RowBias(quax.ArrayValue):
    """A bias vector `b` with many adapters' updates to it, one chosen per example
    or token: for a row of adapter `i = indices[e]` it stands for
    `b + deltas[i]`, for `i = -1` for `b` alone.

    [`lorax_arrays.loraify`][] puts one at each bias leaf that an adapter with
    `bias_deltas` changes (PEFT's `modules_to_save`: a classification head's own
    bias); under [`lorax_arrays.quaxify`][] adding it to an activation adds each
    row's bias.

    | field | shape |
    |---|---|
    | `b` | `(out,)`: the model's bias |
    | `deltas` | `(n_adapters, out)`: each adapter's update (0 where it has none) |
    | `indices` | `()` in `vmap`, `(batch,)` or `(batch, seq)`; `-1` = base |

    and, static, `view_shape` (the array's own: `(out,)`, or with size-1 axes in front
    after a reshape) and `batch_axis` (as in [`lorax_arrays.loraify`][]).
    """

    b: Float[Array, " out"]
    deltas: Float[Array, "n_adapters out"]
    indices: Int[Array, ...] | None
    view_shape: tuple[int, ...] = eqx.field(static=True)
    batch_axis: int = eqx.field(static=True, default=0)

    def __init__(
        self,
        b: Float[ArrayLike, " out"],
        deltas: Float[ArrayLike, "n_adapters out"],
        indices: Int[ArrayLike, ...] | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        batch_axis: int = 0,
    ):
        """**Arguments:**

        - `b`: the model's bias, `(out,)`.
        - `deltas`: `(n_adapters, out)`, each adapter's update to it.
        - `indices`: which adapter each example (or token) uses, `-1` for the
            base model; `None` to set later with [`lorax_arrays.with_indices`][].
        - `shape`: the array's shape, `(out,)` by default (size-1 axes in front
            are allowed).
        - `batch_axis`: which of an activation's free axes the indices label (see
            [`lorax_arrays.loraify`][]).
        """
        self.b = jnp.asarray(b)
        self.deltas = jnp.asarray(deltas)
        self.indices = coerce_indices(indices)
        self.view_shape = tuple(self.b.shape) if shape is None else tuple(shape)
        self.batch_axis = batch_axis

    def __check_init__(self):
        what = f"RowBias(b.shape={tuple(self.b.shape)})"
        if self.b.ndim != 1 or self.deltas.ndim != 2:
            raise ValueError(
                f"{what}: expected b (out,) and deltas (n_adapters, out), got "
                f"deltas {tuple(self.deltas.shape)}."
            )
        out = self.b.shape[0]
        if self.deltas.shape[1] != out:
            raise ValueError(
                f"{what}: deltas have shape {tuple(self.deltas.shape)}; expected "
                f"(n_adapters, {out})."
            )
        if math.prod(self.view_shape) != out or self.view_shape[-1:] != (out,):
            raise ValueError(
                f"{what}: shape {self.view_shape} is not (..., 1, {out}) (size-1 axes "
                "in front of the bias)."
            )
        for name in ("b", "deltas"):
            if not jnp.issubdtype(getattr(self, name).dtype, jnp.inexact):
                raise TypeError(f"{what}: `{name}` must be floating point.")
        if self.indices is not None:
            check_indices(self.indices, self.n_adapters)

    @property
    def n_adapters(self) -> int:
        """How many adapters' updates are stacked."""
        return self.deltas.shape[0]

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.view_shape, self.b.dtype)

    def materialise(self) -> Array:
        """The one bias `b + deltas[i]` of the array's shape: only with scalar
        indices (one adapter for the whole array, inside `jax.vmap`)."""
        idx = _require(self)
        if idx.ndim:
            raise UnsupportedOperationError(_per_row_message(self, None))
        return _lax.reshape(_row_values(self, idx), self.view_shape)

    @staticmethod
    def default(primitive, values, params):
        return bind_materialised(
            primitive,
            values,
            params,
            RowBias,
            lambda v: _per_row_message(v, primitive),
        )

    def replace(self, **changes: Any) -> RowBias:
        """A copy with some fields changed, unchecked."""
        obj = object.__new__(RowBias)
        fields = dict(object.__getattribute__(self, "__dict__"))
        fields.update(changes)
        object.__getattribute__(obj, "__dict__").update(fields)
        return obj


def _require(rb: RowBias) -> Array:
    if rb.indices is None:
        raise UnsetIndicesError(
            f"This RowBias (a bias of shape {rb.shape} with adapters' updates) has "
            "no indices: say which adapter each example uses with "
            "`tree = lx.with_indices(tree, indices)` (or `lx.loraify(tree, "
            "adapters, indices)`); use -1 for the base model."
        )
    return rb.indices


def _per_row_message(rb: RowBias, primitive) -> str:
    op = "This operation" if primitive is None else f"`{primitive.name}`"
    return (
        f"{op} on a RowBias (a bias of shape {rb.shape} with {rb.n_adapters} "
        "adapters' own biases, PEFT's modules_to_save) has no rule: lorax_arrays "
        "serves such a bias when it is added to an activation (`x + b`, after "
        "reshapes that add size-1 axes, casts or a broadcast), where each row "
        f"gets its adapter's bias. With per-row indices of shape "
        f"{tuple(rb.indices.shape)} one array of the bias's shape cannot hold "
        "each row's bias. Register a rule for it with `lx.register`, or run the "
        "model per example under `jax.vmap` with scalar indices."
    )


def _row_values(rb: RowBias, idx: Array) -> Array:
    """`b + deltas[idx]`: `(*idx.shape, out)`, `b` for `-1`, NaN for an index
    outside `[-1, n)` (as a LoRA's rows)."""
    rows = guarded_take(rb.deltas, 0.0, idx)
    dt = jnp.promote_types(rb.b.dtype, rb.deltas.dtype)
    return (rb.b.astype(dt) + rows.astype(dt)).astype(rb.b.dtype)


def _per_row(rb: RowBias, shape: tuple[int, ...], what: str) -> Array:
    """Each row's bias, broadcast to `shape` (an activation's: `(..., out)`)."""
    idx = _require(rb)
    free = shape[:-1]
    idx, lead, start = align_indices(idx, free, what, rb.batch_axis)
    rows = _row_values(rb, idx)  # (*lead, out)
    before, after = start, len(free) - start - len(lead)
    rows = _lax.reshape(rows, (1,) * before + tuple(lead) + (1,) * after + (shape[-1],))
    return jnp.broadcast_to(rows, shape)


def _only_ones_in_front(shape: tuple[int, ...], out: int) -> bool:
    return bool(shape) and shape[-1] == out and all(s == 1 for s in shape[:-1])


@quax.register(lax.reshape_p)
def _(operand: RowBias, *, new_sizes, dimensions, **params):
    new = tuple(new_sizes)
    if dimensions is None and _only_ones_in_front(new, operand.b.shape[0]):
        return operand.replace(view_shape=new)
    return RowBias.default(
        lax.reshape_p,
        (operand,),
        {"new_sizes": new_sizes, "dimensions": dimensions, **params},
    )


@quax.register(lax.broadcast_in_dim_p)
def _(operand: RowBias, *, shape, broadcast_dimensions, **params):
    shape, dims = tuple(shape), tuple(broadcast_dimensions)
    out = operand.b.shape[0]
    ours = operand.view_shape
    # The bias axis must stay the last axis, at its size.
    keeps_last = bool(dims) and dims[-1] == len(shape) - 1 and shape[-1] == out
    if keeps_last and _only_ones_in_front(shape, out):
        return operand.replace(view_shape=shape)
    if keeps_last and all(ours[k] == 1 for k in range(len(ours) - 1)):
        return _per_row(operand, shape, f"an activation of shape {shape}")
    return RowBias.default(
        lax.broadcast_in_dim_p,
        (operand,),
        {"shape": shape, "broadcast_dimensions": broadcast_dimensions, **params},
    )


@quax.register(lax.convert_element_type_p)
def _(operand: RowBias, *, new_dtype, **params):
    if not jnp.issubdtype(new_dtype, jnp.inexact):
        return RowBias.default(
            lax.convert_element_type_p, (operand,), {"new_dtype": new_dtype, **params}
        )
    return operand.replace(
        b=_lax.convert(operand.b, new_dtype),
        deltas=_lax.convert(operand.deltas, new_dtype),
    )


@quax.register(lax.copy_p)
def _(operand: RowBias, **params):
    return operand


def _add(x, rb: RowBias, x_first: bool):
    x_shape = tuple(np.shape(x))
    ours = rb.view_shape
    out = rb.b.shape[0]
    ok = (
        len(x_shape) == len(ours)
        and x_shape
        and x_shape[-1] == out
        and all(s == 1 for s in ours[:-1])
    )
    if not ok:
        return RowBias.default(lax.add_p, (x, rb) if x_first else (rb, x), {})
    bias = _per_row(rb, x_shape, f"the activation of shape {x_shape}")
    bias = bias.astype(jnp.result_type(x))
    return lax.add(x, bias) if x_first else lax.add(bias, x)


@quax.register(lax.add_p)
def _(x: ArrayLike, y: RowBias):
    return _add(x, y, True)


@quax.register(lax.add_p)
def _(x: RowBias, y: ArrayLike):
    return _add(y, x, False)
