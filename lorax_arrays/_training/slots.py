"""The device side of an `AdapterTrainer`: its slots.

Every trainable array has the slot axis first (so the optimizer runs per slot
under one `jax.vmap`, and a slot is written with one `dynamic_update_index`):

- `factors[path] = (a, b)`: `a (slots, *stack, *in, R)`, `b (slots, *stack, R,
  *out)`, `R` the capacity; a tenant of rank `r` holds its factors in the first
  `r` columns and zeros after them;
- `magnitudes[path] (slots, *stack, *out)` (DoRA), `in_scales[path] (slots,
  *stack, *in)` and `out_scales[path] (slots, *stack, *out)` (IA3), `vera_d[path]
  (slots, *stack, R)` and `vera_b[path] (slots, *stack, *out)` (VeRA, whose
  factors are then its frozen projections), when the trainer's kinds have them
  (ones where a tenant has none).

What is not trained is the `SlotConfig`: per path and slot the scale, head scale,
rank and which vectors are the tenant's, per slot the clip norm. Masks built from
it inside the step keep every array that is not a tenant's (padded rank columns,
leaves it does not adapt, other kinds' vectors) at its value: zero gradient, zero
update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from .._adapters.adapter import Adapter
from .._adapters.targeting import LeafLayout
from .._core.lax import update_index
from .._serving.slots import Leaf as Leaf, weight_specs


class SlotParams(NamedTuple):
    """The trainable arrays of every slot (a pytree; slot axis first)."""

    factors: dict[str, tuple[Any, Any]]
    magnitudes: dict[str, Any]
    in_scales: dict[str, Any]
    out_scales: dict[str, Any]
    vera_d: dict[str, Any]
    vera_b: dict[str, Any]


class SlotConfig(NamedTuple):
    """What each slot holds, not trained: `(paths, slots)` scales, head scales,
    ranks (0 where the tenant does not adapt the path) and flags saying which
    vectors are the tenant's (`dora`, `has_in`, `has_out`) and where its factors
    are VeRA's frozen projections (`vera`); `(slots,)` clip norms (`inf`: none)."""

    scales: Any
    heads: Any
    ranks: Any
    dora: Any
    has_in: Any
    has_out: Any
    vera: Any
    clip: Any


@dataclasses.dataclass(frozen=True)
class Tenant:
    """A tenant's metadata (its arrays live in its slot)."""

    slot: int
    layouts: tuple[LeafLayout, ...]
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    use_rslora: tuple[bool, ...]
    lookup_only: tuple[bool, ...]
    head_only: tuple[bool, ...]
    dora: frozenset[str]
    ins: frozenset[str]
    outs: frozenset[str]
    max_grad_norm: float | None
    vera: frozenset[str] = frozenset()


def empty_params(leaves: dict[str, Leaf], n: int, kinds: tuple[str, ...]):
    """`n` empty slots: zero factors, vectors of ones (NumPy shapes, JAX zeros)."""
    factors, mags, ins, outs, vd, vb = {}, {}, {}, {}, {}, {}
    for path, leaf in leaves.items():
        lay, r, dt = leaf.layout, leaf.capacity, leaf.dtype
        st = (n, *lay.stack_shape)
        factors[path] = (
            jnp.zeros((*st, *lay.in_shape, r), dt),
            jnp.zeros((*st, r, *lay.out_shape), dt),
        )
        if "dora" in kinds:
            mags[path] = jnp.ones((*st, *lay.out_shape), dt)
        if "ia3" in kinds:
            ins[path] = jnp.ones((*st, *lay.in_shape), dt)
            outs[path] = jnp.ones((*st, *lay.out_shape), dt)
        if "vera" in kinds:
            vd[path] = jnp.ones((*st, r), dt)
            vb[path] = jnp.ones((*st, *lay.out_shape), dt)
    return SlotParams(factors, mags, ins, outs, vd, vb)


def empty_config(n_paths: int, n: int) -> SlotConfig:
    zeros = np.zeros((n_paths, n), np.float32)
    no = np.zeros((n_paths, n), bool)
    return SlotConfig(
        scales=zeros,
        heads=zeros.copy(),
        ranks=np.zeros((n_paths, n), np.int32),
        dora=no,
        has_in=no.copy(),
        has_out=no.copy(),
        vera=no.copy(),
        clip=np.full((n,), np.inf, np.float32),
    )


