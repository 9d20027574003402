"""Dispatch rules for `ragged_dot_general` (`lax.ragged_dot`): the grouped matmul of
a mixture-of-experts layer (EasyDeL's `standard_moe`, MaxText's sparse matmul,
Levanter, SkyRL-tx), with an adapted expert weight `(E, d, f)`.

The rows of a grouped matmul are tokens sorted by expert, so their order says
nothing of which request each belongs to. Two ways to know:

- one adapter for the whole call (scalar indices, a batch grouped by adapter):
  `ragged_dot(x, W) + s · ragged_dot(ragged_dot(x, A_i), B_i)`, the same groups,
  each expert its own factors (`_grouped_low_rank`);
- per-request or per-token adapters: the rows arrive as a `RowIds` (`_core/rows.py`),
  carrying each row's position among the indices through the model's sort and
  gather; each row's adapter is the weight's own `indices.ravel()[pos]`, and the
  low-rank term is a grouped product over `(expert, adapter)` groups: the rows
  sorted by that pair, `ragged_dot` against `A` and `B` viewed as `E·n` groups,
  and put back (`_per_row_grouped`). Its flops are those of the low-rank term
  alone; it reads `x` and writes the term once more, in the new order.

Rows on no expert (past the group sizes) get the base result, 0; a row whose
index is out of range, or that mixes requests, is NaN; a base row (`-1`) is
exactly the base product, whatever the adapters hold.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import quax
from jaxtyping import ArrayLike

from .._core.array import BatchedLoraArray, bind
from .._core.errors import RowsNeededError, UnsupportedOperationError
from .._core.indices import clamp_indices, gathered_scale, require_indices, scale_rows
from .._core.lax import match_varying, ragged_dot_general_p
from .._core.rows import RowIds, live, row_positions, tag
from .dot import _compute_dtype
from .strategies import current_strategy


def _ragged_message(lora: BatchedLoraArray, why: str) -> str:
    return (
        "`ragged_dot_general` (`lax.ragged_dot`, a grouped-matmul MoE layer) with a "
        f"BatchedLoraArray (weight shape {lora.shape}, in_axes={lora.in_axes}, "
        f"out_axes={lora.out_axes}, stack_axes={lora.stack_axes}, indices shape "
        f"{tuple(require_indices(lora).shape)}): {why}"
    )


_UNTAGGED = (
    "the rows of a grouped matmul are tokens sorted by expert, so which request, "
    "and so which adapter, each row belongs to must travel with them, and these "
    "rows do not carry it. `lx.quaxify` tags the arguments whose leading axes are "
    "the indices' shape, or a row-major regrouping of it (x of shape (B, T, D) for "
    "indices (B,) or (B, T); (B*T, D) for (B, T): pass per-token indices "
    "`jnp.broadcast_to(idx[:, None], (B, T))` with a flattened x) and follows the "
    "rows through the model's reshapes, sorts, gathers and scatters. Either the "
    "activation was not such an argument (pass the hidden states or token ids to "
    "the quaxified function itself, batch axis first, and do not pass "
    "`rows=False`), or an operation on the way has no row rule (the docs page "
    "'Mixture of experts' lists the supported ones). With one adapter for the "
    "whole batch, scalar indices need no tags."
)


def _plain_form(x_shape, lora: BatchedLoraArray, params) -> bool:
    """`x (m, d)` ragged along its rows, the weight `(E, d, f)` in any axis order
    with the group axis its only stack axis, no batch dimensions."""
    dn = params["ragged_dot_dimension_numbers"]
    (c_x, c_w), (b_x, b_w) = dn.dot_dimension_numbers
    lay = lora.layout
    return (
        not lora.has_variants
        and len(x_shape) == 2
        and tuple(dn.lhs_ragged_dimensions) == (0,)
        and tuple(c_x) == (1,)
        and not b_x
        and not b_w
        and tuple(dn.rhs_group_dimensions) == lay.stack_axes
        and len(lay.stack_axes) == 1
        and tuple(c_w) == lay.in_axes
        and len(lay.in_axes) == 1
        and len(lay.out_axes) == 1
    )


def _grouped_params(params, pref) -> dict:
    """The parameters of the low-rank term's grouped products: `x (m, d)`
    against factors `(groups, d, r)`, in the call's preferred element type."""
    dn = params["ragged_dot_dimension_numbers"].__class__(
        dot_dimension_numbers=(((1,), (1,)), ((), ())),
        lhs_ragged_dimensions=(0,),
        rhs_group_dimensions=(0,),
    )
    return {
        **params,
        "ragged_dot_dimension_numbers": dn,
        "preferred_element_type": pref,
    }


def _base(x, lora: BatchedLoraArray, group_sizes, params):
    """The base grouped product `ragged_dot(x, W)`."""
    w = lora.frozen_w
    if not isinstance(w, quax.Value):
        x, w, group_sizes = match_varying(x, w, group_sizes)
    return bind(ragged_dot_general_p, x, w, group_sizes, **params)


