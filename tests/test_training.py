"""Training adapters: gradients with respect to A and B only, against a plain-JAX
reference that builds each example's merged weight with `jnp.einsum`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import lorax_arrays as lx
from tests.model_helpers import randomize

D, H, E, B, T = 8, 12, 5, 6, 3
# Gradients: float32, sums over B*T rows of O(1) terms; the low-rank and the merged
# forms round differently, so compare with a relative 1e-4 (absolute 1e-5).
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
IDX_B = np.array([0, 2, -1, 1, 0, 2], np.int32)
IDX_BT = np.array(
    [[0, 1, 2], [2, -1, 0], [1, 1, -1], [0, 2, 2], [-1, 0, 1], [2, 0, -1]], np.int32
)


def raw_forward(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _raw_params():
    k1, k2 = jr.split(jr.key(0))
    return {
        "w1": jr.normal(k1, (D, H)) / np.sqrt(D),
        "b1": jnp.full((H,), 0.1),
        "w2": jr.normal(k2, (H, E)) / np.sqrt(H),
    }


def _stack(tree, rule_sets, seed, random_b=True):
    ads = []
    for j, rules in enumerate(rule_sets):
        ad = lx.init_adapter(tree, rules, key=jr.key(seed + j))
        ads.append(randomize(ad, seed + 100 + j, std=0.3) if random_b else ad)
    return lx.stack_adapters(ads)


RAW_RULES = [
    [lx.LoraRule("w1", 2)],
    [lx.LoraRule("w", 4, alpha=8.0)],
    [lx.LoraRule("w2", 8, alpha=4.0, use_rslora=True)],
]


def _factors(stack):
    return {p: stack.weights[p] for p in stack.paths}


def _merged_weight(w, a, b, s, i, out_in: bool):
    """One example's weight, written out by hand: w + s[i] * a[i] b[i] (or w)."""
    spec = "ir,ro->oi" if out_in else "ir,ro->io"
    delta = jnp.einsum(spec, a[i], b[i])
    return jnp.where(i >= 0, w + s[i] * delta, w)


def raw_reference_loss(factors, params, scales, idx, xs, ys):
    """Plain JAX: per example (or token), merge its weights, run, squared error."""
    xs2 = xs.reshape(-1, D)
    idx2 = jnp.broadcast_to(
        idx.reshape(idx.shape + (1,) * (xs.ndim - 1 - idx.ndim)), xs.shape[:-1]
    ).reshape(-1)

    def one(x, i):
        p = dict(params)
        for path, (a, b) in factors.items():
            p[path] = _merged_weight(params[path], a, b, scales[path], i, False)
        return raw_forward(p, x)

    out = jax.vmap(one)(xs2, idx2).reshape(ys.shape)
    return jnp.sum((out - ys) ** 2)


def _lx_loss(diff, static, xs, ys):
    tree = eqx.combine(diff, static)
    return jnp.sum((lx.quaxify(raw_forward)(tree, xs) - ys) ** 2)


@pytest.mark.parametrize("idx", [IDX_B, IDX_BT], ids=["per-example", "per-token"])
def test_raw_function_grads_match_reference(idx):
    params = _raw_params()
    stack = _stack(params, RAW_RULES, seed=1)
    xs = jr.normal(jr.key(2), (B, T, D))
    ys = jr.normal(jr.key(3), (B, T, E))
    lp = lx.loraify(params, stack, idx)
    diff, static = eqx.partition(lp, lx.adapter_mask(lp))
    # Only the factors are in the differentiable half.
    assert len(jax.tree.leaves(diff)) == 2 * len(stack.paths)
    assert diff["w1"].w is None and static["w1"].w is not None
    loss, g = jax.jit(jax.value_and_grad(_lx_loss))(diff, static, xs, ys)

    ref_loss, ref_g = jax.value_and_grad(raw_reference_loss)(
        _factors(stack), params, stack.scales, jnp.asarray(idx), xs, ys
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for path in stack.paths:
        ga, gb = ref_g[path]
        assert np.abs(np.asarray(gb)).max() > 1e-2  # non-trivial gradients
        np.testing.assert_allclose(g[path].a, ga, **GRAD_TOL)
        np.testing.assert_allclose(g[path].b, gb, **GRAD_TOL)


MLP_RULES = [
    [lx.LoraRule("layers/0", 2)],
    [lx.LoraRule("weight", 4, alpha=2.0)],
    [lx.LoraRule("layers/1", 8)],
]


@pytest.fixture(scope="module")
def mlp():
    return eqx.nn.MLP(D, E, H, 1, activation=jnp.tanh, key=jr.key(4))


def mlp_reference_loss(factors, mlp, scales, idx, xs, ys):
    def one(x, i):
        weights = []
        for j, layer in enumerate(mlp.layers):
            path = f"layers/{j}/weight"
            w = layer.weight
            if path in factors:
                a, b = factors[path]
                w = _merged_weight(w, a, b, scales[path], i, True)
            weights.append(w)
        model = eqx.tree_at(lambda m: [lay.weight for lay in m.layers], mlp, weights)
        return model(x)

    return jnp.sum((jax.vmap(one)(xs, idx) - ys) ** 2)


@eqx.filter_jit
@eqx.filter_value_and_grad
def _mlp_loss_outside(diff, static, xs, ys):
    model = eqx.combine(diff, static)
    out = lx.quaxify(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))(model, xs)
    return jnp.sum((out - ys) ** 2)


