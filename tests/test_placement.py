"""`jax.device_put` and `jax.lax.with_sharding_constraint` on an adapted weight
inside the quaxified call: the value is unchanged (compared with the dense
per-example product in float64 NumPy), the low-rank form is kept (no dense
weight), and the factors are placed as the weight's axes say."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lorax_arrays as lx
from tests.helpers import dense_weight_per_example, make_lora, walk_eqns

MESH = jax.make_mesh(
    (1,),
    ("model",),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=jax.devices()[:1],
)


def _lora(stacked: bool):
    """`(L, D, F)` with the layer axis a stack axis, or `(D, F)`; four examples."""
    axes = (
        dict(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
        if stacked
        else dict(in_axes=(0,), out_axes=(1,))
    )
    shape = (2, 6, 5) if stacked else (6, 5)
    idx = np.array([0, 2, -1, 1], np.int32)
    return make_lora(shape, **axes, n=3, rank=2, indices=idx)[0]


def _dense(lora, layer=None):
    """Per-example dense weights `w + s_i a_i b_i` in float64 NumPy."""
    parts = (lora.w, lora.a, lora.b, lora.scale, lora.indices)
    w_e = dense_weight_per_example(*parts, lora.in_axes, lora.out_axes, lora.stack_axes)
    return w_e if layer is None else w_e[:, layer]


def _eqns(jaxpr, name):
    return [e for e in walk_eqns(jaxpr) if e.primitive.name == name]


@pytest.mark.parametrize("stacked", [False, True])
def test_sharding_constraint_keeps_low_rank_and_shards_factors(stacked):
    lora = _lora(stacked)
    spec = P(None, None, "model") if stacked else P(None, "model")
    sharding = NamedSharding(MESH, spec)
    x = np.random.default_rng(1).normal(size=(lora.indices.shape[0], 6))

    def f(w, x):
        w = jax.lax.with_sharding_constraint(w, sharding)
        return jnp.einsum("bd,df->bf", x, w[0] if stacked else w)

    got = np.asarray(jax.jit(lx.quaxify(f))(lora, x.astype(np.float32)))
    dense = _dense(lora, 0 if stacked else None)
    want = np.einsum("bd,bdf->bf", x, dense)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

    jaxpr = jax.make_jaxpr(lx.quaxify(f))(lora, x.astype(np.float32))
    specs = {
        tuple(e.invars[0].aval.shape): e.params["sharding"].spec
        for e in _eqns(jaxpr.jaxpr, "sharding_constraint")
    }
    a_spec = (None, None, None, None) if stacked else (None, None, None)
    b_spec = (None, None, None, "model") if stacked else (None, None, "model")
    assert tuple(specs[tuple(lora.w.shape)]) == tuple(spec)
    assert tuple(specs[tuple(lora.a.shape)]) == a_spec
    assert tuple(specs[tuple(lora.b.shape)]) == b_spec
    # Never the dense per-example weight.
    n = lora.indices.shape[0]
    dense_shape = (n, *lora.w.shape)
    shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
    assert dense_shape not in shapes


def test_sharding_constraint_on_the_in_axis_goes_to_a():
    lora = _lora(False)
    spec = P("model", None)

    def f(w, x):
        return x @ jax.lax.with_sharding_constraint(w, NamedSharding(MESH, spec))

    x = jnp.ones((lora.indices.shape[0], 6))
    jaxpr = jax.make_jaxpr(lx.quaxify(f))(lora, x)
    specs = {
        tuple(e.invars[0].aval.shape): tuple(e.params["sharding"].spec)
        for e in _eqns(jaxpr.jaxpr, "sharding_constraint")
    }
    assert specs[tuple(lora.a.shape)] == (None, "model", None)
    assert specs[tuple(lora.b.shape)] == (None, None, None)


def test_device_put_to_memory_space_keeps_value():
    lora = _lora(False)
    x = np.random.default_rng(2).normal(size=(lora.indices.shape[0], 6))

    def f(w, x):
        return x @ jax.device_put(w, jax.memory.Space.Device)

    got = np.asarray(jax.jit(lx.quaxify(f))(lora, x.astype(np.float32)))
    want = np.einsum("bd,bdf->bf", x, _dense(lora))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    jaxpr = jax.make_jaxpr(lx.quaxify(f))(lora, x.astype(np.float32))
    moved = {
        tuple(v.aval.shape) for e in _eqns(jaxpr.jaxpr, "device_put") for v in e.invars
    }
    assert {tuple(lora.w.shape), tuple(lora.a.shape), tuple(lora.b.shape)} <= moved


def test_device_put_of_several_values_at_once():
    lora = _lora(False)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(lora.indices.shape[0], 6)))

    def f(w, x):
        w, x = jax.device_put((w, x), jax.devices()[0])
        return x @ w

    got = np.asarray(lx.quaxify(f)(lora, x.astype(jnp.float32)))
    want = np.einsum("bd,bdf->bf", np.asarray(x, np.float64), _dense(lora))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
