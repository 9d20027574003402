"""Dispatch rules that carry row positions (`RowIds`, `_core/rows.py`) through the
operations a model applies to its activations.

Each rule binds the primitive on the plain arrays, as without tags, and computes
the result's positions by applying the same operation to the positions: the same
gather, sort, reshape or scatter, on an `int32` array that is 1 along every axis
the positions do not vary on (so a `(B*T, D)` activation carries `(B*T, 1)`
positions). Where an element combines rows of different requests (a reduction,
a contraction, a scatter-add across rows) its position is `MIXED`. Where an
operation's positions cannot be known (an untagged update written over a tagged
array, an unknown primitive) the result is a plain array: the tag is dropped,
never guessed, and an adapted grouped matmul on it refuses.

A tagged activation also meets adapted weights: `(RowIds, BatchedLoraArray)` and
other quax values are unwrapped, the primitive re-dispatched to their rules, and
the result tagged as the plain operation would be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jax._src.ad_checkpoint import name_p
from jax._src.core import pvary_p
from jaxtyping import ArrayLike

from .._core.array import bind
from .._core.lax import match_varying, ragged_dot_general_p
from .._core.rows import (
    MIXED,
    RowIds,
    agree,
    combine,
    high,
    live,
    low,
    reduce_positions,
    tag,
)

Rule = Callable[[list, list, dict, list], Any]

_TAG_RULES: dict[Any, Rule] = {}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _apply(primitive, args: Sequence[Any], params: dict) -> Any:
    """Bind `primitive` on `args`' plain arrays (other quax values dispatched to
    their own rules) and tag the result(s) by the primitive's tag rule."""
    tags = [a.pos if live(a) else None for a in args]
    spaces = {a.space for a in args if live(a)}
    arrays = [a.array if isinstance(a, RowIds) else a for a in args]
    out = bind(primitive, *arrays, **params)
    if not spaces:  # cotangents (float0 positions): plain
        return out
    outs = list(out) if primitive.multiple_results else [out]
    pos = None
    if len(spaces) == 1:  # positions in two row spaces cannot be compared
        pos = _TAG_RULES[primitive](tags, arrays, params, outs)
    space = next(iter(spaces))
    if not primitive.multiple_results:
        return tag(out, pos[0] if isinstance(pos, list) else pos, space)
    pos = pos if isinstance(pos, list) else [pos] * len(outs)
    return [tag(o, p, space) for o, p in zip(outs, pos)]


def _register(primitive, rule: Rule) -> None:
    """Register `rule` (positions of the result) for `primitive` on every call with
    a `RowIds` among its arguments: the first tagged argument at position 0 to 3,
    the others tagged or plain; and a tagged activation with another quax value
    (an adapted weight)."""
    if primitive is None or primitive in _TAG_RULES:
        return
    _TAG_RULES[primitive] = rule

    def r0(x: RowIds, *rest: RowIds | ArrayLike, **params):
        return _apply(primitive, (x, *rest), params)

    def r1(x0: ArrayLike, x: RowIds, *rest: RowIds | ArrayLike, **params):
        return _apply(primitive, (x0, x, *rest), params)

    def r2(x0: ArrayLike, x1: ArrayLike, x: RowIds, *rest: RowIds | ArrayLike, **p):
        return _apply(primitive, (x0, x1, x, *rest), p)

    def r3(
        x0: ArrayLike,
        x1: ArrayLike,
        x2: ArrayLike,
        x: RowIds,
        *rest: RowIds | ArrayLike,
        **p,
    ):
        return _apply(primitive, (x0, x1, x2, x, *rest), p)

    def with_value_l(x: RowIds, y: quax.ArrayValue, **params):
        return _apply(primitive, (x, y), params)

    def with_value_r(y: quax.ArrayValue, x: RowIds, **params):
        return _apply(primitive, (y, x), params)

    for fn in (r0, r1, r2, r3):
        quax.register(primitive, precedence=3)(fn)
    for fn in (with_value_l, with_value_r):
        quax.register(primitive, precedence=2)(fn)


