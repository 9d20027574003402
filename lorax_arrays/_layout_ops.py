"""Rules that change how the weight is laid out without building W + AB.

`transpose` permutes the layout, `convert_element_type` casts the base weight (the
low-rank term is computed in the activation's dtype), `reshape` merges or splits axes
inside one group, and `copy` is the identity.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import quax
from jax import lax

from ._array import BatchedLoraArray, bind
from ._embedding import squeezed_lookup
from ._errors import UnsupportedOperationError


@quax.register(lax.transpose_p)
def _(operand: BatchedLoraArray, *, permutation):
    perm = tuple(permutation)
    new_axis = {old: new for new, old in enumerate(perm)}
    return operand.replace(
        w=bind(lax.transpose_p, operand.frozen_w, permutation=permutation),
        in_axes=tuple(new_axis[ax] for ax in operand.in_axes),
        out_axes=tuple(new_axis[ax] for ax in operand.out_axes),
        stack_axes=tuple(new_axis[ax] for ax in operand.stack_axes),
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


def reshape_groups(
    old: tuple[int, ...], new: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """Pairs runs of old axes with runs of new axes of equal total size.

    Size-1 axes that appear or vanish get a group of their own with an empty side.
    Returns None if the shapes do not describe a row-major reshape.
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(old) or j >= len(new):
            return None
        og, ng = [i], [j]
        po, pn = old[i], new[j]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn:
                if i >= len(old):
                    return None
                og.append(i)
                po *= old[i]
                i += 1
            else:
                if j >= len(new):
                    return None
                ng.append(j)
                pn *= new[j]
                j += 1
        groups.append((og, ng))
    return groups


def _sorted_factors(lora: BatchedLoraArray) -> BatchedLoraArray:
    """The same array with `in_axes`/`out_axes` listed in increasing order."""
    ns = len(lora.stack_axes)
    in_order = sorted(range(len(lora.in_axes)), key=lambda j: lora.in_axes[j])
    out_order = sorted(range(len(lora.out_axes)), key=lambda j: lora.out_axes[j])
    a_perm = [*range(ns + 1), *(ns + 1 + j for j in in_order), lora.a.ndim - 1]
    b_perm = [*range(ns + 2), *(ns + 2 + j for j in out_order)]
    return lora.replace(
        a=jnp.transpose(lora.a, a_perm),
        b=jnp.transpose(lora.b, b_perm),
        in_axes=tuple(sorted(lora.in_axes)),
        out_axes=tuple(sorted(lora.out_axes)),
    )


@quax.register(lax.reshape_p)
def _(operand: BatchedLoraArray, **params):
    old = tuple(operand.shape)
    new = tuple(params["new_sizes"])
    groups = reshape_groups(old, new) if params.get("dimensions") is None else None
    role = {}
    for name in ("in_axes", "out_axes", "stack_axes"):
        for ax in getattr(operand, name):
            role[ax] = name

    def fail(why: str):
        raise UnsupportedOperationError(
            f"Cannot reshape a BatchedLoraArray of shape {old} (in_axes="
            f"{operand.in_axes}, out_axes={operand.out_axes}, stack_axes="
            f"{operand.stack_axes}) to {new}: {why}. Reshapes may only merge or "
            "split axes within the input group or within the output group. Pass "
            "`allow_materialise=True` to build the dense weight instead."
        )

    if groups is None:
        fail("it is not a plain row-major reshape")
    lora = _sorted_factors(operand)
    new_role: dict[int, str] = {}
    stack_to_new: dict[int, int] = {}
    for og, ng in groups:
        roles = {role[ax] for ax in og}
        if len(roles) > 1:
            fail(f"axes {og} mix the groups {sorted(roles)}")
        if not og:
            fail(f"new size-1 axis {ng[0]} belongs to no group")
        (r,) = roles
        if r == "stack_axes":
            if len(og) != 1 or len(ng) != 1:
                fail("it merges, splits, adds or drops a layer-stack axis")
            stack_to_new[og[0]] = ng[0]
        for ax in ng:
            new_role[ax] = r
    in_axes = tuple(ax for ax in range(len(new)) if new_role[ax] == "in_axes")
    out_axes = tuple(ax for ax in range(len(new)) if new_role[ax] == "out_axes")
    # The factors' leading axes follow `stack_axes`' order, so keep that order.
    stack_axes = tuple(stack_to_new[ax] for ax in lora.stack_axes)
    if not in_axes or not out_axes:
        fail("it would leave no input or no output axis")
    ns = len(lora.stack_axes)
    in_shape = tuple(new[a] for a in in_axes)
    out_shape = tuple(new[a] for a in out_axes)
    assert math.prod(in_shape) == math.prod(old[a] for a in lora.in_axes)
    a = lora.a.reshape(*lora.a.shape[: ns + 1], *in_shape, lora.rank)
    b = lora.b.reshape(*lora.b.shape[: ns + 2], *out_shape)
    return lora.replace(
        w=bind(lax.reshape_p, lora.frozen_w, **params),
        a=a,
        b=b,
        in_axes=in_axes,
        out_axes=out_axes,
        stack_axes=stack_axes,
    )