def test_eqx_mlp_grads_match_reference(mlp):
    stack = _stack(mlp, MLP_RULES, seed=5)
    xs = jr.normal(jr.key(6), (B, D))
    ys = jr.normal(jr.key(7), (B, E))
    lm = lx.loraify(mlp, stack, IDX_B)
    diff, static = eqx.partition(lm, lx.adapter_mask(lm))
    loss, g = _mlp_loss_outside(diff, static, xs, ys)
    ref_loss, ref_g = jax.value_and_grad(mlp_reference_loss)(
        _factors(stack), mlp, stack.scales, jnp.asarray(IDX_B), xs, ys
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for j in range(2):
        path = f"layers/{j}/weight"
        ga, gb = ref_g[path]
        np.testing.assert_allclose(g.layers[j].weight.a, ga, **GRAD_TOL)
        np.testing.assert_allclose(g.layers[j].weight.b, gb, **GRAD_TOL)
        assert g.layers[j].weight.w is None
        assert g.layers[j].bias is None


def _raw_loss_inside(tree, xs, idx, ys):
    """quaxify inside vmap; the tree itself holds no indices (and no int leaves)."""

    def one(p, x, i):
        return lx.quaxify(raw_forward)(lx.with_indices(p, i), x)

    out = jax.vmap(one, in_axes=(None, 0, 0))(tree, xs, idx)
    return jnp.sum((out - ys) ** 2)


def test_base_weight_gets_no_gradient(mlp):
    params = _raw_params()
    stack = _stack(params, RAW_RULES, seed=8)
    xs = jr.normal(jr.key(9), (B, T, D))
    ys = jr.normal(jr.key(10), (B, T, E))
    idx = jnp.asarray(IDX_B)

    # The partition's differentiable half holds no base weight at all ...
    lp = lx.loraify(params, stack, idx)
    diff, static = eqx.partition(lp, lx.adapter_mask(lp))
    g_part = eqx.filter_jit(jax.grad(_lx_loss))(diff, static, xs, ys)
    assert all(diff[p].w is None and g_part[p].w is None for p in stack.paths)

    # ... and plain jax.grad over the whole loraified tree gives w exactly zero
    # (here the indices travel with the examples, so the tree has no int leaves).
    g = jax.jit(jax.grad(_raw_loss_inside))(lx.loraify(params, stack), xs, idx, ys)
    assert np.abs(np.asarray(g["b1"])).max() > 1e-3  # non-adapted leaves do train
    for p in stack.paths:
        np.testing.assert_array_equal(g[p].w, 0.0)
        np.testing.assert_allclose(g[p].a, g_part[p].a, **GRAD_TOL)
        np.testing.assert_allclose(g[p].b, g_part[p].b, **GRAD_TOL)
        assert np.abs(np.asarray(g[p].b)).max() > 1e-3

    # With indices inside the tree: jax.grad(allow_int=True).
    def loss(tree):
        return jnp.sum((lx.quaxify(raw_forward)(tree, xs) - ys) ** 2)

    g_int = eqx.filter_jit(jax.grad(loss, allow_int=True))(lp)
    for p in stack.paths:
        np.testing.assert_array_equal(g_int[p].w, 0.0)
        np.testing.assert_allclose(g_int[p].a, g_part[p].a, **GRAD_TOL)

    # An Equinox model (non-array leaves too): eqx.filter_grad.
    mstack = _stack(mlp, MLP_RULES, seed=18)
    lm = lx.loraify(mlp, mstack, idx)

    def mlp_loss(model):
        out = lx.quaxify(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))(
            model, xs[:, 0]
        )
        return jnp.sum((out - ys[:, 0]) ** 2)

    g_eqx = eqx.filter_jit(eqx.filter_grad(mlp_loss))(lm)
    for layer in g_eqx.layers:
        np.testing.assert_array_equal(layer.weight.w, 0.0)
        assert np.abs(np.asarray(layer.weight.b)).max() > 1e-3