# -- elementwise: each element of the result is made of the same elements ------


def _elementwise(tags, arrays, params, outs):
    rank = len(_shape(outs[0]))
    return combine([t for t in tags if t is not None and t.ndim == rank])


def _identity_each(tags, arrays, params, outs):
    """Several operands, each passed through (`optimization_barrier`)."""
    return list(tags[: len(outs)])


ELEMENTWISE = [
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "cbrt", "ceil", "clamp", "clz", "conj", "convert_element_type", "copy", "cos",
    "cosh", "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1",
    "floor", "ge", "gt", "imag", "integer_pow", "is_finite", "le", "lgamma", "log",
    "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not",
    "or", "population_count", "pow", "real", "reduce_precision", "rem", "round",
    "rsqrt", "select_n", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square", "sub", "tan",
    "tanh", "xor", "sharding_constraint", "stop_gradient",
]  # fmt: skip


def _prim(name: str) -> Any:
    return getattr(lax, f"{name}_p", None)


# -- reductions --------------------------------------------------------------------

REDUCTIONS = [
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
    "reduce_or", "reduce_xor", "argmax", "argmin",
]  # fmt: skip


def _reduction(tags, arrays, params, outs):
    return reduce_positions(tags[0], params["axes"])


def _cumulative(tags, arrays, params, outs):
    p, axis, reverse = tags[0], params["axis"], params.get("reverse", False)
    if p.shape[axis] == 1:
        return p
    lo = lax.cummin(low(p), axis, reverse=reverse)
    hi = lax.cummax(high(p), axis, reverse=reverse)
    return agree(lo, hi)


# -- shapes ------------------------------------------------------------------------


def _reshape_groups(old, new):
    """Runs of axes of `old` and `new` with equal products, in order, or None."""
    groups, i, j = [], 0, 0
    if 0 in old or 0 in new:
        return None
    while i < len(old) or j < len(new):
        i2, j2, po, pn = i, j, 1, 1
        if i2 < len(old):
            po, i2 = po * old[i2], i2 + 1
        if j2 < len(new):
            pn, j2 = pn * new[j2], j2 + 1
        while po != pn:
            if po < pn and i2 < len(old):
                po, i2 = po * old[i2], i2 + 1
            elif pn < po and j2 < len(new):
                pn, j2 = pn * new[j2], j2 + 1
            else:
                return None
        groups.append((range(i, i2), range(j, j2)))
        i, j = i2, j2
    return groups


def _reshape(tags, arrays, params, outs):
    p, old, new = tags[0], _shape(arrays[0]), _shape(outs[0])
    groups = _reshape_groups(old, new)
    if groups is None:
        return jnp.broadcast_to(p, old).reshape(new)
    mid, tshape = list(p.shape), [1] * len(new)
    for gi, gj in groups:
        if any(p.shape[d] > 1 for d in gi):
            for d in gi:
                mid[d] = old[d]
            for d in gj:
                tshape[d] = new[d]
    return jnp.broadcast_to(p, mid).reshape(tshape)


def _broadcast_in_dim(tags, arrays, params, outs):
    p, dims = tags[0], params["broadcast_dimensions"]
    if p is None:
        return None
    tshape = [1] * len(params["shape"])
    for k, d in enumerate(dims):
        tshape[d] = p.shape[k]
    return lax.broadcast_in_dim(p, tshape, dims)


def _transpose(tags, arrays, params, outs):
    return jnp.transpose(tags[0], params["permutation"])


def _squeeze(tags, arrays, params, outs):
    return lax.squeeze(tags[0], params["dimensions"])


def _rev(tags, arrays, params, outs):
    p = tags[0]
    dims = [d for d in params["dimensions"] if p.shape[d] > 1]
    return lax.rev(p, dims) if dims else p


