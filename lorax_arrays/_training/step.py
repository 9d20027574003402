"""The jitted step of an `AdapterTrainer`.

One program for any tenants in any rows: the slots' arrays become a
`ServedAdapters` inside the trace, `loraify` puts them into the tree with each
row's slot, and the user's loss gives one loss per row. The objective is the sum
over slots of each tenant's *mean* loss over its own rows (each row weighted by
`1 / its tenant's row count`, base and padding rows by 0), so the gradient a slot
gets is exactly its tenant's mean-loss gradient, whatever else is in the batch.
Then per slot: the masks (only the tenant's own arrays move), the global norm and
its clipping, a finiteness check, the optimizer's update (`jax.vmap` over the
slot axis, so every slot has its own optimizer state and hyperparameters), and a
select that keeps the old arrays and optimizer state of a slot that had no rows or
a non-finite gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._adapters.loraify import loraify
from .._adapters.served import ServedAdapters
from .._core.lax import explicit_spec
from .._rules.quaxify import quaxify_batch
from .slots import Leaf, SlotConfig, SlotParams


def served_from_slots(
    params: SlotParams,
    config: SlotConfig,
    indices: Any,
    leaves: dict[str, Leaf],
    kinds: tuple[str, ...],
) -> ServedAdapters:
    """What `loraify` serves from the slots (inside the trace): the slot axis
    moved after the stack axes, as `ServedAdapters` lays factors out."""

    def served_axis(path, x):
        return jnp.moveaxis(x, 0, leaves[path].n_stack)

    paths = list(leaves)
    factors = {}
    for p, (a, b) in params.factors.items():
        if p in params.vera_d:  # VeRA slots: (A·diag(d), B·diag(b)), A, B frozen
            lay, ns = leaves[p].layout, leaves[p].n_stack
            flag = config.vera[paths.index(p)]
            d = _where_slot(flag, params.vera_d[p], 1)
            g = _where_slot(flag, params.vera_b[p], 1)
            a = a * jnp.expand_dims(d, tuple(range(1 + ns, 1 + ns + len(lay.in_axes))))
            b = b * jnp.expand_dims(g, 1 + ns)
        factors[p] = (served_axis(p, a), served_axis(p, b))
    return ServedAdapters.make(
        factors=factors,
        scales=config.scales,
        head_scales=config.heads,
        in_scales={p: served_axis(p, v) for p, v in params.in_scales.items()},
        out_scales={p: served_axis(p, v) for p, v in params.out_scales.items()},
        magnitudes={p: served_axis(p, v) for p, v in params.magnitudes.items()},
        dora=(
            {p: config.dora[paths.index(p)] for p in params.magnitudes}
            if "dora" in kinds
            else {}
        ),
        generations=None,
        indices=indices,
        layouts=tuple(leaf.layout for leaf in leaves.values()),
    )


def _where_slot(flag: Any, x: Any, other: Any) -> Any:
    """`x` where the slot's `flag (slots,)` is set, else `other`."""
    return jnp.where(_per_slot(flag, x), x, jnp.asarray(other, x.dtype))


def masks(config: SlotConfig, leaves: dict[str, Leaf], params: SlotParams):
    """Per array of `params`, where it is a tenant's own (broadcastable, slot
    axis first): the first `rank` columns of its factors on the leaves it adapts,
    its DoRA magnitudes, its IA3 vectors, a VeRA tenant's `d` and `b` (and not
    its projections, which stay frozen)."""
    out_f, out_m, out_i, out_o, out_d, out_b = {}, {}, {}, {}, {}, {}
    for j, (path, leaf) in enumerate(leaves.items()):
        lay, r = leaf.layout, leaf.capacity
        ns, ni, no = leaf.n_stack, len(lay.in_axes), len(lay.out_axes)
        cols = jnp.arange(r)[None, :] < config.ranks[j][:, None]  # (slots, R)
        n = cols.shape[0]
        if path in params.vera_d:  # a VeRA slot trains d and b, not A and B
            vera = config.vera[j]
            out_d[path] = (cols & vera[:, None]).reshape(n, *(1,) * ns, r)
            out_b[path] = vera.reshape(n, *(1,) * (ns + no))
            cols = cols & ~vera[:, None]
        out_f[path] = (
            cols.reshape(n, *(1,) * (ns + ni), r),
            cols.reshape(n, *(1,) * ns, r, *(1,) * no),
        )
        if path in params.magnitudes:
            out_m[path] = config.dora[j].reshape(n, *(1,) * (ns + no))
        if path in params.in_scales:
            out_i[path] = config.has_in[j].reshape(n, *(1,) * (ns + ni))
        if path in params.out_scales:
            out_o[path] = config.has_out[j].reshape(n, *(1,) * (ns + no))
    return SlotParams(out_f, out_m, out_i, out_o, out_d, out_b)


def _masked(tree: Any, mask: Any) -> Any:
    # A select, not a product: a masked NaN (another kind's vector, touched by
    # a tenant's non-finite rows) must not survive as NaN * 0.
    return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, mask)


