"""`jax.shard_map` inside a quaxified model (EasyDeL's fused MoE, Levanter's
Mixtral with a mesh run their experts in one): quax's trace has no shard_map
support, so this failed before any rule ran. Plain arrays pass through a shard_map
body while the adapted projections around it serve per-row adapters, and an adapted
weight passed *into* a body is split into its parts by the weight's in_spec and
served there: experts split over their stack axis (rows replicated, or split over a
second mesh axis), a weight split along its in-axis (the body's psum adds the
partial sums) or its out-axis. Each row equals its request run alone with its
adapter merged (float64 NumPy), and the unsharded run. The multi-device cases run in
a subprocess with 4 simulated CPU devices; what is refused is refused by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quax
from jax.sharding import PartitionSpec as P

import lorax_arrays as lx
from tests.scripts import run_devices_json

# Scripts that run in a subprocess define this themselves (they import no test
# module): an adapter with random, non-zero factors.
RANDOM_ADAPTER = r"""
def random_adapter(params, rules, key, seed):
    fresh = lx.init_adapter(params, rules, key=jax.random.key(key))
    r = np.random.default_rng(seed)
    weights = {
        p: tuple(r.normal(size=np.shape(f)).astype(np.float32) for f in ab)
        for p, ab in fresh.weights.items()
    }
    return eqx.tree_at(lambda ad: ad.weights, fresh, weights)
