"""An `AdapterBank` built on a tensor-parallel tree places its slots as the
weights are placed: `a` sharded as W's in-axes, `b` as W's out-axes, slot and rank
axes replicated. Loads and updates write in place per shard, served rows equal the
model with each row's adapter merged (float64 NumPy), the compiled serving step
gathers no base weight and no bank array (with a negative control that does), and
each device holds its share of the bank. Runs in a subprocess with 8 simulated
CPU devices."""

from __future__ import annotations

from tests.scripts import run_devices_json

SCRIPT = r"""
import json, re
import equinox as eqx
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import lorax_arrays as lx

D, F, B = 16, 24, 8
auto = (jax.sharding.AxisType.Auto,) * 2
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
rng = np.random.default_rng(0)
host = {
    "up": rng.normal(size=(D, F)).astype(np.float32) / D**0.5,     # column-parallel
    "down": rng.normal(size=(F, D)).astype(np.float32) / F**0.5,   # row-parallel
}
specs = {"up": P(None, "model"), "down": P("model", None)}
params = {
    k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()
}
rules = [lx.LoraRule("up|down", 4)]

def adapter(seed, rank):
    rule = lx.LoraRule("up|down", rank)
    fresh = lx.init_adapter(host, rule, key=jax.random.key(seed))
    r = np.random.default_rng(seed)
    w = {p: tuple(r.normal(size=np.shape(f)).astype(np.float32) for f in ab)
         for p, ab in fresh.weights.items()}
    return eqx.tree_at(lambda ad: ad.weights, fresh, w)

bank = lx.AdapterBank(params, rules, slots=4)
ads = {"a": adapter(1, 2), "b": adapter(2, 4), "c": adapter(3, 3)}
for n, ad in ads.items():
    bank.add(n, ad)

def forward(p, x):
    return jax.nn.gelu(x @ p["up"]) @ p["down"]

@jax.jit
def step(params, served, x):
    return lx.quaxify(forward)(lx.loraify(params, served), x)

names = ["a", "b", None, "c", "a", "b", "c", None]
x = rng.normal(size=(B, D)).astype(np.float32)
x = jax.device_put(x, NamedSharding(mesh, P("data")))
idx = bank.indices(names)
out = np.asarray(step(params, bank.served(idx), x))

def reference(names, ads):
    rows = []
    for i, n in enumerate(names):
        p = {k: v.astype(np.float64) for k, v in host.items()}
        if n is not None:
            for path, (a, b) in ads[n].weights.items():
                delta = np.float64(a) @ np.float64(b)
                p[path] = p[path] + ads[n].scale(path) * delta
        h = np.asarray(x, np.float64)[i] @ p["up"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        rows.append(h @ p["down"])
    return np.stack(rows)

err = float(np.max(np.abs(out - reference(names, ads))))
state = bank._device.state
a_up, b_up = state.factors["up"]
a_dn, b_dn = state.factors["down"]
spec = lambda arr: [None if s is None else str(s) for s in arr.sharding.spec]
specs_seen = {k: spec(v) for k, v in
              {"a_up": a_up, "b_up": b_up, "a_down": a_dn, "b_down": b_dn}.items()}
whole = {f"{D},{F}]", f"{F},{D}]"} | {
    ",".join(map(str, a.shape)) + "]" for a in (a_up, b_up, a_dn, b_dn)
}
shard_bytes = max(s.data.nbytes for s in b_up.addressable_shards)
b_up_bytes = b_up.nbytes
# In place per shard: an update writes the loaded slot without moving the arrays.
before = [s.data.unsafe_buffer_pointer() for s in b_up.addressable_shards]
ads["b"] = adapter(7, 4)
bank.update("b", ads["b"])
after_arr = bank._device.state.factors["up"][1]
after = [s.data.unsafe_buffer_pointer() for s in after_arr.addressable_shards]
idx = bank.indices(names)
out2 = np.asarray(step(params, bank.served(idx), x))
err2 = float(np.max(np.abs(out2 - reference(names, ads))))
# No all-gather of a whole base weight or a whole bank array.
hlo = step.lower(params, bank.served(idx), x).compile().as_text()
def whole_gathers(hlo):
    lines = re.findall(r"[^\n]*all-gather[^\n]*", hlo)
    return [ln for ln in lines if any(w in ln.split("all-gather")[0] for w in whole)]

gathers = whole_gathers(hlo)
control_fn = jax.jit(lambda t: t * 2, out_shardings=NamedSharding(mesh, P()))
control_hlo = control_fn.lower(after_arr).compile().as_text()
control = whole_gathers(control_hlo)
print(json.dumps({
    "devices": len(jax.devices()), "err": err, "err2": err2,
    **{"spec_" + k: v for k, v in specs_seen.items()},
    "in_place": before == after, "gathers": len(gathers), "control": len(control),
    "b_up_bytes": b_up_bytes, "b_up_shard_bytes": shard_bytes,
    "spec_after_update": spec(after_arr),
}))
"""


