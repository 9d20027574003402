"""Dispatch rules for `dot_general` (`@`, `jnp.dot`, `jnp.matmul`, `jnp.einsum`).

Registers: `dot_general` (a BatchedLoraArray on either side, or on both: an error).

The rewrite `x · (W + s·AB)  ->  x · W + s · ((x · A[i]) · B[i])`: the array's
`Layout` says whether the contraction reads its in-axes (the product) or its
out-axes (a tied head, read the other way round), and gives the permutations to the
canonical problem of `_strategies.py`; `_indices.align_indices` lines the adapter
indices up with the activation's leading free axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import quax
from jax import lax
from jaxtyping import ArrayLike

from . import _lax
from ._array import BatchedLoraArray, bind, materialise_per_example, swap_in_out
from ._errors import UnsupportedOperationError
from ._indices import align_indices, clamp_indices, gathered_scale, require_indices
from ._strategies import low_rank, resolve


def _compute_dtype(x, params):
    pref = params.get("preferred_element_type")
    x_dtype = jax.dtypes.result_type(x) if not isinstance(x, quax.Value) else x.dtype
    if jnp.issubdtype(x_dtype, jnp.inexact):
        return x_dtype, pref
    return jnp.float32, pref


def lora_dot(
    lora: BatchedLoraArray, x: Any, dimension_numbers, lora_is_lhs: bool, params
):
    """`dot_general` with a BatchedLoraArray on one side, in low-rank form."""
    (lc, rc), (lb, rb) = dimension_numbers
    c_l, c_x, b_l, b_x = (lc, rc, lb, rb) if lora_is_lhs else (rc, lc, rb, lb)
    c_l, c_x, b_l, b_x = map(tuple, (c_l, c_x, b_l, b_x))
    w = lora.frozen_w
    lhs, rhs = (w, x) if lora_is_lhs else (x, w)

    reads = lora.layout.contracts(c_l, b_l)
    if reads == "out":
        # Contracting the output group (a tied head, `h @ E.T`): still low rank.
        return lora_dot(swap_in_out(lora), x, dimension_numbers, lora_is_lhs, params)
    if reads is None:
        if lora.allow_materialise:
            return _materialised_dot(lora, x, dimension_numbers, lora_is_lhs, params)
        raise UnsupportedOperationError(_layout_message(lora, c_l, b_l))
    x_shape = tuple(x.shape)
    x_free = [d for d in range(len(x_shape)) if d not in c_x and d not in b_x]
    # The indices, reshaped row-major onto the free axes of x they cover (the
    # leading ones unless the array's `batch_axis` says otherwise); those axes
    # go first in the low-rank term.
    idx, lead, start = _aligned_indices(lora, x_shape, x_free)
    stop = start + len(lead)
    x_free = x_free[start:stop] + x_free[:start] + x_free[stop:]

    base = bind(
        lax.dot_general_p, lhs, rhs, dimension_numbers=dimension_numbers, **params
    )
    delta = _low_rank_term(
        lora, x, idx, lead, c_l, c_x, b_l, b_x, x_free, lora_is_lhs, params
    )
    if isinstance(base, quax.Value):
        return quax.quaxify(jnp.add)(base, delta.astype(base.dtype))
    return base + delta.astype(base.dtype)


def _aligned_indices(lora, x_shape, x_free):
    """The indices reshaped onto the free axes of `x` they stand for, those axes'
    shape, and the position of the first among `x_free`."""
    free_shape = tuple(x_shape[d] for d in x_free)
    what = (
        f"the activation (shape {x_shape}) multiplying the BatchedLoraArray with "
        f"weight shape {tuple(lora.shape)}"
    )
    return align_indices(require_indices(lora), free_shape, what, lora.batch_axis)


def _low_rank_term(lora, x, idx, lead, c_l, c_x, b_l, b_x, x_free, lora_is_lhs, params):
    """`s · ((x · A[i]) · B[i])`, laid out as `dot_general(lhs, rhs)` would be.

    `idx` has the shape `lead` of the first axes of `x_free` (the indexed ones,
    put first by the caller). The product is brought to the canonical problem of
    `_strategies` (x as `(S, G, R, d_in)`), computed by the chosen strategy, and
    laid back out.

    Stack axes that are free in the product (a fused QKV kernel) join the stack
    groups: `S` is the batch stack groups times the free stack entries `F`, and x
    (which has no such axis) is broadcast over the `F` entries, one copy each. The
    flops are those of `F` separate adapted products, no more; the copy is `F`
    times x, which the base product outgrows (it writes `F · d_out` per token).
    """
    dtype, pref = _compute_dtype(x, params)
    precision = params.get("precision")
    k = len(lead)
    x_shape = tuple(x.shape)
    layout = lora.layout
    x_perm, stack_perm, out_perm = layout.dot_perms(
        c_l, c_x, b_l, b_x, x_free, lora_is_lhs
    )
    batch_shape = tuple(x_shape[d] for d in b_x)
    free_stack_shape = tuple(lora.shape[ax] for ax in layout.free_stack_axes(b_l))
    rest_shape = tuple(x_shape[d] for d in x_free[k:])
    out_shape = layout.out_shape(lora.shape)
    s_x, f_ = math.prod(batch_shape), math.prod(free_stack_shape)
    sizes = (
        s_x * f_,
        math.prod(lead),
        math.prod(rest_shape),
        math.prod(layout.in_shape(lora.shape)),
        math.prod(out_shape),
        lora.n_adapters,
        lora.rank,
    )
    operands = {"x": x_shape, "w": tuple(lora.shape)}
    strategy = resolve(lora.strategy, sizes, operands=operands)
    # The factors' stack axes: the batch ones in the order of the batch axes, then
    # the free ones.
    a, b = layout.stack_ordered(lora.a, lora.b, stack_perm)
    s_, g, r_tok, d_in, d_out, n, rank = sizes

    def term(x, a, b, idx, scale):
        x3 = _lax.reshape(_lax.transpose(x, x_perm), (s_x, g, r_tok, d_in))
        if f_ > 1:  # one copy of x per entry of the free stack axes
            x3 = lax.broadcast_in_dim(x3, (s_x, f_, g, r_tok, d_in), (0, 2, 3, 4))
        x3 = _lax.reshape(x3, (s_, g, r_tok, d_in))
        a3 = _lax.convert(_lax.reshape(a, (s_, n, d_in, rank)), dtype)
        b3 = _lax.convert(_lax.reshape(b, (s_, n, rank, d_out)), dtype)
        safe = clamp_indices(idx, n)
        s = _lax.reshape(gathered_scale(scale, idx), (g,))
        ids = _lax.reshape(safe, (g,))
        u = low_rank(strategy, x3, a3, b3, ids, s, precision=precision, pref=pref)
        shape = (*batch_shape, *free_stack_shape, *lead, *rest_shape, *out_shape)
        return _lax.reshape(u, shape)

    if isinstance(x, quax.Value):
        term = quax.quaxify(term)
    # (*batch, *free stack, *x_free, *out in `out_axes` order)
    u = term(x, a, b, idx, lora.scale)
    return _lax.transpose(u, out_perm)  # dot_general's (batch, lhs free, rhs free)


def _materialised_dot(lora, x, dimension_numbers, lora_is_lhs, params):
    """Opt-in fallback: a dense weight per example, contracted example by example."""
    (lc, rc), (lb, rb) = dimension_numbers
    c_x, b_x = (rc, rb) if lora_is_lhs else (lc, lb)
    x_free = [d for d in range(x.ndim) if d not in c_x and d not in b_x]
    idx, lead_shape, start = _aligned_indices(lora, tuple(x.shape), x_free)
    k = len(lead_shape)
    w_e = materialise_per_example(lora, idx)  # (*lead_shape, *w.shape)
    if k == 0:
        lhs, rhs = (w_e, x) if lora_is_lhs else (x, w_e)
        return lax.dot_general(lhs, rhs, dimension_numbers, **params)
    lead = x_free[start : start + k]
    # Make the indexed axes batch dimensions on both sides.
    w_batch = tuple(range(k))
    shift = lambda dims: tuple(d + k for d in dims)  # noqa: E731
    if lora_is_lhs:
        dn = ((shift(lc), rc), (w_batch + shift(lb), tuple(lead) + tuple(rb)))
        out = lax.dot_general(w_e, x, dn, **params)
    else:
        dn = ((lc, shift(rc)), (tuple(lead) + tuple(lb), w_batch + shift(rb)))
        out = lax.dot_general(x, w_e, dn, **params)
    # out: (*I, *batch, *lhs free (minus I), *rhs free (minus I)); put I back where
    # dot_general(x, W) would have them: at `start` among x's free axes.
    nb = len(lb)
    if lora_is_lhs:
        n_wfree = len(lora.shape) - len(lc) - len(lb)
        dest = nb + n_wfree + start
    else:
        dest = nb + start
    return jnp.moveaxis(out, tuple(range(k)), tuple(range(dest, dest + k)))


def _layout_message(lora, c_l, b_l) -> str:
    return (
        f"dot_general contracts axes {tuple(c_l)} (batch axes {tuple(b_l)}) of a "
        f"BatchedLoraArray with weight shape {lora.shape}, but its layout is "
        f"in_axes={lora.in_axes}, out_axes={lora.out_axes}, "
        f"stack_axes={lora.stack_axes}. The low-rank rewrite needs the contraction "
        "to be exactly over the in-axes (or exactly over the out-axes), and every "
        "batch axis to be a stack axis (a stack axis may also stay free: a fused "
        "kernel, each entry its own adapter). If the layout is wrong, fix "
        "`in_axes`/`out_axes`/`stack_axes` in the LoraRule; to build the dense "
        "per-example weight for this product instead, pass "
        "`allow_materialise=True`."
    )


@quax.register(lax.dot_general_p)
def _(
    lhs: BatchedLoraArray, rhs: ArrayLike | quax.ArrayValue, *, dimension_numbers, **p
):
    return lora_dot(lhs, rhs, dimension_numbers, True, p)


@quax.register(lax.dot_general_p)
def _(
    lhs: ArrayLike | quax.ArrayValue, rhs: BatchedLoraArray, *, dimension_numbers, **p
):
    return lora_dot(rhs, lhs, dimension_numbers, False, p)


@quax.register(lax.dot_general_p)
def _(lhs: BatchedLoraArray, rhs: BatchedLoraArray, *, dimension_numbers, **p):
    raise UnsupportedOperationError(
        "dot_general between two BatchedLoraArrays (a product of two adapted "
        "weights) has no low-rank rule. Multiply activations by adapted weights, "
        "not weights by each other."
    )