def slot_params(
    adapter: Adapter, leaves: dict[str, Leaf], kinds: tuple[str, ...]
) -> SlotParams:
    """One slot's arrays for `adapter` (no slot axis), in NumPy: its factors
    zero-padded to the capacity, its vectors, and zeros / ones where it has
    none (on the host, as the bank pads: no compile per adapter shape). A VeRA
    leaf's factors are its frozen projections, its `d` and `b` its vectors."""
    factors, mags, ins, outs, vd, vb = {}, {}, {}, {}, {}, {}
    for path, leaf in leaves.items():
        lay, r, dt = leaf.layout, leaf.capacity, leaf.dtype
        factors[path] = (
            np.zeros((*lay.stack_shape, *lay.in_shape, r), dt),
            np.zeros((*lay.stack_shape, r, *lay.out_shape), dt),
        )
        if "dora" in kinds:
            mags[path] = np.ones((*lay.stack_shape, *lay.out_shape), dt)
        if "ia3" in kinds:
            ins[path] = np.ones((*lay.stack_shape, *lay.in_shape), dt)
            outs[path] = np.ones((*lay.stack_shape, *lay.out_shape), dt)
        if "vera" in kinds:
            vd[path] = np.ones((*lay.stack_shape, r), dt)
            vb[path] = np.ones((*lay.stack_shape, *lay.out_shape), dt)
    for path in adapter.paths:
        leaf = leaves[path]
        a, b = (np.asarray(x, leaf.dtype) for x in adapter.weights[path])
        za, zb = factors[path]
        za[..., : a.shape[-1]] = a
        zb[(slice(None),) * leaf.n_stack + (slice(0, b.shape[leaf.n_stack]),)] = b
        for field, store in (
            ("magnitudes", mags),
            ("in_scales", ins),
            ("out_scales", outs),
        ):
            if path in getattr(adapter, field):
                store[path] = np.asarray(getattr(adapter, field)[path], leaf.dtype)
        if path in adapter.vera:
            d, b_vec = (np.asarray(x, leaf.dtype) for x in adapter.vera[path])
            vd[path][..., : d.shape[-1]] = d
            vb[path] = b_vec
    return SlotParams(factors, mags, ins, outs, vd, vb)


def adapter_of(params: SlotParams, tenant: Tenant) -> Adapter:
    """The tenant's `Adapter` from its slot's arrays (`params` without the slot
    axis): factors cut back to its ranks, its leaves and vectors only."""
    weights, mags, ins, outs, vera = {}, {}, {}, {}, {}
    for lay, r in zip(tenant.layouts, tenant.ranks):
        a, b = params.factors[lay.path]
        ns = len(lay.stack_axes)
        weights[lay.path] = (a[..., :r], lax.slice_in_dim(b, 0, r, axis=ns))
        if lay.path in tenant.dora:
            mags[lay.path] = params.magnitudes[lay.path]
        if lay.path in tenant.ins:
            ins[lay.path] = params.in_scales[lay.path]
        if lay.path in tenant.outs:
            outs[lay.path] = params.out_scales[lay.path]
        if lay.path in tenant.vera:
            d = params.vera_d[lay.path][..., :r]
            vera[lay.path] = (d, params.vera_b[lay.path])
    return Adapter(
        weights=weights,
        layouts=tenant.layouts,
        ranks=tenant.ranks,
        alphas=tenant.alphas,
        use_rslora=tenant.use_rslora,
        lookup_only=tenant.lookup_only,
        head_only=tenant.head_only,
        magnitudes=mags,
        in_scales=ins,
        out_scales=outs,
        vera=vera,
    )


def write_slot(state: Any, slot: Any, new: Any) -> Any:
    """`state` (slot axis first on every leaf) with slot `slot` replaced by
    `new` (the same pytree without the slot axis)."""
    return jax.tree.map(
        lambda full, part: update_index(full, jnp.asarray(part), slot, 0),
        state,
        new,
    )


