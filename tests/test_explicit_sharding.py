"""JAX's explicit-sharding meshes (`AxisType.Explicit`): a tensor-parallel model
serves per-row adapters from a stack (strategy `auto`, which picks `gather`
there) and from an AdapterBank, differentiates through them, and trains tenants
with an AdapterTrainer; rows equal the model with each row's adapter merged
(float64 NumPy), gradients and training equal the same program on an Auto mesh.
Strategies that cannot place their results there are refused by name. Runs in a
subprocess with 8 simulated CPU devices."""

from __future__ import annotations

from tests.scripts import run_devices_json

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import PartitionSpec as P, AxisType
import lorax_arrays as lx

D, F, B = 16, 24, 8
rng = np.random.default_rng(0)
host = {
    "up": rng.normal(size=(D, F)).astype(np.float32) / D**0.5,
    "down": rng.normal(size=(F, D)).astype(np.float32) / F**0.5,
}
ads = [
    jax.tree.map(
        lambda a, i=i: np.asarray(a) + 0.1 * (i + 1),
        lx.init_adapter(host, lx.LoraRule("up|down", 4), key=jax.random.key(i)),
    )
    for i in range(3)
]
idx_host = np.array([0, 1, -1, 2, 1, 0, 2, -1], np.int32)
x_host = rng.normal(size=(B, D)).astype(np.float32)
y_host = rng.normal(size=(B, D)).astype(np.float32)
names = [None if i < 0 else f"n{i}" for i in idx_host]


EXPLICIT = [False]


def forward(p, x):
    h = jax.nn.gelu(x @ p["up"])
    # A row-parallel product: explicit sharding asks where its result goes.
    placed = P("data", None) if EXPLICIT[0] else None
    return jnp.einsum("bf,fd->bd", h, p["down"], out_sharding=placed)


def loss_fn(t, batch):
    x, y = batch
    return jnp.mean((forward(t, x) - y) ** 2, axis=-1)


def run(kind, serve_too):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)
    EXPLICIT[0] = kind == AxisType.Explicit
    out = {}
    with jax.set_mesh(mesh):
        params = {
            "up": jax.device_put(host["up"], P(None, "model")),
            "down": jax.device_put(host["down"], P("model", None)),
        }
        x = jax.device_put(x_host, P("data"))
        y = jax.device_put(y_host, P("data"))
        idx = jax.device_put(idx_host, P("data"))
        stack = lx.stack_adapters(ads)
        if serve_too:
            serve_and_check(params, stack, idx, x, out)

        def loss(st):
            return jnp.sum(lx.quaxify(forward)(lx.loraify(params, st, idx), x) ** 2)

        g = jax.jit(jax.grad(loss))(stack)
        out["grad"] = np.asarray(g.weights["up"][1]).tolist()
        tr = lx.AdapterTrainer(
            params, [lx.LoraRule("up|down", 4)], slots=2, optimizer=optax.adam(1e-2)
        )
        tr.add("a", ads[0])
        tr.add("b", ads[1])
        rows = ["a", "b", None, "a", "b", "a", "b", None]
        losses = tr.step(loss_fn, (x, y), rows)
        out["losses"] = losses
        out["trained"] = np.asarray(tr.adapter("a").weights["down"][0]).tolist()
    return out


def serve_and_check(params, stack, idx, x, out):
    serve = jax.jit(
        lambda p, s, i, x: lx.quaxify(forward)(lx.loraify(p, s, i), x)
    )
    out["stack"] = np.asarray(serve(params, stack, idx, x)).tolist()
    bank = lx.AdapterBank(params, [lx.LoraRule("up|down", 4)], slots=4)
    for i, ad in enumerate(ads):
        bank.add(f"n{i}", ad)
    step = jax.jit(lambda p, s, x: lx.quaxify(forward)(lx.loraify(p, s), x))
    served = bank.served(bank.indices(names))
    out["bank"] = np.asarray(step(params, served, x)).tolist()
    try:
        jax.jit(
            lambda p, s, i, x: lx.quaxify(forward)(
                lx.loraify(p, s, i, strategy="dense"), x
            )
        )(params, stack, idx, x)
        out["dense"] = "served"
    except lx.UnsupportedOperationError as e:
        out["dense"] = str(e)


def reference():
    rows = []
    for b in range(B):
        p = {k: v.astype(np.float64) for k, v in host.items()}
        i = idx_host[b]
        if i >= 0:
            for path, (a, bb) in ads[i].weights.items():
                delta = np.float64(a) @ np.float64(bb)
                p[path] = p[path] + ads[i].scale(path) * delta
        h = x_host[b].astype(np.float64) @ p["up"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        rows.append(h @ p["down"])
    return np.stack(rows)


explicit, auto = run(AxisType.Explicit, True), run(AxisType.Auto, False)
ref = reference()
diff = lambda k: float(np.max(np.abs(np.subtract(explicit[k], auto[k]))))
print(json.dumps({
    "stack_err": float(np.max(np.abs(np.asarray(explicit["stack"]) - ref))),
    "bank_err": float(np.max(np.abs(np.asarray(explicit["bank"]) - ref))),
    "grad_diff": diff("grad"),
    "grad_size": float(np.max(np.abs(auto["grad"]))),
    "trained_diff": diff("trained"),
    "loss_diff": max(abs(explicit["losses"][k] - auto["losses"][k]) for k in "ab"),
    "dense": explicit["dense"],
}))
"""


def test_explicit_sharding_meshes_serve_and_train():
    r = run_devices_json(SCRIPT)
    assert r["stack_err"] < 1e-4 and r["bank_err"] < 1e-4, r
    assert r["grad_size"] > 0 and r["grad_diff"] < 1e-4 * r["grad_size"], r
    assert r["trained_diff"] < 1e-5 and r["loss_diff"] < 1e-5, r
    assert "explicit-sharding" in r["dense"] and "gather" in r["dense"], r