def _grouped_low_rank(x, lora: BatchedLoraArray, group_sizes, params):
    """`ragged_dot(x, W + s·A_i B_i)` for one adapter `i` for every row (scalar
    indices): the base grouped product plus the grouped low-rank product
    `ragged_dot(ragged_dot(x, A_i), B_i)` with the same groups."""
    i = lora.indices
    s = gathered_scale(lora.scale, i)
    j = clamp_indices(jnp.asarray(i), lora.n_adapters)
    a = jnp.take(jnp.moveaxis(lora.a, 1, 0), j, axis=0)  # (E, d, r)
    b = jnp.take(jnp.moveaxis(lora.b, 1, 0), j, axis=0)  # (E, r, f)
    base = _base(x, lora, group_sizes, params)
    dtype, pref = _compute_dtype(x, params)
    step = _grouped_params(params, pref)
    u = ragged_dot_general_p.bind(
        *match_varying(jnp.asarray(x, dtype), a.astype(dtype), group_sizes), **step
    )
    v = ragged_dot_general_p.bind(
        *match_varying(u, b.astype(dtype), group_sizes), **step
    )
    return base + scale_rows(v, s).astype(base.dtype)


def _row_indices(x: RowIds, lora: BatchedLoraArray):
    """Each row's adapter index (the weight's own indices at the row's position),
    and a mask of the rows whose position is `MIXED` (no one request)."""
    idx = require_indices(lora)
    space, have = tuple(x.space), tuple(idx.shape)
    n_space, n_have = math.prod(space), math.prod(have)
    fits = n_space == n_have or (space[: len(have)] == have and n_space % n_have == 0)
    if not fits:
        raise UnsupportedOperationError(
            _ragged_message(
                lora,
                f"the rows carry positions among indices of shape {space}, but this "
                f"weight's indices have shape {have}: serve every adapted weight "
                "of the call with the same indices (one `lx.loraify(params, "
                "adapters, indices)` or `bank.served(indices)`).",
            )
        )
    pos = row_positions(x, 0)
    per = n_space // n_have  # tokens per index: (B, T) rows against (B,) indices
    flat = idx.reshape(-1)
    safe = jnp.clip(pos, 0, n_space - 1) // per
    return jnp.take(flat, safe, axis=0, mode="clip"), pos < 0


def _per_row_grouped(x: RowIds, lora: BatchedLoraArray, group_sizes, params):
    """`ragged_dot(x, W + s_i·A_i B_i)` with each row's own adapter `i` (see the
    module docstring): the base grouped product plus the low-rank term, in the
    form `_form` picks."""
    rows = x.array
    m = rows.shape[0]
    n = lora.n_adapters
    i, mixed = _row_indices(x, lora)
    n_groups = lora.shape[lora.stack_axes[0]]
    dtype, pref = _compute_dtype(rows, params)
    a = lora.a.astype(dtype)  # (E, n, d, r)
    b = lora.b.astype(dtype)  # (E, n, r, f)
    # A grouped matmul may compute every group against every row and mask the
    # result (XLA's CPU lowering does), and the expert-grouped form multiplies
    # other adapters' factors by zeros: an adapter holding NaN or Inf would then
    # reach other adapters' rows. Its factors are zeroed for the product and its
    # own rows made NaN.
    finite_a, finite_b = jnp.isfinite(a), jnp.isfinite(b)
    sound = finite_a.all((2, 3)) & finite_b.all((2, 3))  # (E, n)
    a = jnp.where(finite_a, a, 0)
    b = jnp.where(finite_b, b, 0)
    s = gathered_scale(lora.scale, i)
    s = jnp.where(mixed, jnp.nan, s)
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(m, dtype=ends.dtype), side="right")
    expert = expert.astype(jnp.int32)
    on_expert = expert < n_groups
    s = jnp.where(on_expert, s, 0)  # rows on no expert: the base result, 0
    j = clamp_indices(i, n).astype(jnp.int32)
    served = on_expert & (s != 0) & jnp.isfinite(s)
    ok = sound[jnp.clip(expert, 0, n_groups - 1), j]
    s = jnp.where(served & ~ok, jnp.nan, s)
    step = _grouped_params(params, pref)
    xs = jnp.asarray(rows, dtype)
    if _form(n, lora.rank) == "sorted":
        v = _sorted_term(xs, a, b, j, expert, served, n_groups, group_sizes, step)
    else:
        v = _expert_grouped_term(xs, a, b, j, served, group_sizes, step)
    base = _base(rows, lora, group_sizes, params)
    out = base + scale_rows(v, s[:, None]).astype(base.dtype)
    return tag(out, x.pos[:, :1], x.space)


# The expert-grouped form reads every adapter's factors for each row's expert
# (`n·r` columns): cheapest where the grouped matmul is a masked dense product
# (XLA's CPU lowering, whose cost grows with the number of groups), and for few,
# small adapters. Measured by `python -m benchmarks.moe` (both forms).
EXPERT_GROUPED_MAX_COLUMNS = 512