def test_adapter_grads_come_only_from_its_own_rows():
    params = _raw_params()
    stack = _stack(params, RAW_RULES, seed=11)
    idx = np.array([-1, 1, -1, 1, 2, 2], np.int32)  # adapter 0 never used
    xs = jr.normal(jr.key(12), (B, D))
    ys = jr.normal(jr.key(13), (B, E))
    lp = lx.loraify(params, stack, idx)
    diff, static = eqx.partition(lp, lx.adapter_mask(lp))
    grad = jax.jit(jax.grad(_lx_loss))
    g = grad(diff, static, xs, ys)
    for path in stack.paths:
        # Base rows (-1) clip to adapter 0 internally; none of it may leak.
        np.testing.assert_array_equal(g[path].a[0], 0.0)
        np.testing.assert_array_equal(g[path].b[0], 0.0)
    for j in (1, 2):
        rows = idx == j
        # The loss of adapter j's rows alone: other rows' residuals masked out.
        keep = jnp.asarray(rows)[:, None]
        ys_masked = jnp.where(keep, ys, 0.0)

        def own_loss(d, ys_masked=ys_masked, keep=keep):
            t = eqx.combine(d, static)
            out = lx.quaxify(raw_forward)(t, xs)
            return jnp.sum(jnp.where(keep, out - ys_masked, 0.0) ** 2)

        g_own = jax.grad(own_loss)(diff)
        for path in stack.paths:
            if stack.ranks[stack.paths.index(path)][j] == 0:
                continue
            np.testing.assert_allclose(g[path].a[j], g_own[path].a[j], **GRAD_TOL)
            np.testing.assert_allclose(g[path].b[j], g_own[path].b[j], **GRAD_TOL)
            assert np.abs(np.asarray(g[path].b[j])).max() > 1e-3


def test_adam_trains_two_adapters_in_one_batch():
    params = _raw_params()
    # Fresh adapters (B = 0), as in real training; adapter 2 is never used.
    stack = _stack(params, RAW_RULES, seed=14, random_b=False)
    idx = jnp.asarray([0, 1, 0, 1, -1, 0, 1, -1], jnp.int32)
    xs = jr.normal(jr.key(15), (8, T, D))
    # Each adapter's task: a different fixed perturbation of the base model.
    teachers = [
        jax.tree.map(lambda w, k=k: w + 0.3 * jr.normal(k, w.shape), params)
        for k in jr.split(jr.key(16), 2)
    ]
    base_out = raw_forward(params, xs)
    ys = jnp.stack(
        [
            base_out[e] if i < 0 else raw_forward(teachers[int(i)], xs[e])
            for e, i in enumerate(np.asarray(idx))
        ]
    )
    lp = lx.loraify(params, stack, idx)
    diff, static = eqx.partition(lp, lx.adapter_mask(lp))
    opt = optax.adam(3e-2)
    state = opt.init(diff)

    def row_losses(d):
        out = lx.quaxify(raw_forward)(eqx.combine(d, static), xs)
        return jnp.sum((out - ys) ** 2, axis=(1, 2))

    @jax.jit
    def step(d, s):
        loss, g = jax.value_and_grad(lambda d: jnp.sum(row_losses(d)))(d)
        updates, s = opt.update(g, s, d)
        return optax.apply_updates(d, updates), s, loss, g

    before = np.asarray(jax.jit(row_losses)(diff))
    d = diff
    for n in range(40):
        d, state, _, g = step(d, state)
        if n == 0:
            for path in stack.paths:  # the unused adapter gets exactly zero grad
                np.testing.assert_array_equal(g[path].a[2], 0.0)
                np.testing.assert_array_equal(g[path].b[2], 0.0)
    after = np.asarray(jax.jit(row_losses)(d))
    idx_np = np.asarray(idx)
    for j in (0, 1):
        rows = idx_np == j
        assert after[rows].sum() < 0.5 * before[rows].sum(), (j, before, after)
    # Base rows see the base model throughout: their loss does not move (and is
    # ~0, since their targets are the base model's outputs).
    np.testing.assert_array_equal(after[idx_np < 0], before[idx_np < 0])
    assert np.all(after[idx_np < 0] < 1e-10)
    for path in stack.paths:
        a0, b0 = diff[path].a, diff[path].b
        np.testing.assert_array_equal(d[path].a[2], a0[2])
        np.testing.assert_array_equal(d[path].b[2], b0[2])
        assert not np.array_equal(np.asarray(d[path].b[0]), np.asarray(b0[0])) or (
            stack.ranks[stack.paths.index(path)][0] == 0
        )
