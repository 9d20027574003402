"""Random weights and adapters without eager JAX initialisers.

Eager `jax.random` calls compile one small program per new shape; for the
transformer-sized trees of tests/test_stacks.py and tests/test_architectures.py that
dominated the runtime on CPU. These helpers take the structure from
`eval_shape` (so `lx.init_adapter` still decides paths, layouts, ranks and alphas)
and draw every value with NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lorax_arrays as lx


def numpy_init(shapes: Any, seed: int, std: float = 0.3) -> Any:
    """Every `jax.ShapeDtypeStruct` leaf replaced by `std * N(0, 1)` values."""
    rng = np.random.default_rng(seed)

    def draw(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jnp.asarray((rng.standard_normal(x.shape) * std).astype(x.dtype))

    return jax.tree.map(draw, shapes)


def random_adapters(
    tree: Any,
    rule_sets: Sequence[Sequence[lx.LoraRule] | lx.LoraRule],
    seed: int,
    std: float = 0.3,
) -> list[lx.Adapter]:
    """One adapter per rule set (as `lx.init_adapter` lays it out), with random
    non-zero A and B."""
    out = []
    for j, rules in enumerate(rule_sets):
        shapes = eqx.filter_eval_shape(lx.init_adapter, tree, rules, key=jr.key(j))
        out.append(numpy_init(shapes, seed + j, std))
    return out
