"""Dispatch rules for higher-order primitives that must keep the low-rank form.

Registers: `scan` (above quax's own rule), `while` (above quax's own rule, for
a carry with row positions), `checkpoint` (`remat`). `custom_vjp` is
not a rule but a method of quax's trace: `quax_compat.py`. `jit`, `cond`, `while`,
`custom_jvp` are quax's own rules.

- `scan` over a layer stack: quax's own rule slices *every* leaf of a value on the
  scanned axis, which would slice the per-example indices and the per-adapter
  scales. Here only `w`, `a` and `b` are sliced; `indices` and `scale` are shared
  by every step.
- `checkpoint` / `remat`: quax has no rule (its default would materialise); we
  re-trace the body under `jax.checkpoint` with the LoRA arrays kept intact.
- A BatchedLoraArray that a body returns (`nnx.scan` and `nnx.remat` hand the
  module's state back out): the same array when it is an input passed through
  unchanged, otherwise (scan) one stacked array with a new leading stack axis.

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

from .._core.array import BatchedLoraArray
from .._core.errors import CarryLostRowsError, UnsupportedOperationError
from .._core.rows import RowIds, live, reduce_positions, untag
from .quax_compat import (
    quax_default_process,
    remat_p,
    scan_quax,
    unpack_scan_args,
    while_quax,
)


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
    step, a, b = lora.layout.scan_step(lora.a, lora.b)
    j = lora.stack_axes.index(0)
    # The variants' vectors are laid out as factors: sliced like them.
    names = [n for n in ("in_scale", "out_scale") if getattr(lora, n) is not None]
    vectors = [jnp.moveaxis(getattr(lora, n), j, 0) for n in names]

    def rebuild(w, a, b, *vs):
        return lora.replace(w=w, a=a, b=b, layout=step, **dict(zip(names, vs)))

    return (lora.frozen_w, a, b, *vectors), rebuild


@quax.register(lax.scan_p, precedence=1)
def _scan(*args: BatchedLoraArray | quax.ArrayValue | ArrayLike, jaxpr, **params):
    consts, carry, xs = unpack_scan_args(args, {**params, "jaxpr": jaxpr})
    rows = any(live(c) for c in carry)
    if not rows and not any(_stacked(x) for x in xs):
        return scan_quax(*args, jaxpr=jaxpr, **params)
    return _until_carry_settles(
        lambda carry: _scan_body(consts, carry, xs, jaxpr, params), carry
    )


def _until_carry_settles(run, carry):
    """`run(carry)` (a loop): a carry with its rows' positions (a hidden state
    through a scanned stack of layers, a decode loop) keeps them only if the
    body returns them, so the loop is run again with the carries whose positions
    the body loses made plain."""
    carry = list(carry)
    while True:
        try:
            return run(carry)
        except CarryLostRowsError as lost:
            carry[lost.k] = untag(carry[lost.k])


def _settle_carry(k: int, before: Any, after: Any) -> Any:
    """The body's carry `after` in the type of `before`: row positions laid out as
    they came in (reduced where they came in constant, `MIXED` where they then
    differ), dropped where they came in untagged."""
    if not live(before):
        return untag(after)
    if not live(after) or after.space != before.space:
        raise CarryLostRowsError(k)
    axes = [d for d in range(after.pos.ndim) if before.pos.shape[d] == 1]
    pos = reduce_positions(after.pos, axes)
    pos = jnp.broadcast_to(jnp.expand_dims(pos, axes), before.pos.shape)
    return RowIds(after.array, pos, before.space)


@quax.register(lax.while_p, precedence=1)
def _while(
    *args: BatchedLoraArray | quax.ArrayValue | ArrayLike,
    cond_nconsts,
    cond_jaxpr,
    body_nconsts,
    body_jaxpr,
):
    """`lax.while_loop` whose carry holds row positions (a decode loop over a
    per-row MoE model): the positions laid out as they came in at each step
    (`_settle_carry`), a carry whose positions the body loses made plain. Any
    other loop: quax's own rule."""
    params = dict(
        cond_nconsts=cond_nconsts,
        cond_jaxpr=cond_jaxpr,
        body_nconsts=body_nconsts,
        body_jaxpr=body_jaxpr,
    )
    end = cond_nconsts + body_nconsts
    cond_consts, body_consts = args[:cond_nconsts], args[cond_nconsts:end]
    init = args[end:]
    others = [c for c in init if isinstance(c, quax.Value) and not live(c)]
    if not any(live(c) for c in init) or others:
        return while_quax(*args, **params)
    cond_fn = quax.quaxify(jexc.jaxpr_as_fun(cond_jaxpr))
    body_fn = quax.quaxify(jexc.jaxpr_as_fun(body_jaxpr))

    def cond(carry):
        return untag(cond_fn(*cond_consts, *carry)[0])

    def body(carry):
        out = body_fn(*body_consts, *carry)
        return [_settle_carry(k, c, o) for k, (c, o) in enumerate(zip(carry, out))]

    return _until_carry_settles(lambda carry: lax.while_loop(cond, body, carry), init)


