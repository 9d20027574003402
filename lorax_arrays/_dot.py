"""The `dot_general` rewrite: `x · (W + s·AB)  ->  x · W + s · ((x · A[i]) · B[i])`."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import quax
from jax import lax
from jaxtyping import ArrayLike

from . import _lax
from ._array import (
    BatchedLoraArray,
    UnsetIndicesError,
    bind,
    gathered_scale,
    materialise_per_example,
    swap_in_out,
)
from ._errors import IndicesShapeError, UnsupportedOperationError
from ._lax import clamp_indices
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

    stack_ok = set(b_l) == set(lora.stack_axes)
    if stack_ok and set(c_l) == set(lora.out_axes):
        # Contracting the output group (a tied head, `h @ E.T`): still low rank.
        return lora_dot(swap_in_out(lora), x, dimension_numbers, lora_is_lhs, params)
    if not (stack_ok and set(c_l) == set(lora.in_axes)):
        if lora.allow_materialise:
            return _materialised_dot(lora, x, dimension_numbers, lora_is_lhs, params)
        raise UnsupportedOperationError(_layout_message(lora, c_l, b_l))
    if lora.indices is None:
        raise UnsetIndicesError.for_array(lora)

    idx = lora.indices
    k = idx.ndim
    x_shape = tuple(x.shape)
    x_free = [d for d in range(len(x_shape)) if d not in c_x and d not in b_x]
    lead = tuple(x_shape[d] for d in x_free[:k])
    if lead != tuple(idx.shape):
        raise IndicesShapeError(_indices_message(lora, x_shape, x_free, idx.shape))

    base = bind(
        lax.dot_general_p, lhs, rhs, dimension_numbers=dimension_numbers, **params
    )
    delta = _low_rank_term(lora, x, c_l, c_x, b_l, b_x, x_free, lora_is_lhs, params)
    if isinstance(base, quax.Value):
        return quax.quaxify(jnp.add)(base, delta.astype(base.dtype))
    return base + delta.astype(base.dtype)


def _low_rank_term(lora, x, c_l, c_x, b_l, b_x, x_free, lora_is_lhs, params):
    """`s · ((x · A[i]) · B[i])`, laid out as `dot_general(lhs, rhs)` would be.

    The product is brought to the canonical problem of `_strategies` (x as
    `(S, G, R, d_in)`), computed by the chosen strategy, and laid back out.
    """
    dtype, pref = _compute_dtype(x, params)
    precision = params.get("precision")
    idx = lora.indices
    k = idx.ndim
    nb = len(b_l)
    x_shape = tuple(x.shape)
    # x as (batch (paired with stack axes), indexed, rest, in-axes in `in_axes` order)
    x_in = [c_x[c_l.index(ax)] for ax in lora.in_axes]
    x_perm = [*b_x, *x_free, *x_in]
    batch_shape = tuple(x_shape[d] for d in b_x)
    rest_shape = tuple(x_shape[d] for d in x_free[k:])
    out_shape = tuple(lora.shape[ax] for ax in lora.out_axes)
    sizes = (
        math.prod(batch_shape),
        math.prod(idx.shape),
        math.prod(rest_shape),
        math.prod(lora.shape[ax] for ax in lora.in_axes),
        math.prod(out_shape),
        lora.n_adapters,
        lora.rank,
    )
    strategy = resolve(lora.strategy, sizes)
    # The factors with their stack axes in the order of the batch axes.
    ns = len(lora.stack_axes)
    stack_perm = [lora.stack_axes.index(ax) for ax in b_l]
    a = _lax.transpose(lora.a, [*stack_perm, *range(ns, lora.a.ndim)])
    b = _lax.transpose(lora.b, [*stack_perm, *range(ns, lora.b.ndim)])
    s_, g, r_tok, d_in, d_out, n, rank = sizes

    def term(x, a, b, idx, scale):
        x3 = _lax.reshape(_lax.transpose(x, x_perm), (s_, g, r_tok, d_in))
        a3 = _lax.convert(_lax.reshape(a, (s_, n, d_in, rank)), dtype)
        b3 = _lax.convert(_lax.reshape(b, (s_, n, rank, d_out)), dtype)
        safe = clamp_indices(idx, n)
        s = _lax.reshape(gathered_scale(scale, idx, safe), (g,))
        ids = _lax.reshape(safe, (g,))
        u = low_rank(strategy, x3, a3, b3, ids, s, precision=precision, pref=pref)
        return _lax.reshape(u, (*batch_shape, *idx.shape, *rest_shape, *out_shape))

    if isinstance(x, quax.Value):
        term = quax.quaxify(term)
    u = term(x, a, b, idx, lora.scale)  # (*batch, *x_free, *out in `out_axes` order)

    # dot_general's layout: (*batch, *lhs free, *rhs free); lora's free axes are
    # its out axes in increasing order.
    n_xf = len(x_free)
    out_sorted = sorted(lora.out_axes)
    perm_out = [nb + n_xf + lora.out_axes.index(ax) for ax in out_sorted]
    batch_part = list(range(nb))
    x_part = list(range(nb, nb + n_xf))
    perm = batch_part + (perm_out + x_part if lora_is_lhs else x_part + perm_out)
    return _lax.transpose(u, perm)


def _materialised_dot(lora, x, dimension_numbers, lora_is_lhs, params):
    """Opt-in fallback: a dense weight per example, contracted example by example."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lora.indices is None:
        raise UnsetIndicesError.for_array(lora)
    k = lora.indices.ndim
    w_e = materialise_per_example(lora)  # (*I, *w.shape)
    if k == 0:
        lhs, rhs = (w_e, x) if lora_is_lhs else (x, w_e)
        return lax.dot_general(lhs, rhs, dimension_numbers, **params)
    c_x, b_x = (rc, rb) if lora_is_lhs else (lc, lb)
    x_free = [d for d in range(x.ndim) if d not in c_x and d not in b_x]
    lead = x_free[:k]
    if tuple(x.shape[d] for d in lead) != tuple(lora.indices.shape):
        raise IndicesShapeError(
            _indices_message(lora, tuple(x.shape), x_free, lora.indices.shape)
        )
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
    # dot_general(x, W) would have them: first among x's free axes.
    nb = len(lb)
    if lora_is_lhs:
        n_wfree = len(lora.shape) - len(lc) - len(lb)
        dest = nb + n_wfree
    else:
        dest = nb
    return jnp.moveaxis(out, tuple(range(k)), tuple(range(dest, dest + k)))