def take_slot(state: Any, slot: int) -> Any:
    """Slot `slot` of `state` (slot axis first on every leaf), as copies."""
    return jax.tree.map(lambda x: x[slot], state)


def set_hyperparameter(state: Any, name: str, value: Any, what: str) -> Any:
    """`state` (an optimizer state) with the injected hyperparameter `name` set to
    `value`: the `hyperparams` dict of `optax.inject_hyperparams`' state, found
    at the top or inside the tuples of a chain. Raises `ValueError` saying how to
    build the optimizer when there is none."""
    found = []

    def visit(s):
        hyper = getattr(s, "hyperparams", None)
        if isinstance(hyper, dict) and name in hyper and hasattr(s, "_replace"):
            found.append(1)
            old = hyper[name]
            new = jnp.asarray(value, getattr(old, "dtype", jnp.float32))
            return s._replace(hyperparams={**hyper, name: new})
        if isinstance(s, tuple) and not hasattr(s, "_fields"):
            return tuple(visit(x) for x in s)
        return s

    out = visit(state)
    if not found:
        raise ValueError(
            f"{what}: a per-tenant `{name}` needs the optimizer's {name} in its "
            "state, and this optimizer has none. Build it with optax's "
            f"`optax.inject_hyperparams(optax.adam)({name}=1e-3)` (any optimizer "
            f"factory taking `{name}`), or leave `{name}` out to use the "
            "optimizer's own."
        )
    return out


def get_hyperparameter(state: Any, name: str) -> Any:
    """The injected hyperparameter `name` of an optimizer state, or `None`."""
    hyper = getattr(state, "hyperparams", None)
    if isinstance(hyper, dict) and name in hyper:
        return hyper[name]
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        for s in state:
            v = get_hyperparameter(s, name)
            if v is not None:
                return v
    return None


def slot_shardings(
    leaves: dict[str, Leaf], kinds: tuple[str, ...], weights: dict[str, Any]
) -> SlotParams | None:
    """Where each slot array lives, from the shardings of the base `weights`
    (`NamedSharding`s): the slot axis replicated, then the specs of the axes each
    array stands for, fully sharded (`Layout.slot_specs`, as the bank's slots);
    the vectors those of their group. None when no weight carries a
    `NamedSharding`."""
    found = weight_specs(weights)
    if found is None:
        return None
    mesh, specs = found

    def put(*parts):
        return NamedSharding(mesh, PartitionSpec(None, *parts))

    f, m, i, o, vd, vb = {}, {}, {}, {}, {}, {}
    for path, leaf in leaves.items():
        lay = leaf.layout.layout
        spec, sizes = specs.get(path, ((), {}))
        a, b = lay.factor_specs(spec, n_adapters=False)
        ns = len(lay.stack_axes)
        stack, ins, outs = a[:ns], a[ns:-1], b[ns + 1 :]
        a, b = lay.slot_specs(spec, leaf.capacity, sizes, n_adapters=False)
        f[path] = (put(*a), put(*b))
        if "dora" in kinds:
            m[path] = put(*stack, *outs)
        if "ia3" in kinds:
            i[path] = put(*stack, *ins)
            o[path] = put(*stack, *outs)
        if "vera" in kinds:
            vd[path] = put(*stack, None)
            vb[path] = put(*stack, *outs)
    return SlotParams(f, m, i, o, vd, vb)


def state_shardings(state: Any, params: Any, shardings: SlotParams) -> Any:
    """Shardings for an optimizer state made from `params` (`vmap(init)`): a
    leaf at a key path ending in a parameter's path, with its shape (Adam's `mu`
    and `nu`, a momentum trace), is placed as that parameter; any other (step
    counts, injected hyperparameters) is replicated on the same mesh."""
    by_path = {}
    for (path, x), sh in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings)
    ):
        by_path[tuple(path)] = (tuple(x.shape), sh)
    mesh = jax.tree.leaves(shardings)[0].mesh
    rep = NamedSharding(mesh, PartitionSpec())

    def place(path, x):
        path = tuple(path)
        for n in range(len(path)):
            hit = by_path.get(path[n:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(place, state)