def _per_slot(flags: Any, x: Any) -> Any:
    """`flags (slots,)` shaped to broadcast against `x` (slot axis first)."""
    return jnp.reshape(flags, (flags.shape[0],) + (1,) * (jnp.ndim(x) - 1))


def make_step(
    *,
    loss_fn: Callable[[Any, Any], Any],
    micro_batches: int,
    treedef: Any,
    static: dict[int, Any],
    leaves: dict[str, Leaf],
    kinds: tuple[str, ...],
    optimizer: Any,
    n_slots: int,
    strategy: str,
    shardings: tuple[Any, Any] | None = None,
) -> Callable:
    """The jitted step (params and optimizer state donated):
    `step(tree_arrays, batch, ids, weights, config, params, opt_state)` returns
    `(params, opt_state, losses (slots,), finite (slots,))`, the first two
    placed as `shardings` says when given."""
    run = quaxify_batch(loss_fn, 1)  # the batch's rows may meet a grouped matmul

    def tree_of(arrays):
        full = [static[i] if i in static else x for i, x in enumerate(arrays)]
        return jax.tree.unflatten(treedef, full)

    def objective(params, arrays, config, batch, ids, weights):
        served = served_from_slots(params, config, ids, leaves, kinds)
        tree = loraify(tree_of(arrays), served, strategy=strategy)
        losses = jnp.asarray(run(tree, batch))
        if losses.shape != ids.shape:
            raise ValueError(
                f"AdapterTrainer.step: loss_fn returned losses of shape "
                f"{losses.shape}, but `names` has shape {ids.shape}: return one "
                "loss per entry of `names` (per row for one name per row, e.g. "
                "the mean over the row's tokens; per token for one name per "
                "token)."
            )
        losses = losses.astype(jnp.float32)
        if explicit_spec(losses) is not None:
            # An explicit-sharding mesh: the per-row losses (one per row, small)
            # meet the replicated row weights and slot ids whole.
            losses = jax.sharding.reshard(losses, jax.sharding.PartitionSpec())
        # Base and padding rows (weight 0) never reach the sums, even non-finite.
        terms = jnp.where(weights > 0, losses, 0.0) * weights
        segment = jnp.where(ids >= 0, ids, n_slots).reshape(-1)
        means = jax.ops.segment_sum(terms.reshape(-1), segment, n_slots + 1)
        means = means[:n_slots]
        return jnp.sum(means), means

    grad = jax.value_and_grad(objective, has_aux=True)

    def gradients(params, arrays, config, batch, ids, weights):
        if micro_batches == 1:
            (_, means), g = grad(params, arrays, config, batch, ids, weights)
            return means, g

        def split(x):
            return jnp.reshape(x, (micro_batches, -1, *jnp.shape(x)[1:]))

        parts = jax.tree.map(split, (batch, ids, weights))

        def one(carry, part):
            means, acc = carry
            (_, m), g = grad(params, arrays, config, *part)
            return (means + m, jax.tree.map(jnp.add, acc, g)), None

        zero = (
            jnp.zeros((n_slots,), jnp.float32),
            jax.tree.map(jnp.zeros_like, params),
        )
        (means, g), _ = jax.lax.scan(one, zero, parts)
        return means, g

    def step(arrays, batch, ids, weights, config, params, opt_state):
        means, g = gradients(params, arrays, config, batch, ids, weights)
        mask = masks(config, leaves, params)
        g = _masked(g, mask)
        squares = [
            jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
            for x in jax.tree.leaves(g)
        ]
        norm = jnp.sqrt(sum(squares, jnp.zeros((n_slots,), jnp.float32)))
        finite = jnp.isfinite(norm) & jnp.isfinite(means)
        # As optax.clip_by_global_norm, per slot (inf: no clipping).
        trigger = norm < config.clip

        def clip(x):
            n = _per_slot(norm, x).astype(x.dtype)
            c = _per_slot(config.clip, x).astype(x.dtype)
            return jnp.where(_per_slot(trigger, x), x, (x / n) * c)

        g = jax.tree.map(clip, g)
        updates, new_state = jax.vmap(optimizer.update)(g, opt_state, params)
        updates = _masked(updates, mask)
        new = jax.tree.map(
            lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
            params,
            updates,
        )
        counts = jax.ops.segment_sum(
            (ids >= 0).reshape(-1).astype(jnp.int32),
            jnp.where(ids >= 0, ids, n_slots).reshape(-1),
            n_slots + 1,
        )[:n_slots]
        keep = finite & (counts > 0)

        def select(n, o):
            return jnp.where(_per_slot(keep, n), n, o)

        return (
            jax.tree.map(select, new, params),
            jax.tree.map(select, new_state, opt_state),
            means,
            finite,
        )

    placed = {}
    if shardings is not None:  # the slots keep their placement, in place
        rep = jax.sharding.NamedSharding(
            jax.tree.leaves(shardings[0])[0].mesh, jax.sharding.PartitionSpec()
        )
        placed = {"out_shardings": (*shardings, rep, rep)}
    return jax.jit(step, donate_argnums=(5, 6), **placed)
