"""`init_adapter`: a fresh adapter for a tree, by targeting rules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._core.array import dense
from .._core.paths import flatten_with_paths
from .adapter import Adapter, _no_vectors
from .targeting import LoraRule, match_rules


def init_adapter(
    tree: Any,
    rules: LoraRule | Sequence[LoraRule],
    *,
    key: PRNGKeyArray,
    dtype: Any = None,
) -> Adapter:
    """A new adapter for the leaves of `tree` that `rules` match.

    `a` is drawn as in PEFT (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, Kaiming-uniform)
    and `b` starts at zero, so a new adapter leaves the model unchanged. So do the
    variants a rule asks for (`LoraRule(..., variant=...)`), initialised as PEFT
    does: a DoRA leaf's magnitude is the weight's norm over its in-axes per
    out-feature, an IA3 vector is 1.

    **Arguments:**

    - `tree`: the model or parameter tree (see [`lorax_arrays.match_rules`][]).
    - `rules`: a `LoraRule` or a sequence of them; the first match wins.
    - `key`: a JAX PRNG key.
    - `dtype`: the adapter's dtype; defaults to each weight's own dtype.

    **Returns:**

    An [`lorax_arrays.Adapter`][].
    """
    matches = match_rules(tree, rules)
    a_shapes = [m.layout.factor_shapes(m.rank)[0] for m in matches]
    # One draw for the whole adapter, split afterwards: eager JAX would compile a
    # random kernel per distinct shape, which dominates setting up many adapters.
    # Split on the host when the key is concrete, with traced slices under a
    # transform (`jax.jit`, `eqx.filter_eval_shape`).
    sizes = [math.prod(shape) for shape in a_shapes]
    draw = jr.uniform(key, (max(sum(sizes), 1),), jnp.float32, -1.0, 1.0)
    xp = jnp if isinstance(draw, jax.core.Tracer) else np
    draw = draw if xp is jnp else np.asarray(draw)
    offsets = np.cumsum([0, *sizes])
    weights = {}
    for m, shape, lo, hi in zip(matches, a_shapes, offsets[:-1], offsets[1:]):
        lay = m.layout
        dt = np.dtype(m.dtype if dtype is None else dtype)
        bound = 1.0 / math.sqrt(math.prod(lay.in_shape))
        a = jnp.asarray((draw[lo:hi] * bound).reshape(shape).astype(dt))
        b = jnp.asarray(xp.zeros(lay.factor_shapes(m.rank)[1], dt))
        weights[lay.path] = (a, b)
    vectors = _init_variants(tree, matches, dtype, xp)
    vera = _init_vera(matches, weights, dtype, key)
    return Adapter(
        weights=weights,
        layouts=tuple(m.layout for m in matches),
        ranks=tuple(m.rank for m in matches),
        alphas=tuple(
            float(m.rank) if m.rule.variant == "vera" else m.alpha for m in matches
        ),
        use_rslora=tuple(
            False if m.rule.variant == "vera" else m.use_rslora for m in matches
        ),
        vera=vera,
        **vectors,
    )


def _init_vera(matches, weights, dtype, key) -> dict[str, tuple[Array, Array]]:
    """VeRA's leaves as PEFT makes them: one pair of random projections for all
    of them, `A (max in, r)` and `B (r, max out)` (Kaiming-uniform as PEFT's,
    bounds `1/sqrt(max in)` and `1/sqrt(r)`), each leaf taking the top-left part
    (its flattened in- and out-features), the same in every stack entry; `d` starts
    at 0.1 and `b` at 0, so the model is unchanged. Replaces `weights` there with
    the projections."""
    veras = [m for m in matches if m.rule.variant == "vera"]
    if not veras:
        return {}
    ranks = {m.rank for m in veras}
    if len(ranks) > 1:
        raise ValueError(
            f"init_adapter: VeRA leaves share one pair of projections, so one rank; "
            f"the rules give ranks {sorted(ranks)}."
        )
    (r,) = ranks
    d_in = max(math.prod(m.layout.in_shape) for m in veras)
    d_out = max(math.prod(m.layout.out_shape) for m in veras)
    k_a, k_b = jr.split(jr.fold_in(key, 0x7E7A))
    proj_a = jr.uniform(k_a, (d_in, r), jnp.float32, -1.0, 1.0) / math.sqrt(d_in)
    proj_b = jr.uniform(k_b, (r, d_out), jnp.float32, -1.0, 1.0) / math.sqrt(r)
    vera = {}
    for m in veras:
        lay = m.layout
        dt = np.dtype(m.dtype if dtype is None else dtype)
        n_in, n_out = math.prod(lay.in_shape), math.prod(lay.out_shape)
        stack = lay.stack_shape
        a = proj_a[:n_in].reshape(*lay.in_shape, r).astype(dt)
        b = proj_b[:, :n_out].reshape(r, *lay.out_shape).astype(dt)
        a = jnp.broadcast_to(a, (*stack, *a.shape))
        b = jnp.broadcast_to(b, (*stack, *b.shape))
        weights[lay.path] = (a, b)
        vera[lay.path] = (
            jnp.full((*stack, r), 0.1, dt),
            jnp.zeros((*stack, *lay.out_shape), dt),
        )
    return vera


def _init_variants(tree: Any, matches, dtype, xp) -> dict[str, dict[str, Array]]:
    """The variants' vectors at their initial values (see `init_adapter`)."""
    vectors = _no_vectors()
    if all(m.rule.variant == "lora" for m in matches):
        return vectors
    leaves = dict(flatten_with_paths(tree)[0])
    for m in matches:
        lay, variant = m.layout, m.rule.variant
        dt = np.dtype(m.dtype if dtype is None else dtype)
        if variant == "dora":
            w = dense(leaves[lay.path])
            norm = jnp.sqrt(
                jnp.sum(jnp.square(w.astype(jnp.float32)), axis=lay.in_axes)
            )
            # The remaining axes are the stack axes then the out-axes, in w's
            # order; the vector is laid out as (*stack, *out) in the layout's.
            kept = [ax for ax in range(len(lay.shape)) if ax not in lay.in_axes]
            order = [kept.index(ax) for ax in (*lay.stack_axes, *lay.out_axes)]
            vectors["magnitudes"][lay.path] = jnp.transpose(norm, order).astype(dt)
        elif variant == "ia3":
            ones = xp.ones((*lay.stack_shape, *lay.out_shape), dt)
            vectors["out_scales"][lay.path] = jnp.asarray(ones)
        elif variant == "ia3_feedforward":
            ones = xp.ones((*lay.stack_shape, *lay.in_shape), dt)
            vectors["in_scales"][lay.path] = jnp.asarray(ones)
    return vectors