def _slice(tags, arrays, params, outs):
    p = tags[0]
    strides = params.get("strides") or (1,) * p.ndim
    start, stop, step = [], [], []
    for d in range(p.ndim):
        full = p.shape[d] > 1
        start.append(params["start_indices"][d] if full else 0)
        stop.append(params["limit_indices"][d] if full else 1)
        step.append(strides[d] if full else 1)
    return lax.slice(p, start, stop, step)


def _split(tags, arrays, params, outs):
    p, axis = tags[0], params["axis"]
    if p.shape[axis] == 1:
        return [p] * len(outs)
    return list(lax.split(p, params["sizes"], axis=axis))


def _dynamic_slice(tags, arrays, params, outs):
    p = tags[0]
    if p is None or any(t is not None for t in tags[1:]):
        return None
    starts = [s if p.shape[d] > 1 else 0 for d, s in enumerate(arrays[1:])]
    sizes = [s if p.shape[d] > 1 else 1 for d, s in enumerate(params["slice_sizes"])]
    return lax.dynamic_slice(p, starts, sizes)


def _dynamic_update_slice(tags, arrays, params, outs):
    p, u = tags[0], tags[1]
    if p is None or u is None:  # rows written by an untagged update: unknown
        return None
    shape, ushape = _shape(arrays[0]), _shape(arrays[1])
    full = [p.shape[d] > 1 or u.shape[d] > 1 for d in range(p.ndim)]
    p = jnp.broadcast_to(p, [s if f else 1 for s, f in zip(shape, full)])
    u = jnp.broadcast_to(u, [s if f else 1 for s, f in zip(ushape, full)])
    starts = [s if f else 0 for s, f in zip(arrays[2:], full)]
    return lax.dynamic_update_slice(p, u.astype(p.dtype), starts)


def _concatenate(tags, arrays, params, outs):
    dim = params["dimension"]
    tagged = [t for t in tags if t is not None]
    rank = len(_shape(outs[0]))
    if all(t.shape[dim] == 1 for t in tagged):  # along features
        return combine(
            [
                jnp.broadcast_to(t, t.shape[:dim] + (1,) + t.shape[dim + 1 :])
                for t in tagged
            ]
        )
    if len(tagged) < len(tags):  # rows of an untagged operand: unknown
        return None
    full = [any(t.shape[d] > 1 for t in tags) for d in range(rank)]
    parts = []
    for t, a in zip(tags, arrays):
        s = _shape(a)
        parts.append(
            jnp.broadcast_to(
                t, [s[d] if (full[d] or d == dim) else 1 for d in range(rank)]
            )
        )
    return lax.concatenate(parts, dim)


def _pad(tags, arrays, params, outs):
    p = tags[0]
    if p is None:
        return None
    config = [
        cfg if p.shape[d] > 1 else (0, 0, 0)
        for d, cfg in enumerate(params["padding_config"])
    ]
    return lax.pad(p, np.int32(MIXED), config)


# -- gathers and scatters ------------------------------------------------------------


def _mask_index_vector(indices, maps_to_row: Sequence[bool]):
    """`indices` with the components (last axis) of feature axes set to 0."""
    if all(maps_to_row):
        return indices
    mask = np.asarray(maps_to_row, dtype=indices.dtype)
    return indices * mask


def _gather(tags, arrays, params, outs):
    operand, indices = arrays
    p, q = tags
    dn = params["dimension_numbers"]
    out_rank = len(_shape(outs[0]))
    if p is not None:  # the rows gathered carry their own positions
        oshape = _shape(operand)
        batching = set(getattr(dn, "operand_batching_dims", ()))
        p = jnp.broadcast_to(
            p, [oshape[d] if d in batching else p.shape[d] for d in range(p.ndim)]
        )
        feature = [p.shape[d] == 1 and oshape[d] > 1 for d in range(p.ndim)]
        sizes = [1 if f else s for s, f in zip(params["slice_sizes"], feature)]
        idx = _mask_index_vector(indices, [not feature[d] for d in dn.start_index_map])
        p, idx = match_varying(p, idx)
        return lax.gather(
            p,
            idx,
            dn,
            sizes,
            indices_are_sorted=params["indices_are_sorted"],
            unique_indices=params["unique_indices"],
            mode=params["mode"],
            fill_value=MIXED,
        )
    # Rows looked up by tagged indices (token ids): the batch axes of the result
    # are the indices' axes.
    q = reduce_positions(q, [q.ndim - 1])
    batch = [d for d in range(out_rank) if d not in dn.offset_dims]
    tshape = [1] * out_rank
    for k, d in enumerate(batch):
        tshape[d] = q.shape[k]
    return lax.broadcast_in_dim(q, tshape, batch)


