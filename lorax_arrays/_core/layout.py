"""`Layout`: which axes of a weight are contracted, produced, or a layer stack, and
all the axis arithmetic that follows from it.

A LoRA'd weight `w` has three groups of axes: the *in* axes an activation contracts
with, the *out* axes the product produces, and *stack* axes (a scanned layer stack).
The adapter factors are laid out as

    a: (*stack, n_adapters, *in_shape, rank)
    b: (*stack, n_adapters, rank, *out_shape)

with `stack_shape`/`in_shape`/`out_shape` following the *order* of
`stack_axes`/`in_axes`/`out_axes`, so a transpose of `w` only renumbers the tuples
and never touches `a` or `b`. (An `Adapter` holds one adapter's factors, without the
`n_adapters` axis.)

Every rule that changes how `w` is laid out (transpose, reshape, squeeze, slice,
split, a block at dynamic offsets, a scan step, reading the array the other way
round) asks its `Layout` what becomes of the groups and of the factors' axes; the
`dot_general` rewrite asks it for the permutations to the canonical problem of
`_rules/strategies.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array

from . import lax as _lax
from .errors import LayoutError


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


@dataclasses.dataclass(frozen=True)
class Layout:
    """The in, out and stack axis groups of a weight (static and hashable).

    Every axis of the weight is in exactly one group (`check`). Methods that take
    factors `a`, `b` expect the `n_adapters` axis (a `BatchedLoraArray`'s layout)
    unless they say otherwise.
    """

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()

    @classmethod
    def of(
        cls,
        ndim: int,
        in_axes: int | Sequence[int],
        out_axes: int | Sequence[int],
        stack_axes: int | Sequence[int] = (),
    ) -> Layout:
        """The layout of an `ndim`-d weight from ints or sequences (negative axes
        allowed), not yet checked to be a partition."""
        return cls(
            normalise_axes(in_axes, ndim, "in_axes"),
            normalise_axes(out_axes, ndim, "out_axes"),
            normalise_axes(stack_axes, ndim, "stack_axes"),
        )

    # -- the groups ---------------------------------------------------------------

    @property
    def n_stack(self) -> int:
        return len(self.stack_axes)

    def check(self, ndim: int, what: str) -> None:
        """Every axis of an `ndim`-d weight is in exactly one of the three groups,
        and there is at least one in-axis and one out-axis."""
        if not self.in_axes:
            raise ValueError(f"{what}: `in_axes` is empty; a LoRA needs an input axis.")
        if not self.out_axes:
            raise ValueError(
                f"{what}: `out_axes` is empty; a LoRA needs an output axis."
            )
        seen: dict[int, str] = {}
        for name, axes in self._groups():
            for ax in axes:
                if ax in seen:
                    raise ValueError(
                        f"{what}: axis {ax} is in both `{seen[ax]}` and `{name}`; "
                        "each axis of the weight belongs to exactly one group."
                    )
                seen[ax] = name
        missing = sorted(set(range(ndim)) - set(seen))
        if missing:
            raise ValueError(
                f"{what}: axes {missing} of the {ndim}-d weight are in none of "
                f"in_axes={self.in_axes}, out_axes={self.out_axes}, stack_axes="
                f"{self.stack_axes}. Every axis must be an input (contracted) axis, "
                "an output axis or a layer-stack axis."
            )

    def _groups(self):
        return (
            ("in_axes", self.in_axes),
            ("out_axes", self.out_axes),
            ("stack_axes", self.stack_axes),
        )

    def role(self, axis: int) -> str:
        """`"in_axes"`, `"out_axes"` or `"stack_axes"`: the group of `axis`."""
        return next(name for name, axes in self._groups() if axis in axes)

    def contracts(self, contracting: Sequence[int], batch: Sequence[int]) -> str | None:
        """What a `dot_general` with these contracting and batch axes of the weight
        reads: `"in"` (the product `x · W`), `"out"` (the array read the other way
        round: a tied head `h @ E.T`), or None (no low-rank form).

        Every batch axis must be a stack axis. A stack axis that is not a batch
        axis passes through as a free axis of the product (a fused QKV kernel
        `(3, N, D, H)` in `einsum("BTD,SNDH->SBTNH")`): each of its entries is its
        own weight with its own adapters (`free_stack_axes`)."""
        if not set(batch) <= set(self.stack_axes):
            return None
        if set(contracting) == set(self.in_axes):
            return "in"
        if set(contracting) == set(self.out_axes):
            return "out"
        return None

    def free_stack_axes(self, batch: Sequence[int]) -> tuple[int, ...]:
        """The stack axes that a `dot_general` with these batch axes of the weight
        leaves free (they pass through to its output), in increasing order, as
        `dot_general` lays out the weight's free axes."""
        return tuple(sorted(ax for ax in self.stack_axes if ax not in batch))

    # -- shapes -------------------------------------------------------------------

    def stack_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[ax] for ax in self.stack_axes)

    def in_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[ax] for ax in self.in_axes)

    def out_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[ax] for ax in self.out_axes)

    def factor_shapes(
        self, shape: Sequence[int], rank: int, n_adapters: int | None = None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of `a` and `b` for a weight of `shape` (with an
        `n_adapters` axis unless it is None)."""
        stack = self.stack_shape(shape)
        n = () if n_adapters is None else (n_adapters,)
        ins, outs = self.in_shape(shape), self.out_shape(shape)
        return (*stack, *n, *ins, rank), (*stack, *n, rank, *outs)

    def factor_axes(
        self, axis: int, adapter_axis: bool = True
    ) -> tuple[int | None, int | None]:
        """Which axis of `a` and of `b` carries axis `axis` of the weight (None:
        that factor has no such axis): a stack axis is in both, an in-axis only in
        `a`, an out-axis only in `b`."""
        n = int(adapter_axis)
        if axis in self.stack_axes:
            j = self.stack_axes.index(axis)
            return j, j
        if axis in self.in_axes:
            return self.n_stack + n + self.in_axes.index(axis), None
        return None, self.n_stack + n + 1 + self.out_axes.index(axis)

    # -- layout changes -----------------------------------------------------------

    def swapped(self) -> Layout:
        """Read the other way round: in and out exchange roles."""
        return Layout(self.out_axes, self.in_axes, self.stack_axes)

    def swap_factors(self, a: Array, b: Array) -> tuple[Array, Array]:
        """The factors of the swapped layout: `(B^T, A^T)` per adapter."""
        ns = self.n_stack
        return (
            jnp.moveaxis(b, ns + 1, -1),  # (*stack, n, *out, r)
            jnp.moveaxis(a, -1, ns + 1),  # (*stack, n, r, *in)
        )

    def transposed(self, permutation: Sequence[int]) -> Layout:
        """After `lax.transpose(w, permutation)`: only the axis numbers change."""
        new = {old: new for new, old in enumerate(permutation)}
        renumber = lambda axes: tuple(new[ax] for ax in axes)  # noqa: E731
        return Layout(*(renumber(axes) for _, axes in self._groups()))

    def squeezed(self, dims: Sequence[int]) -> Layout:
        """After removing the (size-1) axes `dims`: the others renumbered. A group
        may come out empty (`E[3]` removes the only in-axis); `check` refuses
        that."""
        dims = set(dims)

        def renumber(axes):
            return tuple(
                ax - sum(d < ax for d in dims) for ax in axes if ax not in dims
            )

        return Layout(*(renumber(axes) for _, axes in self._groups()))

    def squeeze_factors(
        self, a: Array, b: Array, dims: Sequence[int]
    ) -> tuple[Array, Array]:
        """The factors with the axes carrying the (size-1) weight axes `dims`
        removed."""
        pairs = [self.factor_axes(d) for d in dims]
        drop_a = tuple(pa for pa, _ in pairs if pa is not None)
        drop_b = tuple(pb for _, pb in pairs if pb is not None)
        return jnp.squeeze(a, axis=drop_a), jnp.squeeze(b, axis=drop_b)

    def scan_step(self, a: Array, b: Array) -> tuple[Layout, Array, Array]:
        """What `lax.scan` over axis 0 (a stack axis) slices: the factors with
        that stack axis moved to the front, and the layout of one step."""
        j = self.stack_axes.index(0)
        return self.squeezed((0,)), jnp.moveaxis(a, j, 0), jnp.moveaxis(b, j, 0)

    def stacked(self) -> Layout:
        """With a new leading stack axis 0 (the factors gain it at the front)."""
        up = lambda axes: tuple(ax + 1 for ax in axes)  # noqa: E731
        return Layout(up(self.in_axes), up(self.out_axes), (0, *up(self.stack_axes)))

    def sorted(self, a: Array, b: Array) -> tuple[Layout, Array, Array]:
        """The same weight with `in_axes`/`out_axes` listed in increasing order, and
        its factors (their group axes permuted to match)."""
        ns = self.n_stack
        in_order = sorted(range(len(self.in_axes)), key=lambda j: self.in_axes[j])
        out_order = sorted(range(len(self.out_axes)), key=lambda j: self.out_axes[j])
        a_perm = [*range(ns + 1), *(ns + 1 + j for j in in_order), a.ndim - 1]
        b_perm = [*range(ns + 2), *(ns + 2 + j for j in out_order)]
        layout = Layout(
            tuple(sorted(self.in_axes)), tuple(sorted(self.out_axes)), self.stack_axes
        )
        return layout, jnp.transpose(a, a_perm), jnp.transpose(b, b_perm)

    def reshaped(
        self, a: Array, b: Array, old: tuple[int, ...], new: tuple[int, ...]
    ) -> tuple[Layout, Array, Array]:
        """After `w.reshape(new)` (from shape `old`): the layout and the factors.

        A reshape keeps the low-rank form when it merges or splits axes within the
        in-group or within the out-group (Flax `DenseGeneral`/`Einsum` kernels);
        anything else raises `LayoutError` saying why.
        """
        groups = reshape_groups(old, new)
        if groups is None:
            raise LayoutError("it is not a plain row-major reshape")
        lay, a, b = self.sorted(a, b)
        new_role: dict[int, str] = {}
        stack_to_new: dict[int, int] = {}
        for og, ng in groups:
            if not og:
                raise LayoutError(f"new size-1 axis {ng[0]} belongs to no group")
            roles = {lay.role(ax) for ax in og}
            if len(roles) > 1:
                raise LayoutError(f"axes {og} mix the groups {sorted(roles)}")
            (r,) = roles
            if r == "stack_axes":
                if len(og) != 1 or len(ng) != 1:
                    raise LayoutError(
                        "it merges, splits, adds or drops a layer-stack axis"
                    )
                stack_to_new[og[0]] = ng[0]
            for ax in ng:
                new_role[ax] = r
        in_axes = tuple(ax for ax in range(len(new)) if new_role[ax] == "in_axes")
        out_axes = tuple(ax for ax in range(len(new)) if new_role[ax] == "out_axes")
        if not in_axes or not out_axes:
            raise LayoutError("it would leave no input or no output axis")
        # The factors' leading axes follow `stack_axes`' order, so keep that order.
        stack_axes = tuple(stack_to_new[ax] for ax in lay.stack_axes)
        out = Layout(in_axes, out_axes, stack_axes)
        ns = self.n_stack
        assert math.prod(out.in_shape(new)) == math.prod(lay.in_shape(old))
        a = a.reshape(*a.shape[: ns + 1], *out.in_shape(new), a.shape[-1])
        b = b.reshape(*b.shape[: ns + 2], *out.out_shape(new))
        return out, a, b

    # -- the dot_general rewrite ----------------------------------------------------

    def dot_perms(
        self,
        c_w: Sequence[int],
        c_x: Sequence[int],
        b_w: Sequence[int],
        b_x: Sequence[int],
        x_free: Sequence[int],
        w_is_lhs: bool,
    ) -> tuple[list[int], list[int], list[int]]:
        """The permutations between `dot_general(x, W)` (contracting axes `c_w` of
        W with `c_x` of x, batch axes `b_w` with `b_x`; `x_free` x's free axes)
        and the canonical problem of `_strategies` (in-axes read, `contracts`
        gave "in"):

        - `x_perm`: x's axes as (batch, free, in-axes in `in_axes` order);
        - `stack_perm`: the factors' stack axes in the order of the batch axes,
            then the free stack axes (`free_stack_axes`) in increasing order;
        - `out_perm`: from the low-rank term `(*batch, *free stack, *x free, *out
            in `out_axes` order)` to `dot_general`'s own output layout `(batch,
            lhs free, rhs free)`, where W's free axes are its out-axes and free
            stack axes, in increasing order.

        `x_free` may come in any order (the indexed axes first, wherever they sit
        in x): the low-rank term follows it, and `out_perm` restores x's order.
        """
        x_in = [c_x[list(c_w).index(ax)] for ax in self.in_axes]
        x_perm = [*b_x, *x_free, *x_in]
        free_stack = self.free_stack_axes(b_w)
        stack_perm = [self.stack_axes.index(ax) for ax in (*b_w, *free_stack)]
        nb, nf, n_xf = len(b_w), len(free_stack), len(x_free)

        def w_position(ax):
            if ax in free_stack:
                return nb + free_stack.index(ax)
            return nb + nf + n_xf + self.out_axes.index(ax)

        w_part = [w_position(ax) for ax in sorted((*self.out_axes, *free_stack))]
        x_part = [nb + nf + list(x_free).index(d) for d in sorted(x_free)]
        out_perm = list(range(nb)) + (w_part + x_part if w_is_lhs else x_part + w_part)
        return x_perm, stack_perm, out_perm

    def stack_ordered(
        self, a: Array, b: Array, stack_perm: Sequence[int]
    ) -> tuple[Array, Array]:
        """The factors with their stack axes permuted by `stack_perm`."""
        ns = self.n_stack
        a = _lax.transpose(a, [*stack_perm, *range(ns, a.ndim)])
        b = _lax.transpose(b, [*stack_perm, *range(ns, b.ndim)])
        return a, b

    # -- dense ----------------------------------------------------------------------

    def factor_specs(
        self, spec: Sequence[Any], n_adapters: bool = True
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The partition specs of `a` and `b` from a weight's own spec (one entry
        per weight axis, shorter specs padded with None): `a` takes the stack and
        in-axes' entries, `b` the stack and out-axes'; the adapter (slot) and rank
        axes are replicated. A column-sharded kernel `(None, "model")` gives `b`
        `(None, None, "model")`, so the low-rank term is sharded as the base
        product is."""
        ndim = len(self.in_axes) + len(self.out_axes) + len(self.stack_axes)
        parts = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
        stack = tuple(parts[s] for s in self.stack_axes)
        n = (None,) if n_adapters else ()
        a = (*stack, *n, *(parts[i] for i in self.in_axes), None)
        b = (*stack, *n, None, *(parts[o] for o in self.out_axes))
        return a, b

    def slot_specs(
        self,
        spec: Sequence[Any],
        capacity: int,
        axis_sizes: dict[str, int],
        n_adapters: bool = True,
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """`factor_specs` for stored adapters (a bank's or a trainer's slots),
        fully sharded: the factor that no weight axis shards (a column-parallel
        weight's `a`, a row-parallel one's `b`) is split along its rank instead,
        over the mesh axes that shard the other group, when they divide the
        `capacity` rank (vLLM's `fully_sharded_loras`). Every device then holds
        its share of both factors, as of the weight; the product pays one small
        collective of the `(rows, rank)` intermediate. `axis_sizes`: the mesh's
        `{name: size}`."""
        a, b = self.factor_specs(spec, n_adapters)
        ndim = len(self.in_axes) + len(self.out_axes) + len(self.stack_axes)
        parts = tuple(spec) + (None,) * (ndim - len(tuple(spec)))

        def names(axes):
            out = []
            for ax in axes:
                p = parts[ax]
                out += [] if p is None else list(p) if isinstance(p, tuple) else [p]
            return tuple(out)

        ins, outs, stack = (
            names(self.in_axes),
            names(self.out_axes),
            names(self.stack_axes),
        )

        def fits(group):
            size = math.prod(axis_sizes[n] for n in group)
            return group and not set(group) & set(stack) and capacity % size == 0

        def one(group):
            return group[0] if len(group) == 1 else group

        if outs and not ins and fits(outs):
            a = (*a[:-1], one(outs))
        if ins and not outs and fits(ins):
            at = len(self.stack_axes) + (1 if n_adapters else 0)
            b = (*b[:at], one(ins), *b[at + 1 :])
        return a, b

    def dense_delta(self, a: Array, b: Array) -> Array:
        """`a ⊗ b` for one adapter (no `n_adapters` axis), laid out on the weight's
        axes.

        `a`: `(*stack, *in, rank)`, `b`: `(*stack, rank, *out)`. Used only by
        `merge`, by the opt-in materialisation and by lookups of a single row;
        never on the serving hot path.
        """
        ns, ni, no = self.n_stack, len(self.in_axes), len(self.out_axes)
        a2 = a.reshape(*a.shape[:ns], math.prod(a.shape[ns : ns + ni]), a.shape[-1])
        b2 = b.reshape(*b.shape[: ns + 1], math.prod(b.shape[ns + 1 :]))
        d = jnp.matmul(a2, b2)  # (*stack, prod(in), prod(out))
        d = d.reshape(*a.shape[: ns + ni], *b.shape[ns + 1 :])
        # d's axes are (stack..., in..., out...) in the order of the three tuples.
        source = (*self.stack_axes, *self.in_axes, *self.out_axes)
        perm = [source.index(ax) for ax in range(ns + ni + no)]
        return jnp.transpose(d, perm)

    def on_weight(self, v: Array, group: str, lead: int = 0) -> Array:
        """A vector over one axis group laid on the weight's axes: `v` is
        `(*lead, *stack, *group)` (`group` `"in"` or `"out"`, its axes in the
        layout's order), the result broadcasts against `(*lead, *w.shape)`."""
        axes = self.in_axes if group == "in" else self.out_axes
        dims = [*range(lead), *(lead + ax for ax in (*self.stack_axes, *axes))]
        ndim = lead + self.n_stack + len(self.in_axes) + len(self.out_axes)
        return broadcast_to_axes(v, dims, ndim)


def broadcast_to_axes(v: Array, dims: Sequence[int], ndim: int) -> Array:
    """`v`, whose axes stand for the axes `dims` of an `ndim`-D array, reordered
    and given size-1 axes elsewhere, so that it broadcasts against that array."""
    target = [1] * ndim
    for k, d in enumerate(dims):
        target[d] = v.shape[k]
    order = sorted(range(len(dims)), key=lambda k: dims[k])
    return jnp.transpose(v, order).reshape(target)


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


# Function forms, for callers that hold the three tuples rather than a Layout.


def check_partition(
    ndim: int,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    stack_axes: tuple[int, ...],
    what: str,
) -> None:
    """`Layout(in_axes, out_axes, stack_axes).check(ndim, what)`."""
    Layout(in_axes, out_axes, stack_axes).check(ndim, what)


def dense_delta(
    a: Array,
    b: Array,
    in_axes: tuple[int, ...],
    out_axes: tuple[int, ...],
    stack_axes: tuple[int, ...],
) -> Array:
    """`Layout(in_axes, out_axes, stack_axes).dense_delta(a, b)`."""
    return Layout(in_axes, out_axes, stack_axes).dense_delta(a, b)


__all__ = [
    "Layout",
    "LayoutError",
    "broadcast_to_axes",
    "check_partition",
    "dense_delta",
    "normalise_axes",
    "reshape_groups",
]
