"""Axis bookkeeping shared by the array type, the rules and the adapters.

A LoRA'd weight `w` has three kinds of axes: the *in* axes an activation contracts
with, the *out* axes the product produces, and *stack* axes (a scanned layer stack).
The adapter factors are laid out as

    a: (*stack, n_adapters, *in_shape, rank)
    b: (*stack, n_adapters, rank, *out_shape)

with `in_shape`/`out_shape` following the order of `in_axes`/`out_axes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array


def normalise_axes(axes: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Turns an int or a sequence of ints into a tuple of non-negative axes."""
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for ax in axes:
        if not isinstance(ax, int) or isinstance(ax, bool):
            raise TypeError(f"`{name}` must contain ints, got {axes!r}.")
        if not -ndim <= ax < ndim:
            raise ValueError(
                f"`{name}`={tuple(axes)} names axis {ax}, but the weight has only "
                f"{ndim} axes."
            )
        out.append(ax % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={tuple(axes)} names the same axis twice.")
    return tuple(out)


def check_partition(
    ndim: int,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    stack_axes: tuple[int, ...],
    what: str,
) -> None:
    """Every axis of the weight is in exactly one of the three groups."""
    if not in_axes:
        raise ValueError(f"{what}: `in_axes` is empty; a LoRA needs an input axis.")
    if not out_axes:
        raise ValueError(f"{what}: `out_axes` is empty; a LoRA needs an output axis.")
    groups = {"in_axes": in_axes, "out_axes": out_axes, "stack_axes": stack_axes}
    seen: dict[int, str] = {}
    for name, axes in groups.items():
        for ax in axes:
            if ax in seen:
                raise ValueError(
                    f"{what}: axis {ax} is in both `{seen[ax]}` and `{name}`; each "
                    "axis of the weight belongs to exactly one group."
                )
            seen[ax] = name
    missing = sorted(set(range(ndim)) - set(seen))
    if missing:
        raise ValueError(
            f"{what}: axes {missing} of the {ndim}-d weight are in none of "
            f"in_axes={in_axes}, out_axes={out_axes}, stack_axes={stack_axes}. "
            "Every axis must be an input (contracted) axis, an output axis or a "
            "layer-stack axis."
        )


def factor_shapes(
    w_shape: tuple[int, ...],
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    stack_axes: tuple[int, ...],
    rank: int,
    n_adapters: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of `a` and `b` (with an `n_adapters` axis unless it is None)."""
    stack = tuple(w_shape[i] for i in stack_axes)
    ins = tuple(w_shape[i] for i in in_axes)
    outs = tuple(w_shape[i] for i in out_axes)
    n = () if n_adapters is None else (n_adapters,)
    return (*stack, *n, *ins, rank), (*stack, *n, rank, *outs)


def dense_delta(
    a: Array,
    b: Array,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    stack_axes: tuple[int, ...],
) -> Array:
    """`a ⊗ b` for one adapter (no `n_adapters` axis), laid out on the weight's axes.

    `a`: `(*stack, *in, rank)`, `b`: `(*stack, rank, *out)`. Used only by `merge`,
    by the opt-in materialisation and by tests; never on the serving hot path.
    """
    ns, ni, no = len(stack_axes), len(in_axes), len(out_axes)
    a2 = a.reshape(*a.shape[:ns], math.prod(a.shape[ns : ns + ni]), a.shape[-1])
    b2 = b.reshape(*b.shape[: ns + 1], math.prod(b.shape[ns + 1 :]))
    d = jnp.matmul(a2, b2)  # (*stack, prod(in), prod(out))
    d = d.reshape(*a.shape[: ns + ni], *b.shape[ns + 1 :])
    # d's axes are (stack..., in..., out...) in the order of the three tuples.
    source = (*stack_axes, *in_axes, *out_axes)
    perm = [source.index(ax) for ax in range(ns + ni + no)]
    return jnp.transpose(d, perm)