def _scan_body(consts, carry, xs, jaxpr, params):
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

    # What each output of the body that is a BatchedLoraArray becomes after the
    # loop, filled in while the body is traced.
    stacked_ys: dict[int, Any] = {}

    def body(carry, xs_step):
        step = [r(*x) if r else x for r, x in zip(rebuilders, xs_step)]
        out = quax.quaxify(fn)(*consts, *carry, *step)
        new_carry = [_settle_carry(k, c, o) for k, (c, o) in enumerate(zip(carry, out))]
        ys = list(out[n_carry:])
        for k, y in enumerate(ys):
            if _stacked(y):
                ys[k], stacked_ys[k] = _scan_output(y, step, xs, consts, carry)
        return new_carry, ys

    carry_out, ys = lax.scan(
        body,
        list(carry),
        xs_in,
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
        _split_transpose=params.get("_split_transpose", False),
    )
    ys = [stacked_ys[k](y) if k in stacked_ys else y for k, y in enumerate(ys)]
    return [*carry_out, *ys]


def _scan_output(y: BatchedLoraArray, step: list, xs: list, consts: list, carry: list):
    """A BatchedLoraArray that a scan body returns per step (`nnx.scan` hands the
    scanned layers' state back this way): what the body emits in its place, and how
    the stacked result becomes one array with a new leading stack axis.

    `lax.scan` would stack every leaf, `scale` and `indices` too, under the static
    layout of one step. A step's own layer, returned as it is, is the scanned input
    again, so nothing is emitted and the input is the result. Otherwise `w`, `a`
    and `b` are stacked and the layout gains axis 0 as a stack axis; the scales and
    indices must be the loop's own (not computed in it), as they are shared by
    every step."""
    for x_step, x in zip(step, xs):
        if y is x_step:
            return None, lambda _, x=x: x
    shared = [
        v
        for arr in (*consts, *carry, *xs)
        if _stacked(arr)
        for v in (arr.scale, arr.indices)
    ]
    if y.has_variants:
        raise UnsupportedOperationError(
            "A lax.scan body returns a BatchedLoraArray with DoRA or IA3 vectors "
            "that is not the layer it was given; stacking such arrays back is not "
            "supported. Return the per-step result of using the array instead."
        )
    if not all(any(v is u for u in shared) for v in (y.scale, y.indices)):
        raise UnsupportedOperationError(
            "A lax.scan body returns a BatchedLoraArray whose scales or adapter "
            "indices are computed inside the loop; a stacked BatchedLoraArray has one "
            "set for all layers. Return the per-step result of using the array "
            "instead, or set the indices outside the loop."
        )

    def rebuild(wab):
        w, a, b = wab
        return y.replace(w=w, a=a, b=b, layout=y.layout.stacked())

    return (y.w, y.a, y.b), rebuild


@quax.register(remat_p)
def _remat(*args: BatchedLoraArray | quax.ArrayValue | ArrayLike, **params):
    if not any(isinstance(x, (BatchedLoraArray, RowIds)) for x in args):
        return quax_default_process(remat_p, args, params)
    fn = quax.quaxify(jexc.jaxpr_as_fun(jexc.ClosedJaxpr(params["jaxpr"], ())))
    # An input handed back as it is (`nnx.remat` returns the module's state) is
    # returned as the input itself, not rebuilt from the checkpoint's outputs:
    # a `lax.scan` around it can then see that a layer came back unchanged.
    passed: dict[int, int] = {}

    def body(*inner):
        out = list(fn(*inner))
        for k, y in enumerate(out):
            j = next((j for j, x in enumerate(inner) if _stacked(y) and y is x), None)
            if j is not None:
                passed[k], out[k] = j, None
        return out

    remat = jax.checkpoint(
        body, prevent_cse=params["prevent_cse"], policy=params["policy"]
    )
    # Frozen before the checkpoint, so no cotangent for `w` is formed inside it.
    frozen = lambda x: x.replace(w=x.frozen_w) if _stacked(x) else x  # noqa: E731
    out = remat(*map(frozen, args))
    return [args[passed[k]] if k in passed else y for k, y in enumerate(out)]
