"""Changing which adapter each request uses, or the adapters' values, must not
retrace a compiled forward pass; changing shapes must (so the counter works)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lorax_arrays as lx
from tests.fast_init import random_adapters

D, T, B = 8, 3, 4


def _params():
    k1, k2 = jr.split(jr.key(0))
    return {"w1": jr.normal(k1, (D, 6)), "w2": jr.normal(k2, (6, 5))}


RULES = [[lx.LoraRule("w", 2)], [lx.LoraRule("w1", 4)], [lx.LoraRule("w2", 8)]]


def test_jax_jit_does_not_retrace_on_new_indices_or_adapter_values():
    traces = []

    def body(p, x):
        return jnp.einsum("bth,ho->bto", jnp.tanh(x @ p["w1"]), p["w2"])

    def f(p, x):
        traces.append(1)
        return body(p, x)

    fwd = jax.jit(lx.quaxify(f))
    params = _params()
    xs = jr.normal(jr.key(1), (B, T, D))
    stack = lx.stack_adapters(random_adapters(params, RULES, seed=0))
    lp = lx.loraify(params, stack, [0, 1, 2, -1])
    out0 = fwd(lp, xs)
    assert len(traces) == 1

    # New indices, same shape: no retrace, and the result follows the indices.
    out1 = fwd(lx.with_indices(lp, [2, 2, -1, 0]), xs)
    out2 = fwd(lx.with_indices(lp, jnp.array([1, 0, 0, 1], jnp.int32)), xs)
    assert len(traces) == 1
    assert not np.allclose(out0, out1) and not np.allclose(out1, out2)
    np.testing.assert_allclose(out1[2], body(params, xs)[2], rtol=1e-5, atol=1e-5)

    # New adapter values (same ranks, new alphas too): no retrace.
    rules = [
        [lx.LoraRule("w", 2, alpha=7.0)],
        [lx.LoraRule("w1", 4)],
        [lx.LoraRule("w2", 8, use_rslora=True)],
    ]
    stack2 = lx.stack_adapters(random_adapters(params, rules, seed=50))
    out3 = fwd(lx.loraify(params, stack2, [0, 1, 2, -1]), xs)
    assert len(traces) == 1
    assert not np.allclose(out0, out3)

    # A different indices shape (per-token) does retrace: the counter works.
    fwd(lx.with_indices(lp, np.zeros((B, T), np.int32)), xs)
    assert len(traces) == 2
    # So does a different padded rank.
    stack3 = lx.stack_adapters(random_adapters(params, [lx.LoraRule("w", 3)], seed=9))
    fwd(lx.loraify(params, stack3, [0, 0, -1, 0]), xs)
    assert len(traces) == 3


def test_filter_jit_vmap_outside_quaxify_does_not_retrace():
    traces = []
    mlp = eqx.nn.MLP(D, 5, 8, 2, key=jr.key(2))

    def call(m, x):
        traces.append(1)
        return m(x)

    fwd = eqx.filter_jit(lx.quaxify(jax.vmap(call, in_axes=(None, 0))))
    rules = [
        [lx.LoraRule("weight", 2)],
        [lx.LoraRule("layers/1", 4)],
        [lx.LoraRule("layers/[02]", 8)],
    ]
    stack = lx.stack_adapters(random_adapters(mlp, rules, seed=3))
    xs = jr.normal(jr.key(4), (B, D))
    lm = lx.loraify(mlp, stack, [0, 1, 2, -1])
    outs = [fwd(lm, xs)]
    assert len(traces) == 1
    for idx in ([2, 1, 0, 0], [-1, -1, -1, -1], [1, 1, 2, 2]):
        outs.append(fwd(lx.with_indices(lm, idx), xs))
    stack2 = lx.stack_adapters(random_adapters(mlp, rules, seed=30))
    outs.append(fwd(lx.loraify(mlp, stack2, [0, 1, 2, -1]), xs))
    assert len(traces) == 1
    np.testing.assert_allclose(outs[2], jax.vmap(mlp)(xs), rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[0], outs[-1])
    # A batch of a different size retraces.
    fwd(lx.with_indices(lm, [0, 1]), xs[:2])
    assert len(traces) == 2


def test_filter_jit_quaxify_inside_vmap_does_not_retrace():
    traces = []
    mlp = eqx.nn.MLP(D, 5, 8, 1, key=jr.key(5))

    def call(m, x):
        traces.append(1)
        return m(x)

    @eqx.filter_jit
    def fwd(model, xs, idx):
        def one(m, x, i):
            return lx.quaxify(call)(lx.with_indices(m, i), x)

        return jax.vmap(one, in_axes=(None, 0, 0))(model, xs, idx)

    rules = [[lx.LoraRule("weight", 2)], [lx.LoraRule("layers/1", 4)]]
    xs = jr.normal(jr.key(6), (B, D))
    lm = lx.loraify(mlp, lx.stack_adapters(random_adapters(mlp, rules, seed=7)))
    fwd(lm, xs, jnp.array([0, 1, -1, 0], jnp.int32))
    fwd(lm, xs, jnp.array([1, 1, 1, 1], jnp.int32))
    lm2 = lx.loraify(mlp, lx.stack_adapters(random_adapters(mlp, rules, seed=8)))
    fwd(lm2, xs, jnp.array([-1, 0, 1, 0], jnp.int32))
    assert len(traces) == 1
    fwd(lm, xs[:3], jnp.array([0, 1, -1], jnp.int32))
    assert len(traces) == 2