"""

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
    return random_adapter(params, rules, seed, seed + 10)


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
MODEL = MODEL.replace(
    "import lorax_arrays as lx\n", "import lorax_arrays as lx\n" + RANDOM_ADAPTER, 1
)


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


ADAPTED = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import lorax_arrays as lx

rng = np.random.default_rng(0)
N, R = 2, 3
SCALE = np.array([0.5, 2.0], np.float32)


def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)


def merged(w, a, b, i, ein, h=None, g=None):
    # float64 W + s_i * a_i b_i (then diag(h_i) . diag(g_i)), or W for i = -1
    w = w.astype(np.float64)
    if i < 0:
        return w
    a, b = a.astype(np.float64), b.astype(np.float64)
    w = w + SCALE[i] * np.einsum(ein, a, b)
    if h is not None:
        w = w * h[i].astype(np.float64) * g[i].astype(np.float64)
    return w


def rel(got, ref):
    return float(np.max(np.abs(got - ref) / (np.abs(ref) + 1e-3)))


def mesh(shape, names):
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(shape, names, axis_types=auto)


report = {"devices": len(jax.devices())}

# -- experts (E, D, F), stack axis 0 split over "e"; rows replicated ---------------
E, D, F, B = 4, 8, 6, 6
W, A, Bf = normal(E, D, F), normal(E, N, D, R), normal(E, N, R, F)
x, gate = normal(B, D), normal(D, E)
IDX = np.array([0, 1, -1, 1, 0, N], np.int32)  # the last one out of range


def experts_lora(idx):
    return lx.BatchedLoraArray(
        W, A, Bf, scale=SCALE, indices=idx, in_axes=1, out_axes=2, stack_axes=0
    )


def moe(w, x, m, row_axis=None):
    probs = jax.nn.softmax(x @ gate, axis=-1)

    def experts(x, probs, w):  # every expert densely, combined by the router
        return jnp.einsum("bef,be->bf", jnp.einsum("bd,edf->bef", x, w), probs)

    if m is None:
        return experts(x, probs, w)

    def body(x, probs, w):
        return jax.lax.psum(experts(x, probs, w), "e")

    rows = P(row_axis)
    return jax.shard_map(
        body,
        mesh=m,
        in_specs=(rows, P(row_axis, "e"), P("e", None, None)),
        out_specs=rows,
    )(x, probs, w)


def moe_ref(idx):
    out = []
    for r in range(B):
        if idx[r] >= N:
            out.append(np.full(F, np.nan))
            continue
        w = merged(W, A[:, idx[r]], Bf[:, idx[r]], idx[r], "edr,erf->edf")
        z = x[r].astype(np.float64) @ gate.astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        out.append(np.einsum("d,edf,e->f", x[r].astype(np.float64), w, p))
    return np.stack(out)


def run_moe(m, row_axis=None):
    fwd = lx.quaxify(lambda w, x: moe(w, x, m, row_axis))
    f = jax.jit(lambda idx, x: fwd(experts_lora(idx), x))
    return np.asarray(f(jnp.asarray(IDX), x))


ref = moe_ref(IDX)
unsharded = run_moe(None)
good = IDX < N
for name, m, rows in (
    ("experts", mesh((4,), ("e",)), None),
    ("experts_rows", mesh((2, 2), ("d", "e")), "d"),
):
    got = run_moe(m, rows)
    report[name] = {
        "err": rel(got[good], ref[good]),
        "vs_unsharded": float(np.max(np.abs(got[good] - unsharded[good]))),
        "nan_rows": np.isnan(got).any(axis=1).tolist(),
    }
report["unsharded_err"] = rel(unsharded[good], ref[good])

# gradient of the adapters' factors through the body, against the unsharded one
m4 = mesh((4,), ("e",))
idx_ok = jnp.asarray(np.where(IDX < N, IDX, 0))


def loss(a, b, m):
    lora = lx.BatchedLoraArray(
        W, a, b, scale=SCALE, indices=idx_ok, in_axes=1, out_axes=2, stack_axes=0
    )
    return jnp.sum(lx.quaxify(lambda w, x: moe(w, x, m))(lora, x) ** 2)


g_sh = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(A, Bf, m4)
g_un = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(A, Bf, None)
report["grad"] = max(
    float(np.max(np.abs(s - u)) / (np.max(np.abs(u)) + 1e-6))
    for s, u in zip(g_sh, g_un)
)
report["grad_nonzero"] = bool(np.abs(np.asarray(g_sh[0])).max() > 0)

# -- a (D, F) weight with its in-axis split over "t" (DoRA-style vectors too) -----
D2, F2, B2 = 8, 4, 5
W2, A2, B2f = normal(D2, F2), normal(N, D2, R), normal(N, R, F2)
H2 = 1 + 0.1 * normal(N, D2, 1)
G2 = 1 + 0.1 * normal(N, 1, F2)
x2 = normal(B2, D2)
idx2 = np.array([1, -1, 0, 1, 0], np.int32)
mt = mesh((4,), ("t",))


def dense_lora(variants):
    extra = dict(in_scale=H2, out_scale=G2) if variants else {}
    return lx.BatchedLoraArray(
        W2, A2, B2f, scale=SCALE, indices=idx2, in_axes=0, out_axes=1, **extra
    )


def ref2(variants):
    out = []
    for r in range(B2):
        i = idx2[r]
        hg = dict(h=H2[:, :, 0][:, :, None], g=G2) if variants else {}
        w = merged(W2, A2[i], B2f[i], i, "dr,rf->df", **hg)
        out.append(x2[r].astype(np.float64) @ w)
    return np.stack(out)


def in_split(w, x):
    body = lambda x, w: jax.lax.psum(x @ w, "t")  # noqa: E731
    return jax.shard_map(body, mesh=mt, in_specs=(P(None, "t"), P("t")), out_specs=P())(
        x, w
    )


def out_split(w, x):
    body = lambda x, w: x @ w  # noqa: E731
    return jax.shard_map(
        body, mesh=mt, in_specs=(P(), P(None, "t")), out_specs=P(None, "t")
    )(x, w)


plain = lambda w, x: x @ w  # noqa: E731
for variants in (False, True):
    unsh = np.asarray(jax.jit(lx.quaxify(plain))(dense_lora(variants), x2))
    for name, f in (("in_axis", in_split), ("out_axis", out_split)):
        got = np.asarray(jax.jit(lx.quaxify(f))(dense_lora(variants), x2))
        report[f"{name}{'_variants' if variants else ''}"] = {
            "err": rel(got, ref2(variants)),
            "vs_unsharded": float(np.max(np.abs(got - unsh))),
        }
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def adapted():
    """The report of the adapted-weights-in-a-body script on 4 devices."""
    report = run_devices_json(ADAPTED, devices=4)
    assert report["devices"] == 4
    return report


# The out-of-range index (the last row) gives NaN in its own row only.
NAN_ROWS = [False] * 5 + [True]


@pytest.mark.parametrize("case", ["experts", "experts_rows"])
def test_adapted_experts_split_over_their_stack_axis_equal_the_merged_rows(
    adapted, case
):
    # experts: (E, D, F) over "e", rows replicated; experts_rows: a (2, 2) mesh,
    # experts over "e" and the rows (and with them the indices) over "d".
    got = adapted[case]
    assert got["err"] < 2e-5, got
    assert got["vs_unsharded"] < 2e-5, got
    assert got["nan_rows"] == NAN_ROWS, got
    assert adapted["unsharded_err"] < 2e-5, adapted


@pytest.mark.parametrize("case", ["in_axis", "out_axis"])
@pytest.mark.parametrize("variants", ["", "_variants"])
def test_an_adapted_weight_split_along_its_in_or_out_axis_equals_the_merged_rows(
    adapted, case, variants
):
    # in_axis: the body's psum adds x_s @ w_s and (x_s @ a_s) @ b over the shards;
    # out_axis: each shard its columns of w and b. `_variants`: DoRA-style in/out
    # vectors, split like a and b.
    got = adapted[case + variants]
    assert got["err"] < 2e-5, got
    assert got["vs_unsharded"] < 2e-5, got


def test_the_gradient_through_a_body_equals_the_unsharded_one(adapted):
    assert adapted["grad_nonzero"]
    assert adapted["grad"] < 1e-5, adapted


def _small_weight(indices):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    a = rng.normal(size=(2, 4, 2)).astype(np.float32)
    b = rng.normal(size=(2, 2, 3)).astype(np.float32)
    lora = lx.BatchedLoraArray(
        w, a, b, scale=[0.5, 2.0], indices=indices, in_axes=0, out_axes=1
    )
    return lora, (w, a, b)


def test_an_adapted_weight_into_a_one_device_body_equals_the_merged_rows():
    idx = np.array([0, -1, 1, 0], np.int32)
    lora, (w, a, b) = _small_weight(idx)
    x = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    mesh = _one_device_mesh()

    def f(t, x):
        body = jax.shard_map(
            lambda x, w: x @ w, mesh=mesh, in_specs=(P("e"), P()), out_specs=P("e")
        )
        return body(x, t)

    got = np.asarray(jax.jit(lx.quaxify(f))(lora, x))
    s = np.array([0.5, 2.0])
    ref = np.stack(
        [
            x[r].astype(np.float64)
            @ (w + (s[i] * a[i].astype(np.float64) @ b[i] if i >= 0 else 0))
            for r, i in enumerate(idx)
        ]
    )
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


def test_rows_split_two_ways_in_one_body_are_refused():
    # The indices follow the rows; two arguments of the rows' shape, split
    # differently, leave it ambiguous which holds them.
    lora, _ = _small_weight(np.array([0, -1, 1, 0], np.int32))
    mesh = _one_device_mesh()

    def f(t, x):
        body = jax.shard_map(
            lambda x, y, w: x @ w + y[:, :3],
            mesh=mesh,
            in_specs=(P("e"), P(), P()),
            out_specs=P(),
        )
        return body(x, x, t)

    with pytest.raises(lx.UnsupportedOperationError) as err:
        lx.quaxify(f)(lora, jnp.ones((4, 4), jnp.float32))
    msg = str(err.value)
    assert "indices" in msg and "split differently" in msg
    assert "same in_spec on its row axes" in msg  # the fix
    assert "outside shard_map bodies only" not in msg  # the old refusal is gone


def test_a_body_returning_an_adapted_weight_is_refused():
    lora, _ = _small_weight(np.array([0, -1, 1, 0], np.int32))
    mesh = _one_device_mesh()

    def f(t, x):
        body = jax.shard_map(
            lambda x, w: w, mesh=mesh, in_specs=(P(), P()), out_specs=P()
        )
        return body(x, t)

    with pytest.raises(lx.UnsupportedOperationError, match="plain arrays") as err:
        lx.quaxify(f)(lora, jnp.ones((4, 4), jnp.float32))
    assert "Return the product" in str(err.value)


class Held(quax.ArrayValue):
    """Another library's quax value (a quantised weight, say)."""

    array: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self):
        return self.array


