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


def test_checkpoint_name_on_weights_in_a_scanned_remat_block():
    """Levanter names weights inside its scanned blocks
    (`jax.ad_checkpoint.checkpoint_name`) and remats with a policy by name: the
    adapted weight is named as a whole (weight, factors, scales), its value and
    gradient are the dense per-example ones, and its product stays low rank."""
    from jax.ad_checkpoint import checkpoint_name

    lora = _lora(stacked=True)  # (L=2, D=6, F=5), four examples
    x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    proj = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
    policy = jax.checkpoint_policies.save_only_these_names("w")

    def f(w, x):
        @jax.checkpoint
        def block(h, w_layer):
            w_layer = checkpoint_name(w_layer, "w")
            return jnp.tanh(h @ w_layer) @ proj, None

        block = jax.checkpoint(block, policy=policy)
        return jax.lax.scan(block, x, w)[0]

    got = np.asarray(jax.jit(lx.quaxify(f))(lora, x))
    w_e = _dense(lora)  # (4, L, D, F)
    h = x.astype(np.float64)
    for layer in range(2):
        h = np.tanh(np.einsum("bd,bdf->bf", h, w_e[:, layer])) @ proj
    np.testing.assert_allclose(got, h, rtol=2e-5, atol=1e-5)

    jaxpr = jax.make_jaxpr(lx.quaxify(f))(lora, x)
    names = _eqns(jaxpr, "name")
    assert len(names) >= 3  # w, a, b (and scales) each carry the name
    assert all(e.params["name"] == "w" for e in names)
    # Low rank: no per-example weight, (4, 6, 5) or (4, 2, 6, 5), is built.
    shapes = {tuple(v.aval.shape) for e in walk_eqns(jaxpr) for v in e.outvars}
    assert not shapes & {(4, 6, 5), (4, 2, 6, 5)}

    def grads(fn):
        def loss(a, b):
            return jnp.sum(lx.quaxify(fn)(lora.replace(a=a, b=b), x) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(lora.a, lora.b)

    def unnamed(w, x):
        step = lambda h, w_layer: (jnp.tanh(h @ w_layer) @ proj, None)  # noqa: E731
        return jax.lax.scan(step, x, w)[0]

    for got_g, want_g in zip(grads(f), grads(unnamed)):
        assert np.abs(np.asarray(want_g)).sum() > 0
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6)