def _scatter(kind: str) -> Rule:
    def rule(tags, arrays, params, outs):
        operand, indices, updates = arrays
        p, _, u = tags
        if u is None and (p is None or kind == "set"):
            return None  # rows written by an untagged update: unknown
        dn = params["dimension_numbers"]
        oshape, ushape = _shape(operand), _shape(updates)
        placed = set(dn.inserted_window_dims) | set(
            getattr(dn, "operand_batching_dims", ())
        )
        window = [d for d in range(len(oshape)) if d not in placed]
        # An operand axis is kept (1 in the positions) where neither side varies.
        keep = [True] * len(oshape)
        for k, d in enumerate(window):
            ud = dn.update_window_dims[k]
            op_varies = p is not None and p.shape[d] > 1
            up_varies = u is not None and u.shape[ud] > 1
            keep[d] = op_varies or up_varies or oshape[d] == 1
        for d in placed:
            keep[d] = True
        ptarget = [s if k else 1 for s, k in zip(oshape, keep)]
        utarget = list(ushape)
        for k, d in enumerate(window):
            if not keep[d]:
                utarget[dn.update_window_dims[k]] = 1
        idx = _mask_index_vector(
            indices, [keep[d] for d in dn.scatter_dims_to_operand_dims]
        )
        u_full = jnp.broadcast_to(u, utarget) if u is not None else None
        common = dict(
            dimension_numbers=dn,
            indices_are_sorted=params["indices_are_sorted"],
            unique_indices=params["unique_indices"],
            mode=params["mode"],
        )
        if kind == "set":
            base = jnp.broadcast_to(p, ptarget) if p is not None else None
            base = jnp.full(ptarget, MIXED, jnp.int32) if base is None else base
            return lax.scatter(*match_varying(base, idx, u_full), **common)
        if u_full is None:  # an untagged update combined in: the operand's rows
            return p
        p0 = jnp.broadcast_to(p, ptarget) if p is not None else None
        top = jnp.full(ptarget, MIXED, jnp.int32) if p0 is None else p0
        lo = lax.scatter_min(*match_varying(low(top), idx, low(u_full)), **common)
        hi = lax.scatter_max(*match_varying(high(top), idx, high(u_full)), **common)
        return agree(lo, hi)

    return rule


# -- sorts ---------------------------------------------------------------------


def _sort(tags, arrays, params, outs):
    dim = params["dimension"]
    shape = _shape(arrays[0])
    tagged = [t for t in tags if t is not None]
    common = jnp.broadcast_shapes(*(t.shape for t in tagged))
    p = combine([jnp.broadcast_to(t, common) for t in tagged])
    if p.shape[dim] == 1:  # positions do not vary along the sorted axis
        return [p] * len(outs)
    full = jnp.broadcast_to(p, shape)
    sorted_all = lax.sort_p.bind(*match_varying(*arrays, full), **params)
    return [sorted_all[-1]] * len(outs)


def _top_k(tags, arrays, params, outs):
    p = tags[0]
    axis = params.get("axis", -1) % p.ndim
    if p.shape[axis] > 1:
        return [None, None]  # positions along the axis chosen from: unsupported
    return [p, p]


# -- products ------------------------------------------------------------------


