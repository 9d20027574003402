"""Dispatch rules for `dot_general` (`@`, `jnp.dot`, `jnp.matmul`, `jnp.einsum`).

Registers: `dot_general` (a BatchedLoraArray on either side, or on both: an error).
The grouped matmul (`ragged_dot_general`) is in `ragged.py`.

The rewrite `x · (W + s·AB)  ->  x · W + s · ((x · A[i]) · B[i])`: the array's
`Layout` says whether the contraction reads its in-axes (the product) or its
out-axes (a tied head, read the other way round), and gives the permutations to the
canonical problem of `_rules/strategies.py`; `_indices.align_indices` lines the adapter
indices up with the activation's leading free axes.
"""

from __future__ import annotations

import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import quax
from jax import lax
from jaxtyping import ArrayLike

from .._core import lax as _lax
from .._core.array import (
    BatchedLoraArray,
    bind,
    materialise_per_example,
    per_example,
    swap_in_out,
)
from .._core.errors import UnsupportedOperationError
from .._core.indices import (
    align_indices,
    clamp_indices,
    gathered_scale,
    require_indices,
    scale_rows,
    zero_base_rows,
)
from .._core.layout import broadcast_to_axes
from .strategies import low_rank, resolve


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
    if lora.has_variants and (reads != "in" or lora.layout.free_stack_axes(b_l)):
        raise UnsupportedOperationError(_variants_message(lora, c_l, b_l))
    if reads == "out":
        # Contracting the output group (a tied head, `h @ E.T`): still low rank.
        return lora_dot(swap_in_out(lora), x, dimension_numbers, lora_is_lhs, params)
    if reads is None:
        out = _partial_group_dot(lora, x, dimension_numbers, lora_is_lhs, params)
        if out is not None:
            return out
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

    if lora.in_scale is not None:  # IA3 on the input: x ⊙ h, per row
        h = per_example(lora, lora.in_scale[..., 0], idx)  # (*stack, *lead, *in)
        dims = (
            [b_x[b_l.index(ax)] for ax in lora.stack_axes]
            + list(x_free[: len(lead)])
            + [c_x[c_l.index(ax)] for ax in lora.in_axes]
        )
        x = _multiply(x, broadcast_to_axes(h, dims, len(x_shape)))
        lhs, rhs = (w, x) if lora_is_lhs else (x, w)
    base = bind(
        lax.dot_general_p, lhs, rhs, dimension_numbers=dimension_numbers, **params
    )
    if lora.rank == 0:  # IA3 alone: no low-rank term
        out = base
    else:
        delta = _low_rank_term(
            lora, x, idx, lead, c_l, c_x, b_l, b_x, x_free, lora_is_lhs, params
        )
        out = _add(base, delta)
    if lora.out_scale is not None:  # IA3 on the output, DoRA's m / ‖W + sAB‖
        ns = lora.layout.n_stack
        g = per_example(lora, jnp.squeeze(lora.out_scale, ns + 1), idx)
        free = sorted(x_free)
        n_w_free = len(lora.out_axes)
        x_at = len(b_l) + (n_w_free if lora_is_lhs else 0)
        w_at = len(b_l) + (0 if lora_is_lhs else len(free))
        out_axes_sorted = sorted(lora.out_axes)
        dims = (
            [b_l.index(ax) for ax in lora.stack_axes]
            + [x_at + free.index(d) for d in x_free[: len(lead)]]
            + [w_at + out_axes_sorted.index(ax) for ax in lora.out_axes]
        )
        out = _multiply(out, broadcast_to_axes(g, dims, out.ndim))
    return out


def _multiply(y, v):
    if isinstance(y, quax.Value):
        return quax.quaxify(jnp.multiply)(y, v.astype(y.dtype))
    return y * v.astype(y.dtype)


def _add(base, delta):
    """`base + delta`, `base` perhaps a quax value (a quantised product)."""
    if isinstance(base, quax.Value):
        return quax.quaxify(jnp.add)(base, delta.astype(base.dtype))
    return base + delta.astype(base.dtype)


