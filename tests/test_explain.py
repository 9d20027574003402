"""`lx.explain_strategies`: which strategy each adapted product gets, and why."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lorax_arrays as lx
from tests.fast_init import random_adapters

D, H = 8, 16


@pytest.fixture(scope="module")
def served():
    mlp = eqx.nn.MLP(D, D, H, depth=2, key=jr.key(0))
    rules = [lx.LoraRule(r"layers/\d/weight", 2)]
    stack = lx.stack_adapters(random_adapters(mlp, [rules, rules, rules], seed=0))
    return lx.loraify(mlp, stack, jnp.array([0, 2, -1, 1]))


def _forward(model, x):
    return jax.vmap(model)(x)


def test_one_record_per_adapted_matmul(served):
    x = jnp.ones((4, D))
    got = lx.explain_strategies(_forward, served, x)
    assert len(got) == 3  # three Linear layers, in order
    assert [c.shapes["w"] for c in got] == [(H, D), (H, H), (D, H)]
    for choice in got:
        primitive, shapes, strategy, reason = choice  # a plain 4-tuple too
        assert primitive == "dot_general"
        assert strategy in ("gather", "segment", "dense")
        assert reason.startswith("auto:")
        assert shapes["G"] == 4 and shapes["n_adapters"] == 3 and shapes["rank"] == 2
        assert shapes["x"][0] == 4  # the batched activation


def _jaxpr(fn, *args):
    return str(eqx.filter_make_jaxpr(fn)(*args)[0])


def test_agrees_with_the_strategy_the_program_uses(served):
    # The recorded strategy is the one in the traced program: forcing it gives the
    # same jaxpr as auto does.
    x = jnp.ones((4, D))
    (first, *_) = lx.explain_strategies(_forward, served, x)
    auto = _jaxpr(lx.quaxify(_forward), served, x)
    forced = _jaxpr(lx.quaxify(_forward, strategy=first.strategy), served, x)
    others = {"gather", "segment", "dense"} - {first.strategy}
    assert auto == forced
    for other in others:
        assert _jaxpr(lx.quaxify(_forward, strategy=other), served, x) != auto


def test_reports_overrides_and_array_strategies(served):
    x = jnp.ones((4, D))
    got = lx.explain_strategies(lx.quaxify(_forward, strategy="segment"), served, x)
    assert {c.strategy for c in got} == {"segment"}
    assert all("forced for this call" in c.reason for c in got)
    dense = jax.tree.map(
        lambda v: (
            v.replace(strategy="dense") if isinstance(v, lx.BatchedLoraArray) else v
        ),
        served,
        is_leaf=lambda v: isinstance(v, lx.BatchedLoraArray),
    )
    got = lx.explain_strategies(_forward, dense, x)
    assert [c.strategy for c in got] == ["dense"] * 3
    assert all("strategy='dense'" in c.reason for c in got)


def test_computes_nothing_and_records_nothing_outside(served):
    x = jnp.ones((4, D))
    lx.explain_strategies(_forward, served, x)
    # Outside the call nothing is recorded; a later jit still runs normally.
    out = eqx.filter_jit(lx.quaxify(_forward))(served, x)
    assert out.shape == (4, D) and np.all(np.isfinite(np.asarray(out)))
    assert lx.explain_strategies(lambda m, x: x, served, x) == []