def test_other_quax_values_into_a_body_are_refused():
    w = Held(jnp.ones((4, 3)))
    mesh = _one_device_mesh()

    def f(w, x):
        body = jax.shard_map(
            lambda x, w: x @ w, mesh=mesh, in_specs=(P(), P()), out_specs=P()
        )
        return body(x, w)

    with pytest.raises(lx.UnsupportedOperationError, match="Held") as err:
        lx.quaxify(f)(w, jnp.ones((2, 4), jnp.float32))
    assert "pass the result in as a plain array" in str(err.value)


def test_an_adapted_weight_over_a_quantised_base_is_refused_in_a_body():
    lora = lx.BatchedLoraArray(
        Held(jnp.ones((4, 3))),
        jnp.ones((1, 4, 2)),
        jnp.ones((1, 2, 3)),
        scale=1.0,
        indices=np.array([0, -1], np.int32),
        in_axes=0,
        out_axes=1,
    )
    mesh = _one_device_mesh()

    def f(t, x):
        body = jax.shard_map(
            lambda x, w: x @ w, mesh=mesh, in_specs=(P(), P()), out_specs=P()
        )
        return body(x, t)

    with pytest.raises(lx.UnsupportedOperationError, match="base weight is a Held"):
        lx.quaxify(f)(lora, jnp.ones((2, 4), jnp.float32))


