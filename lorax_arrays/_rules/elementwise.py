"""Dispatch rules for a weight scaled by a constant: `W * c`, `c * W`, `W / c`, `-W`.

Registers: `mul`, `div` (the weight as numerator), `neg`.

`(W + s·A B) * c` stays low rank when `c` is a scalar, or varies only along the
weight's out-axes (and stack axes), or only along its in-axes (and stack axes):

    (W + s·A B) * c  =  W * c  +  s·A (B * c)      c along out (and stack) axes
                     =  W * c  +  s·(A * c) B      c along in (and stack) axes
                     =  W * c  +  (s·c)·A B        c a scalar

JAX keeps the broadcasting of `W * v` in the primitive (`mul(W, v[None, None, :])`,
size-1 axes), so the rule sees along which axes the multiplier varies. A multiplier
that varies along both an in-axis and an out-axis (an elementwise product with a
full-size array, say) is not low rank: an error names the axes. The multiplier may
be traced or a NumPy constant (JAX's typed literals inside a `while_loop`), hence
the `ArrayLike` annotations. It becomes part of the frozen base: no gradient
reaches it (the adapters' gradients are those of the scaled weight).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jaxtyping import ArrayLike

from .._core.array import BatchedLoraArray, bind
from .._core.errors import UnsupportedOperationError


def _scaled(
    lora: BatchedLoraArray, c, primitive, what: str, params
) -> BatchedLoraArray:
    """`lora * c` (or `lora / c` for `div`) in low-rank form; `params` are the
    primitive's own (applied to the base weight)."""
    invert = primitive is lax.div_p
    shape = tuple(lora.shape)
    c_shape = tuple(np.shape(c))
    # The multiplier becomes part of the frozen base: no gradient reaches it
    # through either term (the base product reads `frozen_w` anyway).
    c = lax.stop_gradient(c)
    w = bind(primitive, lora.frozen_w, c, **params)
    if not c_shape or all(s == 1 for s in c_shape):  # a scalar
        c = jnp.reshape(jnp.asarray(c), ())
        factor = (1 / c) if invert else c
        fold = lambda s: (s * factor).astype(s.dtype)  # noqa: E731
        head = None if lora.head_scale is None else fold(lora.head_scale)
        return lora.replace(w=w, scale=fold(lora.scale), head_scale=head)
    if len(c_shape) != len(shape) or any(
        cs not in (1, ws) for cs, ws in zip(c_shape, shape)
    ):
        raise UnsupportedOperationError(
            f"`{primitive.name}` ({what}) of an adapted weight: a multiplier of "
            f"shape {c_shape} does not broadcast to the weight's shape {shape} "
            "without enlarging it."
        )
    varies = {ax for ax, (cs, ws) in enumerate(zip(c_shape, shape)) if cs == ws > 1}
    layout = lora.layout
    stack, ins, outs = set(layout.stack_axes), set(layout.in_axes), set(layout.out_axes)
    c = jnp.asarray(c)
    if varies <= stack | outs:  # into B: (*stack, n, r, *out)
        order = (*layout.stack_axes, *layout.out_axes, *layout.in_axes)
        c_b = _onto_factor(c, order, len(layout.stack_axes), len(outs), lora.b, True)
        b = (lora.b / c_b) if invert else (lora.b * c_b)
        return lora.replace(w=w, b=b.astype(lora.b.dtype))
    if varies <= stack | ins:  # into A: (*stack, n, *in, r)
        order = (*layout.stack_axes, *layout.in_axes, *layout.out_axes)
        c_a = _onto_factor(c, order, len(layout.stack_axes), len(ins), lora.a, False)
        a = (lora.a / c_a) if invert else (lora.a * c_a)
        return lora.replace(w=w, a=a.astype(lora.a.dtype))
    if lora.allow_materialise:  # opted in: dense per-example weights
        return BatchedLoraArray.default(primitive, (lora, c), params)
    both = sorted(varies - stack)
    raise UnsupportedOperationError(
        f"`{primitive.name}` ({what}) of an adapted weight: the multiplier (shape "
        f"{c_shape}) varies along axes {tuple(both)} "
        f"of the adapted weight (shape {shape}, in_axes={lora.in_axes}, "
        f"out_axes={lora.out_axes}), in-axes and out-axes both, so (W + AB) * c is "
        "not low rank. Scale the activations instead, or opt in to building dense "
        "per-example weights with `allow_materialise=True`."
    )


def _onto_factor(c, order, n_stack: int, n_group: int, factor, into_b: bool):
    """`c` (the weight's rank, size-1 where it does not vary) laid out on a factor:
    its stack axes, then a size-1 adapter axis, then (for B) a size-1 rank axis
    before its out axes, or (for A) its in axes and then a size-1 rank axis."""
    c = lax.transpose(c, order)  # (*stack, *group, *other: all 1)
    c = jnp.reshape(c, c.shape[: n_stack + n_group])
    if into_b:
        c = jnp.expand_dims(c, (n_stack, n_stack + 1))
    else:
        c = jnp.expand_dims(c, (n_stack, c.ndim + 1))
    return c.astype(factor.dtype)


@quax.register(lax.mul_p)
def _(x: BatchedLoraArray, y: ArrayLike, **params) -> BatchedLoraArray:
    return _scaled(x, y, lax.mul_p, "W * c", params)


@quax.register(lax.mul_p)
def _(x: ArrayLike, y: BatchedLoraArray, **params) -> BatchedLoraArray:
    return _scaled(y, x, lax.mul_p, "c * W", params)


@quax.register(lax.div_p)
def _(x: BatchedLoraArray, y: ArrayLike, **params) -> BatchedLoraArray:
    return _scaled(x, y, lax.div_p, "W / c", params)


@quax.register(lax.neg_p)
def _(x: BatchedLoraArray, **params) -> BatchedLoraArray:
    neg = lambda s: -s  # noqa: E731
    head = None if x.head_scale is None else neg(x.head_scale)
    w = bind(lax.neg_p, x.frozen_w, **params)
    return x.replace(w=w, scale=neg(x.scale), head_scale=head)