def test_a_bank_on_a_sharded_tree_is_sharded_like_it():
    r = run_devices_json(SCRIPT)
    assert r["devices"] == 8
    assert r["err"] < 1e-4 and r["err2"] < 1e-4, r
    # up (D, F) column-parallel: b (slots, R, F) on F, a (slots, D, R) on its
    # rank (fully sharded: nothing of the bank is replicated).
    assert r["spec_a_up"] == [None, None, "model"]
    assert r["spec_b_up"] == [None, None, "model"]
    # down (F, D) row-parallel: a (slots, F, R) on F, b (slots, R, D) on its rank.
    assert r["spec_a_down"] == [None, "model", None]
    assert r["spec_b_down"] == [None, "model", None]
    assert r["in_place"] and r["spec_after_update"] == r["spec_b_up"], r
    assert r["gathers"] == 0 and r["control"] > 0, r
    # Each device holds a quarter of the sharded factor (4-way model axis).
    assert r["b_up_shard_bytes"] * 4 == r["b_up_bytes"], r


TRAINER_SCRIPT = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import lorax_arrays as lx

D, F, B = 16, 24, 8
auto = (jax.sharding.AxisType.Auto,) * 2
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
rng = np.random.default_rng(0)
host = {
    "up": rng.normal(size=(D, F)).astype(np.float32) / D**0.5,
    "down": rng.normal(size=(F, D)).astype(np.float32) / F**0.5,
}
specs = {"up": P(None, "model"), "down": P("model", None)}
sharded = {
    k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()
}
rules = [lx.LoraRule("up|down", 4)]


def loss_fn(tree, batch):
    x, y = batch
    out = jax.nn.gelu(x @ tree["up"]) @ tree["down"]
    return jnp.mean((out - y) ** 2, axis=-1)


def train(params, batch):
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    trainer = lx.AdapterTrainer(params, rules, slots=3, optimizer=opt)
    trainer.add("a", key=jax.random.key(1), learning_rate=2e-2)
    trainer.add("b", key=jax.random.key(2), max_grad_norm=0.1)
    names = ["a", "b", None, "a", "b", "a", "b", None]
    for _ in range(3):
        losses = trainer.step(loss_fn, batch, names)
    return trainer, losses


x = rng.normal(size=(B, D)).astype(np.float32)
y = rng.normal(size=(B, D)).astype(np.float32)
one, one_losses = train(host, (jnp.asarray(x), jnp.asarray(y)))
batch = tuple(jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))
tp, tp_losses = train(sharded, batch)
err = max(
    float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
    for n in ("a", "b")
    for u, v in zip(
        jax.tree.leaves(one.adapter(n).weights), jax.tree.leaves(tp.adapter(n).weights)
    )
)
a_up, b_up = tp._params.factors["up"]
a_dn, b_dn = tp._params.factors["down"]
spec = lambda arr: [None if s is None else str(s) for s in arr.sharding.spec]
mu = [
    s for s in jax.tree.leaves(tp._opt_state)
    if getattr(s, "shape", None) == b_up.shape
]
# The compiled training step gathers no whole base weight and no whole slot array.
hlo = tp.lower(loss_fn, batch, ["a", "b", None, "a", "b", "a", "b", None])
hlo = hlo.compile().as_text()
whole = {f"{D},{F}]", f"{F},{D}]"} | {
    ",".join(map(str, x.shape)) + "]" for x in jax.tree.leaves(tp._params)
}
lines = re.findall(r"[^\n]*all-gather[^\n]*", hlo)
gathers = [ln for ln in lines if any(w in ln.split("all-gather")[0] for w in whole)]
print(json.dumps({
    "err": err, "gathers": len(gathers), "all_gathers": len(lines),
    "spec_b_up": spec(b_up), "spec_a_down": spec(a_dn), "spec_a_up": spec(a_up),
    "mu_specs": [spec(m) for m in mu],
}))
"""


def test_a_trainer_on_a_sharded_tree_is_sharded_like_it():
    r = run_devices_json(TRAINER_SCRIPT)
    # Slot axis first, then as the weight: b of the column-parallel `up` and a of
    # the row-parallel `down` are split over "model", the others on their rank.
    assert r["spec_b_up"] == [None, None, "model"]
    assert r["spec_a_down"] == [None, "model", None]
    assert r["spec_a_up"] == [None, None, "model"]  # fully sharded: on its rank
    # Adam's mu and nu for b_up are placed as b_up itself.
    assert r["mu_specs"] and all(s == [None, None, "model"] for s in r["mu_specs"])
    # Three steps on 8 devices equal three steps on one.
    assert r["err"] < 1e-5, r
    # The compiled step has collectives (the data-parallel rows' losses and
    # gradients), but gathers no whole base weight and no whole slot array.
    assert r["gathers"] == 0, r


def test_the_bank_per_device_falls_like_the_base():
    """`benchmarks/sharded_memory.py --quick`: bytes per device of the base
    weights and of a bank on 1, 2, 4, 8 devices."""
    rows = run_devices_json(
        "import runpy, sys\n"
        "sys.argv = ['sharded_memory', '--quick']\n"
        "runpy.run_module('benchmarks.sharded_memory', run_name='__main__')\n"
    )
    assert [r["devices"] for r in rows] == [1, 2, 4, 8]
    one = rows[0]
    for r in rows[1:]:
        base_share = r["base"] / one["base"]
        bank_share = r["bank"] / one["bank"]
        assert base_share == 1 / r["devices"]
        # Only the (paths, slots) scale matrices stay whole on every device.
        assert bank_share < base_share * 1.02, (r, one)