# A grouped-matmul MoE run inside shard_map (EasyDeL's fused_moe, Levanter's
# Mixtral with a mesh): the tokens split over "d", the experts' hidden axis over
# "t" (psummed), or the experts themselves split over "t" (expert parallel);
# per-request and per-token adapters on an attention-like projection outside the
# body and on the expert weights inside it. The hidden states carry their rows'
# positions into the body, offset to each shard's share of the indices, through
# the sort to the grouped matmuls.
RAGGED = r"""
import json
import equinox as eqx
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import lorax_arrays as lx

E, D, F, K, B, T = 4, 6, 8, 2, 4, 3
rng = np.random.default_rng(3)
params = {
    "wq": rng.normal(size=(D, D)).astype(np.float32) / D**0.5,
    "router": rng.normal(size=(D, E)).astype(np.float32),
    "up": rng.normal(size=(E, D, F)).astype(np.float32) / D**0.5,
    "down": rng.normal(size=(E, F, D)).astype(np.float32) / F**0.5,
}
rules = [
    lx.LoraRule("wq", 3),
    lx.LoraRule("up", 2, stack_axes=0, in_axes=1, out_axes=2),
    lx.LoraRule("down", 3, stack_axes=0, in_axes=1, out_axes=2),
]


def adapter(seed):
    return random_adapter(params, rules, seed, seed + 20)


adapters = [adapter(1), adapter(2)]
x = rng.normal(size=(B, T, D)).astype(np.float32)


def experts(p, h, split_experts):
    # Tensor parallel: every shard holds every expert, its share of their hidden
    # axis. Expert parallel (EasyDeL's and MaxText's ragged path): each shard
    # holds E / 2 experts, routes every token and keeps the token-slots on its
    # experts (the others sorted past the groups, where the grouped matmul
    # gives 0). Either way the shards' outputs are psummed.
    e_local = p["up"].shape[0]
    n = h.shape[0] * h.shape[1]
    t = h.reshape(n, D)
    probs, chosen = jax.lax.top_k(jax.nn.softmax(t @ p["router"]), K)
    first = jax.lax.axis_index("t") * e_local if split_experts else 0
    local = chosen.reshape(-1) - first
    mine = (local >= 0) & (local < e_local)
    key = jnp.where(mine, local, e_local)
    order = jnp.argsort(key)
    tokens = jnp.repeat(t, K, axis=0)[order]
    sizes = jnp.bincount(key, length=e_local).astype(jnp.int32)
    y = jax.lax.ragged_dot(jax.nn.gelu(jax.lax.ragged_dot(tokens, p["up"], sizes)),
                           p["down"], sizes)
    y = jnp.take(y, jnp.argsort(order), axis=0).reshape(n, K, D)
    weights = probs * mine.reshape(n, K)
    out = jnp.einsum("nkd,nk->nd", y, weights).reshape(h.shape)
    return jax.lax.psum(out, "t")


def forward(p, h, mesh, parallel="tensor"):
    h = h + jnp.tanh(h @ p["wq"])  # an adapted projection outside the body
    moe_p = {k: p[k] for k in ("router", "up", "down")}
    split_experts = parallel != "tensor"
    if split_experts:
        specs = {"router": P(), "up": P("t"), "down": P("t")}
    else:  # the experts' hidden axis split
        specs = {"router": P(), "up": P(None, None, "t"), "down": P(None, "t", None)}
    body = lambda p, h: experts(p, h, split_experts)  # noqa: E731
    return jax.shard_map(
        body, mesh=mesh, in_specs=(specs, P("d")), out_specs=P("d")
    )(moe_p, h)


def reference(idx):
    per_token = np.broadcast_to(idx.reshape(B, -1), (B, T))
    out = np.full((B, T, D), np.nan)
    for b in range(B):
        for t in range(T):
            i = per_token[b, t]
            if i >= len(adapters):
                continue
            p = {k: np.asarray(v, np.float64) for k, v in params.items()}
            if i >= 0:
                ad = adapters[i]
                for path, (a, bb) in ad.weights.items():
                    a, bb = np.float64(a), np.float64(bb)
                    delta = a @ bb if a.ndim == 2 else np.einsum("edr,erf->edf", a, bb)
                    p[path] = p[path] + ad.scale(path) * delta
            h = x[b, t].astype(np.float64)
            h = h + np.tanh(h @ p["wq"])
            z = h @ p["router"]
            pr = np.exp(z - z.max()); pr /= pr.sum()
            y = np.zeros(D)
            for e in np.argsort(-pr)[:K]:
                u = h @ p["up"][e]
                u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
                y += pr[e] * (u @ p["down"][e])
            out[b, t] = y
    return out


mesh = jax.make_mesh((2, 2), ("d", "t"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
report = {"devices": len(jax.devices())}
cases = {
    "per_request": np.array([1, -1, 0, 5], np.int32),  # 5: out of range, NaN rows
    "per_token": np.array([[0, 1, -1], [1, 1, 0], [5, 0, 1], [-1, 0, 1]], np.int32),
}
cases["per_token_expert_parallel"] = cases["per_token"]
for name, idx in cases.items():
    tree = lx.loraify(params, adapters, np.zeros(idx.shape, np.int32))
    parallel = "expert" if name.endswith("expert_parallel") else "tensor"
    step = jax.jit(lambda t, h, i: lx.quaxify(
        lambda t, h: forward(t, h, mesh, parallel))(lx.with_indices(t, i), h))
    got = np.asarray(step(tree, x, jnp.asarray(idx)))
    want = reference(idx)
    bad = np.isnan(want)
    err = float(np.max(np.abs(got[~bad] - want[~bad])) / np.max(np.abs(want[~bad])))
    report[name] = {"err": err, "nan_rows": bool(np.isnan(got[bad]).all()),
                    "bad": int(bad.any(-1).sum()),
                    "other_finite": bool(np.isfinite(got[~bad]).all())}
print(json.dumps(report))
"""
RAGGED = RAGGED.replace(
    "import lorax_arrays as lx\n", "import lorax_arrays as lx\n" + RANDOM_ADAPTER, 1
)


def test_per_row_experts_in_a_grouped_matmul_inside_shard_map():
    report = run_devices_json(RAGGED, devices=4)
    assert report["devices"] == 4
    for case in ("per_request", "per_token", "per_token_expert_parallel"):
        r = report[case]
        assert r["err"] < 1e-5, report
        assert r["bad"] > 0 and r["nan_rows"] and r["other_finite"], report