def _place_side(t, contract, batch, n_batch, n_lhs_free, n_rhs_free, is_lhs):
    """One operand's positions laid out as `dot_general`'s result: batch axes,
    lhs free axes, rhs free axes."""
    if t is None:
        return None
    t = reduce_positions(t, contract)  # drops the contracted axes
    kept = [d for d in range(t.ndim + len(contract)) if d not in contract]
    bpos = [kept.index(b) for b in batch]
    free = [i for i in range(len(kept)) if kept[i] not in batch]
    t = jnp.transpose(t, bpos + free)
    pad = (1,) * (n_rhs_free if is_lhs else n_lhs_free)
    shape = t.shape[:n_batch] + (
        t.shape[n_batch:] + pad if is_lhs else pad + t.shape[n_batch:]
    )
    return t.reshape(shape)


def _dot_general(tags, arrays, params, outs):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    lr, rr = len(_shape(arrays[0])), len(_shape(arrays[1]))
    nb, nl, nr = len(lb), lr - len(lc) - len(lb), rr - len(rc) - len(rb)
    lt = _place_side(tags[0], tuple(lc), tuple(lb), nb, nl, nr, True)
    rt = _place_side(tags[1], tuple(rc), tuple(rb), nb, nl, nr, False)
    return combine([t for t in (lt, rt) if t is not None])


def _ragged_dot(tags, arrays, params, outs):
    """The rows of a grouped matmul against a plain expert weight keep their
    positions (the lhs-ragged form, `(m, d) x (E, d, f)`)."""
    dn = params["ragged_dot_dimension_numbers"]
    (c_x, _), (b_x, _) = dn.dot_dimension_numbers
    p = tags[0]
    if p is None or b_x or tags[1] is not None:
        return None
    p = reduce_positions(p, c_x)
    n_out = len(_shape(outs[0]))
    return p.reshape(p.shape + (1,) * (n_out - p.ndim))


def _conv(tags, arrays, params, outs):
    p = tags[0]
    if p is None or tags[1] is not None:
        return None
    dn = params["dimension_numbers"]
    lhs_batch, out_batch = dn.lhs_spec[0], dn.out_spec[0]
    p = reduce_positions(p, [d for d in range(p.ndim) if d != lhs_batch])
    tshape = [1] * len(_shape(outs[0]))
    tshape[out_batch] = p.shape[0]
    return p.reshape(tshape)


def _register_all() -> None:
    for name in ELEMENTWISE:
        _register(_prim(name), _elementwise)
    for name in REDUCTIONS:
        _register(_prim(name), _reduction)
    for name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"):
        _register(_prim(name), _cumulative)
    _register(lax.reshape_p, _reshape)
    _register(lax.broadcast_in_dim_p, _broadcast_in_dim)
    _register(lax.transpose_p, _transpose)
    _register(lax.squeeze_p, _squeeze)
    _register(lax.rev_p, _rev)
    _register(lax.slice_p, _slice)
    _register(_prim("split"), _split)
    _register(lax.dynamic_slice_p, _dynamic_slice)
    _register(lax.dynamic_update_slice_p, _dynamic_update_slice)
    _register(lax.concatenate_p, _concatenate)
    _register(lax.pad_p, _pad)
    _register(lax.gather_p, _gather)
    _register(lax.scatter_p, _scatter("set"))
    for name in (
        "scatter_add",
        "scatter_sub",
        "scatter_mul",
        "scatter_min",
        "scatter_max",
    ):
        _register(_prim(name), _scatter("combine"))
    _register(lax.sort_p, _sort)
    _register(lax.top_k_p, _top_k)
    _register(lax.dot_general_p, _dot_general)
    _register(ragged_dot_general_p, _ragged_dot)
    _register(lax.conv_general_dilated_p, _conv)
    _register(_prim("optimization_barrier"), _identity_each)
    _register(name_p, _elementwise)  # `checkpoint_name`
    _register(pvary_p, _identity_each)  # in a `shard_map` body


_register_all()
