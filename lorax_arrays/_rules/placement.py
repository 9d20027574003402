"""Dispatch rules that place or name an adapted weight: `device_put`,
`sharding_constraint`, `name` (`checkpoint_name`).

Registers: `device_put` (`jax.device_put` inside a traced function: MaxText's
host-offloaded parameters moved to the device at each use) and `sharding_constraint`
(`jax.lax.with_sharding_constraint`: the Flax NNX sharding guide constrains a
model's whole state to its partition specs inside the jitted call).

`name` is `jax.ad_checkpoint.checkpoint_name`, which Levanter applies to weights
inside its scanned blocks: the weight, its factors and scales all get the name, so a
remat policy that saves (or offloads) that name keeps the whole adapted weight.

None changes a value, so all keep the low-rank form: each acts on the base
weight `w` as asked, and on the factors as follows.

- A device or memory space (`jax.memory.Space.Device`, a `jax.Device`): the same
  for `w`, `a`, `b` and the scales, so the product runs where the weight went.
- A `NamedSharding` with a `PartitionSpec` for the weight's axes: the factors get
  the specs of the axes they stand for. `a` (`(*stack, n, *in, rank)`) takes the
  specs of the weight's stack and in-axes, `b` (`(*stack, n, rank, *out)`) those of
  its stack and out-axes; the adapter and rank axes are replicated. A column-sharded
  kernel `P(None, "model")` gives `b` the spec `P(None, None, "model")`, so the
  low-rank term is sharded as the base product is.
- Any other sharding (a `SingleDeviceSharding`, a `GSPMDSharding`) describes the
  weight's shape only: it applies to `w`, and the factors are left to the compiler.

The indices are never moved: they belong to the batch, not to the weight.
"""

from __future__ import annotations

from typing import Any

import jax
import quax
from jax._src.ad_checkpoint import name_p
from jax._src.dispatch import device_put_p
from jax._src.pjit import sharding_constraint_p
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import ArrayLike

from .._core.array import BatchedLoraArray, bind


def _factor_specs(lora: BatchedLoraArray, spec: PartitionSpec):
    """The partition specs of `a` and `b` from the weight's own `spec`."""
    a, b = lora.layout.factor_specs(tuple(spec))
    return PartitionSpec(*a), PartitionSpec(*b)


def _placements(lora: BatchedLoraArray, where: Any) -> dict[str, Any]:
    """Where each field goes, for a weight sent to `where` (`None`: left alone)."""
    if isinstance(where, NamedSharding) and isinstance(where.spec, PartitionSpec):
        a, b = _factor_specs(lora, where.spec)
        rep = where.update(spec=PartitionSpec())
        return dict(w=where, a=where.update(spec=a), b=where.update(spec=b), s=rep)
    if isinstance(where, jax.sharding.Sharding):
        return dict(w=where, a=None, b=None, s=None)
    return dict(w=where, a=where, b=where, s=where)


def _moved(lora: BatchedLoraArray, put) -> BatchedLoraArray:
    """`lora` with `put(field_value, role)` applied to its weight, factors and
    scales (`role`: 'w', 'a', 'b' or 's')."""
    head, h, g = lora.head_scale, lora.in_scale, lora.out_scale
    return lora.replace(
        w=put(lora.w, "w"),
        a=put(lora.a, "a"),
        b=put(lora.b, "b"),
        scale=put(lora.scale, "s"),
        head_scale=None if head is None else put(head, "s"),
        # The variants' vectors are laid out as rank-1 factors: placed as those.
        in_scale=None if h is None else put(h, "a"),
        out_scale=None if g is None else put(g, "b"),
    )


@quax.register(device_put_p)
def _(*xs: BatchedLoraArray | ArrayLike, devices, srcs, copy_semantics):
    out = []
    for x, device, src, copy in zip(xs, devices, srcs, copy_semantics, strict=True):

        def put(v, role, device=device, src=src, copy=copy, x=x):
            where = _placements(x, device)[role] if device is not None else None
            if where is None and src is None:
                return v
            (moved,) = bind(
                device_put_p,
                v,
                devices=(where,),
                srcs=(src,),
                copy_semantics=(copy,),
            )
            return moved

        if isinstance(x, BatchedLoraArray):
            out.append(_moved(x, put))
        else:
            (moved,) = device_put_p.bind(
                x, devices=(device,), srcs=(src,), copy_semantics=(copy,)
            )
            out.append(moved)
    return out


@quax.register(sharding_constraint_p)
def _(x: BatchedLoraArray, *, sharding, **params):
    where = _placements(x, sharding)

    def put(v, role):
        if where[role] is None:
            return v
        return bind(sharding_constraint_p, v, sharding=where[role], **params)

    if params.get("unconstrained_dims") or params.get("layout") is not None:
        # Both speak of the weight's own axes; the factors' differ: w only.
        return x.replace(
            w=bind(sharding_constraint_p, x.w, sharding=sharding, **params)
        )
    return _moved(x, put)


@quax.register(name_p)
def _(x: BatchedLoraArray, *, name):
    return _moved(x, lambda v, role: bind(name_p, v, name=name))
