"""Higher-order primitives that must keep the low-rank form.

- `scan` over a layer stack: quax's own rule slices *every* leaf of a value on the
  scanned axis, which would slice the per-example indices and the per-adapter
  scales. Here only `w`, `a` and `b` are sliced; `indices` and `scale` are shared
  by every step.
- `checkpoint` / `remat`: quax has no rule (its default would materialise); we
  re-trace the body under `jax.checkpoint` with the LoRA arrays kept intact.

Both pass the base weight on frozen (`BatchedLoraArray.frozen_w`), as every rule
reads it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core as jexc
import jax.numpy as jnp
import quax
from jax import lax
from jaxtyping import ArrayLike

from ._array import BatchedLoraArray
from ._compat import quax_default_process, remat_p, scan_quax, unpack_scan_args
from ._errors import UnsupportedOperationError


def _stacked(x: Any) -> bool:
    return isinstance(x, BatchedLoraArray)


def _split_for_scan(lora: BatchedLoraArray):
    """What scan slices (w, a, b with the scanned stack axis leading), and how to
    rebuild one step's array."""
    if 0 not in lora.stack_axes:
        raise UnsupportedOperationError(
            f"lax.scan slices axis 0 of a BatchedLoraArray (weight shape "
            f"{lora.shape}), but that axis is not a stack axis (stack_axes="
            f"{lora.stack_axes}). Scan over a layer-stack axis: give it in "
            "`stack_axes` (LoraRule(..., stack_axes=(0,)))."
        )
    j = lora.stack_axes.index(0)
    sliced = (lora.frozen_w, jnp.moveaxis(lora.a, j, 0), jnp.moveaxis(lora.b, j, 0))
    down = lambda axes: tuple(ax - 1 for ax in axes if ax != 0)  # noqa: E731

    def rebuild(w, a, b):
        return lora.replace(
            w=w,
            a=a,
            b=b,
            in_axes=down(lora.in_axes),
            out_axes=down(lora.out_axes),
            stack_axes=down(lora.stack_axes),
        )

    return sliced, rebuild


@quax.register(lax.scan_p, precedence=1)
def _scan(*args: BatchedLoraArray | quax.ArrayValue | ArrayLike, jaxpr, **params):
    consts, carry, xs = unpack_scan_args(args, {**params, "jaxpr": jaxpr})
    if not any(_stacked(x) for x in xs):
        return scan_quax(*args, jaxpr=jaxpr, **params)
    fn = jexc.jaxpr_as_fun(jaxpr)
    n_carry = len(carry)
    xs_in, rebuilders = [], []
    for x in xs:
        if _stacked(x):
            sliced, rebuild = _split_for_scan(x)
            xs_in.append(sliced)
            rebuilders.append(rebuild)
        else:
            xs_in.append(x)
            rebuilders.append(None)

    def body(carry, xs_step):
        step = [r(*x) if r else x for r, x in zip(rebuilders, xs_step)]
        out = quax.quaxify(fn)(*consts, *carry, *step)
        return list(out[:n_carry]), list(out[n_carry:])

    carry_out, ys = lax.scan(
        body,
        list(carry),
        xs_in,
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
        _split_transpose=params.get("_split_transpose", False),
    )
    return [*carry_out, *ys]


@quax.register(remat_p)
def _remat(*args: BatchedLoraArray | quax.ArrayValue | ArrayLike, **params):
    if not any(isinstance(x, BatchedLoraArray) for x in args):
        return quax_default_process(remat_p, args, params)
    fn = quax.quaxify(jexc.jaxpr_as_fun(jexc.ClosedJaxpr(params["jaxpr"], ())))
    remat = jax.checkpoint(
        lambda *a: fn(*a), prevent_cse=params["prevent_cse"], policy=params["policy"]
    )
    # Frozen before the checkpoint, so no cotangent for `w` is formed inside it.
    frozen = lambda x: x.replace(w=x.frozen_w) if _stacked(x) else x  # noqa: E731
    return remat(*map(frozen, args))