def _form(n: int, rank: int) -> str:
    """`sorted` or `expert-grouped` (module docstring): the call's strategy
    (`lx.quaxify(f, strategy=...)`: `segment` sorts, `gather` groups by expert),
    else by backend and size."""
    forced = current_strategy()
    if forced == "dense":
        raise UnsupportedOperationError(
            "strategy='dense' builds each row's merged weight, which a grouped "
            "matmul's per-row adapters never do: use 'segment' (rows sorted by "
            "expert and adapter), 'gather' (grouped by expert, every adapter's "
            "columns) or 'auto'."
        )
    if forced == "segment":
        return "sorted"
    if forced == "gather":
        return "expert-grouped"
    cpu = jax.default_backend() == "cpu"
    return (
        "expert-grouped" if cpu and n * rank <= EXPERT_GROUPED_MAX_COLUMNS else "sorted"
    )


def _sorted_term(xs, a, b, j, expert, served, n_groups, group_sizes, step):
    """The rows sorted by (expert, adapter), `ragged_dot` against `A` and `B` seen
    as `E·n` groups, put back: the low-rank flops alone, plus a gather of `x` and
    a scatter of the term."""
    n = a.shape[1]
    key = jnp.where(served, expert * n + j, n_groups * n)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.zeros((n_groups * n + 1,), group_sizes.dtype).at[key].add(1)
    sizes = sizes[: n_groups * n]
    a = a.reshape((n_groups * n, *a.shape[2:]))  # (E·n, d, r)
    b = b.reshape((n_groups * n, *b.shape[2:]))  # (E·n, r, f)
    xs = jnp.take(xs, order, axis=0, mode="clip")
    u = ragged_dot_general_p.bind(*match_varying(xs, a, sizes), **step)
    v = ragged_dot_general_p.bind(*match_varying(u, b, sizes), **step)
    return jnp.zeros_like(v).at[order].set(v, unique_indices=True)


def _expert_grouped_term(xs, a, b, j, served, group_sizes, step):
    """The model's own expert groups: `x · A_e` for all `n` adapters of the row's
    expert at once (`(E, d, n·r)`), each row's own `r` columns kept, then
    `· B_e` over `(E, n·r, f)` with the others zero. No sort; `n` times the
    low-rank flops."""
    m = xs.shape[0]
    e, n, d, r = a.shape
    a_cat = jnp.moveaxis(a, 1, 2).reshape(e, d, n * r)
    b_cat = b.reshape(e, n * r, b.shape[-1])
    u = ragged_dot_general_p.bind(*match_varying(xs, a_cat, group_sizes), **step)
    own = (jnp.arange(n, dtype=jnp.int32) == j[:, None]) & served[:, None]
    u = jnp.where(own[:, :, None], u.reshape(m, n, r), 0).reshape(m, n * r)
    return ragged_dot_general_p.bind(*match_varying(u, b_cat, group_sizes), **step)


def _ragged(lhs, rhs, group_sizes, params):
    lora = lhs if isinstance(lhs, BatchedLoraArray) else rhs
    idx = require_indices(lora)
    if isinstance(lhs, RowIds) and not live(lhs):
        lhs = lhs.array
    if lora is rhs and not isinstance(lhs, BatchedLoraArray):
        x = lhs.array if isinstance(lhs, RowIds) else lhs
        plain = not isinstance(x, quax.Value) and _plain_form(x.shape, lora, params)
        if plain and jnp.ndim(idx) == 0:
            out = _grouped_low_rank(x, lora, group_sizes, params)
            if isinstance(lhs, RowIds):
                return tag(out, lhs.pos[:, :1], lhs.space)
            return out
        if plain and isinstance(lhs, RowIds):
            return _per_row_grouped(lhs, lora, group_sizes, params)
        if plain:
            raise RowsNeededError(_ragged_message(lora, _UNTAGGED))
    if lora.allow_materialise:
        return BatchedLoraArray.default(
            ragged_dot_general_p, (lhs, rhs, group_sizes), params
        )
    raise UnsupportedOperationError(
        _ragged_message(
            lora,
            "only the plain form has a low-rank rule: x of shape (m, d) ragged "
            "along its rows, the expert weight (E, d, f) adapted with `stack_axes` "
            "on E (its only stack axis), one in- and one out-axis, no batch "
            "dimensions, and an adapter kind without vectors (LoRA, not DoRA or "
            "IA3). Alternatives: select the experts per token (`w[experts]` then "
            "an einsum) or run every expert densely with the expert axis free "
            "(`einsum('BTD,EDF->BTEF', x, w)`); both are supported.",
        )
    )


if ragged_dot_general_p is not None:

    @quax.register(ragged_dot_general_p)
    def _(lhs: ArrayLike | quax.ArrayValue, rhs: BatchedLoraArray, group_sizes, **p):
        return _ragged(lhs, rhs, group_sizes, p)

    @quax.register(ragged_dot_general_p)
    def _(lhs: BatchedLoraArray, rhs: ArrayLike | quax.ArrayValue, group_sizes, **p):
        return _ragged(lhs, rhs, group_sizes, p)
