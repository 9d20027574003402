"""`jax.shard_map` inside a quaxified model (EasyDeL's fused MoE, Levanter's
Mixtral with a mesh run their experts in one): quax's trace has no shard_map
support, so this failed before any rule ran. Plain arrays now pass through a
shard_map body while the adapted projections around it serve per-row adapters,
each row equal to its request run alone with its adapter merged (float64 NumPy);
an adapted weight passed into a body is refused by name. The multi-device case
runs in a subprocess with 4 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import lorax_arrays as lx
from tests.scripts import run_devices_json

# A MoE block: an adapted projection, experts in a shard_map over the expert axis
# (tokens replicated, each shard its experts' share, summed), an adapted head.
MODEL = r"""
import equinox as eqx
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import lorax_arrays as lx

D, E, F, B = 8, 4, 6, 5
rng = np.random.default_rng(0)
params = {
    "wq": rng.normal(size=(D, D)).astype(np.float32) / D**0.5,
    "experts": rng.normal(size=(E, D, F)).astype(np.float32) / D**0.5,
    "gate": rng.normal(size=(D, E)).astype(np.float32),
    "head": rng.normal(size=(F, D)).astype(np.float32) / F**0.5,
}
x = rng.normal(size=(B, D)).astype(np.float32)
idx = np.array([0, 1, -1, 1, 0], np.int32)
rules = [lx.LoraRule("wq", 2), lx.LoraRule("head", 3)]


def adapter(seed):
    fresh = lx.init_adapter(params, rules, key=jax.random.key(seed))
    r = np.random.default_rng(seed + 10)
    weights = {
        p: tuple(r.normal(size=np.shape(f)).astype(np.float32) for f in ab)
        for p, ab in fresh.weights.items()
    }
    return eqx.tree_at(lambda ad: ad.weights, fresh, weights)


adapters = [adapter(1), adapter(2)]


def forward(p, x, mesh):
    h = jnp.tanh(x @ p["wq"])
    probs = jax.nn.softmax(h @ p["gate"], axis=-1)

    def experts(h, probs, w):
        local = jnp.einsum("bd,edf,be->bf", h, w, probs)
        return jax.lax.psum(local, "e")

    moe = jax.shard_map(
        experts, mesh=mesh, in_specs=(P(), P(None, "e"), P("e")), out_specs=P()
    )(h, probs, p["experts"])
    return moe @ p["head"]


def reference():
    out = []
    for b in range(B):
        p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        if idx[b] >= 0:
            ad = adapters[idx[b]]
            for path, (a, bb) in ad.weights.items():
                a, bb = np.asarray(a, np.float64), np.asarray(bb, np.float64)
                p[path] = p[path] + ad.scale(path) * (a @ bb)
        h = np.tanh(x[b].astype(np.float64) @ p["wq"])
        z = h @ p["gate"]
        probs = np.exp(z - z.max()); probs /= probs.sum()
        moe = np.einsum("d,edf,e->f", h, p["experts"], probs)
        out.append(moe @ p["head"])
    return np.stack(out)


def run(mesh):
    tree = lx.loraify(params, adapters, idx)
    got = jax.jit(lx.quaxify(lambda t, x: forward(t, x, mesh)))(tree, x)
    return np.asarray(got)
"""

SCRIPT = (
    """
import json
"""
    + MODEL
    + """
mesh = jax.make_mesh((4,), ("e",), axis_types=(jax.sharding.AxisType.Auto,))
got = run(mesh)
err = float(np.max(np.abs(got - reference()) / (np.abs(reference()) + 1e-3)))
print(json.dumps({"devices": len(jax.devices()), "err": err}))
"""
)


def _one_device_mesh():
    return jax.make_mesh((1,), ("e",), axis_types=(jax.sharding.AxisType.Auto,))


def test_plain_arrays_pass_through_shard_map_on_one_device():
    env: dict = {}
    exec(MODEL, env)
    got = env["run"](_one_device_mesh())
    np.testing.assert_allclose(got, env["reference"](), rtol=2e-5, atol=2e-5)


def test_shard_map_over_four_devices_equals_the_merged_rows():
    report = run_devices_json(SCRIPT, devices=4)
    assert report["devices"] == 4
    assert report["err"] < 2e-5, report


def test_an_adapted_weight_into_a_shard_map_body_is_refused():
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    params = {"w": w}
    ad = lx.init_adapter(params, lx.LoraRule("w", 2), key=jax.random.key(0))
    tree = lx.loraify(params, [ad], np.array([0, -1], np.int32))
    mesh = _one_device_mesh()

    def f(t, x):
        body = jax.shard_map(
            lambda x, w: x @ w, mesh=mesh, in_specs=(P(), P()), out_specs=P()
        )
        return body(x, t["w"])

    with pytest.raises(lx.UnsupportedOperationError, match="shard_map"):
        lx.quaxify(f)(tree, jnp.ones((2, 4), jnp.float32))