def _layout_message(lora, c_l, b_l) -> str:
    return (
        f"dot_general contracts axes {tuple(c_l)} (batch axes {tuple(b_l)}) of a "
        f"BatchedLoraArray with weight shape {lora.shape}, but its layout is "
        f"in_axes={lora.in_axes}, out_axes={lora.out_axes}, "
        f"stack_axes={lora.stack_axes}. The low-rank rewrite needs the contraction "
        "to be exactly over the in-axes (or exactly over the out-axes), with every "
        "stack axis a batch axis. If the "
        "layout is wrong, fix `in_axes`/`out_axes` in the LoraRule; to build the "
        "dense per-example weight for this product instead, pass "
        "`allow_materialise=True`."
    )


def _indices_message(lora, x_shape, x_free, idx_shape) -> str:
    free_shape = tuple(x_shape[d] for d in x_free)
    return (
        f"The adapter indices have shape {tuple(idx_shape)}, but the activation "
        f"(shape {x_shape}) multiplying the BatchedLoraArray with weight shape "
        f"{lora.shape} has free axes {free_shape}, whose leading "
        f"{len(idx_shape)} must equal the indices' shape. If the model flattens "
        "batch and sequence into one axis (B*T), give per-token indices of that "
        "shape, e.g. `lx.with_indices(tree, jnp.repeat(indices, T))`; if it runs "
        "per example under `jax.vmap`, set scalar indices inside the vmapped "
        "function (`lx.with_indices(model, index)`)."
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