def _variants_message(lora, c_l, b_l) -> str:
    return (
        f"dot_general contracts axes {c_l} (batch axes {b_l}) of a BatchedLoraArray "
        f"with weight shape {lora.shape} (in_axes={lora.in_axes}, out_axes="
        f"{lora.out_axes}, stack_axes={lora.stack_axes}) whose adapters include "
        "DoRA or IA3 vectors. Those are served in the product `x @ W` over the "
        "in-axes, with every stack axis a batch axis; read another way (a tied "
        "head `h @ E.T`, a fused kernel's free stack axis, a partial contraction) "
        "they are not supported yet. Serve plain LoRA adapters on this leaf, or "
        "ask for it."
    )


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
    explicit = _lax.explicit_spec(x) is not None or (
        _lax.explicit_spec(idx) is not None
    )
    strategy = resolve(lora.strategy, sizes, operands=operands, explicit=explicit)
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


def _partial_group_dot(lora, x, dimension_numbers, lora_is_lhs, params):
    """A product that contracts part of one axis group and batches over the rest
    of it, and may batch over axes of the other group too: DeepSeek's absorbed MLA,
    `einsum("bshd,chd->bshc", q, wkv_b)` with `wkv_b: (c, h, d)`, `in_axes=(0,)`,
    `out_axes=(1, 2)` (contracts the out-axis `d`, the out-axis `h` a batch axis),
    and `einsum("bshc,chd->bshd")` (contracts the in-axis `c`, `h` a batch axis).
    `None` when the product is not of that form.

    Still low rank: with the contracted group's factor `a` (`(*in, r)`, or `b`
    read the other way round) and the other one `b`,

        Σ_C x (W + s·a b)  =  Σ_C x W  +  s · Σ_r (Σ_C x a) b,

    where the batch axes of the contracted group stay batch axes of `Σ_C x a`
    (`a` has them), and the other group's batch axes are free axes of x there and
    batch axes of the product with `b`. Each example's factors are gathered
    (`a[idx]`, `b[idx]`, the guarded scale folded into `b`): `(*indices, *in, r)`,
    never a dense weight per example. Stack axes may be batch axes or free.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    c_w, c_x, b_w, b_x = (lc, rc, lb, rb) if lora_is_lhs else (rc, lc, rb, lb)
    c_w, c_x, b_w, b_x = map(tuple, (c_w, c_x, b_w, b_x))
    layout = lora.layout
    if not c_w or set(c_w) & set(layout.stack_axes):
        return None
    if set(c_w) <= set(layout.in_axes):
        view = lora
    elif set(c_w) <= set(layout.out_axes):
        view = swap_in_out(lora)  # the contracted group becomes the in-group
    else:
        return None
    lay = view.layout
    if not set(lay.in_axes) <= set(c_w) | set(b_w):
        return None  # an axis of the contracted group would stay free
    x_shape = tuple(x.shape)
    x_free = [d for d in range(len(x_shape)) if d not in c_x and d not in b_x]
    idx, lead, start = _aligned_indices(view, x_shape, x_free)
    lead_x = x_free[start : start + len(lead)]

    # One einsum letter per axis: x's own, then the weight's free axes, then the
    # indexed axes' (shared with x) and the rank.
    letters = iter(string.ascii_letters)
    x_sub = [next(letters) for _ in x_shape]
    w_sub = {}
    for dw, dx in (*zip(c_w, c_x), *zip(b_w, b_x)):
        w_sub[dw] = x_sub[dx]
    w_free = [d for d in range(view.ndim) if d not in w_sub]
    for d in w_free:
        w_sub[d] = next(letters)
    r = next(letters)
    lead_sub = [x_sub[d] for d in lead_x]
    stack_sub = [w_sub[ax] for ax in lay.stack_axes]
    a_sub = [*stack_sub, *lead_sub, *(w_sub[ax] for ax in lay.in_axes), r]
    b_sub = [*stack_sub, *lead_sub, r, *(w_sub[ax] for ax in lay.out_axes)]
    contracted = {x_sub[d] for d in c_x}
    t_sub = [c for c in x_sub if c not in contracted]
    t_sub += [c for c in stack_sub if c not in t_sub] + [r]
    batch_sub = [x_sub[d] for d in b_x]
    x_free_sub = [x_sub[d] for d in x_free]
    w_free_sub = [w_sub[d] for d in w_free]
    out_sub = batch_sub + (
        w_free_sub + x_free_sub if lora_is_lhs else x_free_sub + w_free_sub
    )
    dtype, pref = _compute_dtype(x, params)
    precision = params.get("precision")
    ns = lay.n_stack

    def term(x, a, b, idx, scale):
        safe = clamp_indices(idx, view.n_adapters)
        a_g = _lax.convert(_lax.take(a, safe, ns), dtype)  # (*stack, *I, *in, r)
        b_g = _lax.take(b, safe, ns)  # (*stack, *I, r, *out)
        s = gathered_scale(scale, idx)
        dims = tuple(range(ns, ns + s.ndim))
        on_b = lax.broadcast_in_dim(s, b_g.shape, dims)
        b_g = _lax.convert(scale_rows(b_g, on_b), dtype)
        # A base row reads adapter 0: both its factors are zeroed, so even a
        # non-finite adapter 0 gives it exactly 0.
        a_g = zero_base_rows(a_g, lax.broadcast_in_dim(s, a_g.shape, dims))
        t = jnp.einsum(
            f"{''.join(x_sub)},{''.join(a_sub)}->{''.join(t_sub)}",
            x.astype(dtype),
            a_g,
            precision=precision,
        )
        return jnp.einsum(
            f"{''.join(t_sub)},{''.join(b_sub)}->{''.join(out_sub)}",
            t,
            b_g,
            precision=precision,
            preferred_element_type=pref,
        )

    if isinstance(x, quax.Value):
        term = quax.quaxify(term)
    delta = term(x, view.a, view.b, idx, view.scale)
    lhs, rhs = (lora.frozen_w, x) if lora_is_lhs else (x, lora.frozen_w)
    base = bind(
        lax.dot_general_p, lhs, rhs, dimension_numbers=dimension_numbers, **params
    )
    return _add(base, delta)


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
    stacked = tuple(ax for ax in c_l if ax in lora.stack_axes)
    if stacked:
        return (
            f"dot_general contracts the stack axes {stacked} of a BatchedLoraArray "
            f"with weight shape {lora.shape} (in_axes={lora.in_axes}, out_axes="
            f"{lora.out_axes}, stack_axes={lora.stack_axes}): contracting the stack "
            "axis mixes the entries' adapters, a weighted sum of experts' adapted "
            "weights, which is of rank n_entries * rank in general: it has no "
            "low-rank form. To pick experts, gather them (`w[experts]` or "
            "`jnp.take(w, experts, axis=0)`, then `einsum('BTD,BTKDF->BTKF')`), or "
            "run every expert densely with the expert axis kept free "
            "(`einsum('BTD,EDF->BTEF', x, w)`) and combine the outputs: both are "
            "supported. To build the dense per-example weight for this product "
            "instead, pass `allow_materialise=True`."
        )
    return (
        f"dot_general contracts axes {tuple(c_l)} (batch axes {tuple(b_l)}) of a "
        f"BatchedLoraArray with weight shape {lora.shape}, but its layout is "
        f"in_axes={lora.in_axes}, out_axes={lora.out_axes}, "
        f"stack_axes={lora.stack_axes}. The low-rank rewrite needs the contraction "
        "to be exactly over the in-axes (or exactly over the out-axes), and every "
        "batch axis to be a stack axis (a stack axis may also stay free: a fused "
        "kernel, each entry its own adapter); or to be over part of one group "
        "with the rest of that group batch axes (an absorbed weight, as in "
        "DeepSeek's MLA). If the layout is wrong, fix "
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