def _factor_axes(lora: BatchedLoraArray, axis: int) -> tuple[int | None, int | None]:
    """Which axis of `a` and of `b` carries axis `axis` of `w` (None: neither)."""
    ns = len(lora.stack_axes)
    if axis in lora.stack_axes:
        j = lora.stack_axes.index(axis)
        return j, j
    if axis in lora.in_axes:
        return ns + 1 + lora.in_axes.index(axis), None
    return None, ns + 2 + lora.out_axes.index(axis)


@quax.register(lax.slice_p)
def _(operand: BatchedLoraArray, **params):
    """A static slice of any axes: `(W + AB)[:, cols] = W[:, cols] + A · B[:, cols]`
    (fused QKV kernels, `W[i]` on a layer stack)."""
    shape = operand.shape
    strides = params.get("strides") or (1,) * len(shape)
    a, b = operand.a, operand.b
    for axis, (lo, hi, st) in enumerate(
        zip(params["start_indices"], params["limit_indices"], strides)
    ):
        if (lo, hi, st) == (0, shape[axis], 1):
            continue
        ax_a, ax_b = _factor_axes(operand, axis)
        if ax_a is not None:
            a = lax.slice_in_dim(a, lo, hi, st, axis=ax_a)
        if ax_b is not None:
            b = lax.slice_in_dim(b, lo, hi, st, axis=ax_b)
    return operand.replace(w=bind(lax.slice_p, operand.frozen_w, **params), a=a, b=b)


@quax.register(lax.split_p)
def _(operand: BatchedLoraArray, *, sizes, axis):
    """`jnp.split(W, n, axis)`: each piece keeps the low-rank form."""
    pieces = bind(lax.split_p, operand.frozen_w, sizes=sizes, axis=axis)
    ax_a, ax_b = _factor_axes(operand, axis)
    a_parts = lax.split(operand.a, sizes, ax_a) if ax_a is not None else None
    b_parts = lax.split(operand.b, sizes, ax_b) if ax_b is not None else None
    return [
        operand.replace(
            w=w,
            a=operand.a if a_parts is None else a_parts[j],
            b=operand.b if b_parts is None else b_parts[j],
        )
        for j, w in enumerate(pieces)
    ]


@quax.register(lax.squeeze_p)
def _(operand: BatchedLoraArray, *, dimensions):
    """Dropping size-1 axes (`W[i]` on a layer stack is a slice then a squeeze)."""
    dims = sorted(d % operand.ndim for d in dimensions)
    drop_a = [ax for d in dims if (ax := _factor_axes(operand, d)[0]) is not None]
    drop_b = [ax for d in dims if (ax := _factor_axes(operand, d)[1]) is not None]

    def renumber(axes):
        return tuple(ax - sum(d < ax for d in dims) for ax in axes if ax not in dims)

    in_axes, out_axes = renumber(operand.in_axes), renumber(operand.out_axes)
    if not in_axes or not out_axes:  # `E[3]`: a row of a table, no longer a weight
        return squeezed_lookup(operand, tuple(dims))
    return operand.replace(
        w=bind(lax.squeeze_p, operand.frozen_w, dimensions=dimensions),
        a=jnp.squeeze(operand.a, axis=tuple(drop_a)),
        b=jnp.squeeze(operand.b, axis=tuple(drop_b)),
        in_axes=in_axes,
        out_axes=out_axes,
        stack_axes=renumber(operand.stack_axes),
    )
