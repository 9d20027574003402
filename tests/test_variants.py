"""The LoRA variants (DoRA, IA3; VeRA is a LoRA) served per row in one batch.

Adapter `i` stands for `diag(h_i) (W + s_i A_i B_i) diag(g_i)`; every check is
against that dense per-example weight built in float64 NumPy (never `lx.merge`),
with random non-zero factors and vectors, base rows (-1) mixed in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from tests.helpers import (
    dense_weight_per_example,
    draw_axes,
    draw_roles,
    nonzero,
    random_lora,
    reference_dot_general,
)

TOL = dict(rtol=1e-4, atol=1e-4)


def variant_weights(w, a, b, scale, h, g, idx, in_axes, out_axes, stack_axes):
    """float64 `diag(h_i) (W + s_i A_i B_i) diag(g_i)` per example; `h` is
    `(*stack, n, *in)` or None, `g` `(*stack, n, *out)` or None (layout order)."""
    nd = np.ndim(w)
    norm = lambda axes: [ax % nd for ax in axes]  # noqa: E731
    in_axes, out_axes, stack_axes = map(norm, (in_axes, out_axes, stack_axes))
    w_e = dense_weight_per_example(w, a, b, scale, idx, in_axes, out_axes, stack_axes)
    for vec, group in ((h, in_axes), (g, out_axes)):
        if vec is None:
            continue
        order = [*stack_axes, *group]  # the vector's axes (after the adapter axis)
        per = np.moveaxis(np.asarray(vec, np.float64), len(stack_axes), 0)
        shape = [1] * nd
        for ax in order:
            shape[ax] = np.shape(w)[ax]
        for e in np.ndindex(*np.shape(idx)):
            i = int(np.asarray(idx)[e])
            if i >= 0:  # the vector's axes sorted as w's, then broadcast
                v = np.transpose(per[i], np.argsort(order)).reshape(shape)
                w_e[e] = w_e[e] * v
    return w_e


@st.composite
def variant_cases(draw):
    ndim = draw(st.integers(2, 4))
    roles = draw_roles(draw, ndim)
    in_axes, out_axes, stack_axes = draw_axes(draw, roles)
    shape = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    n = draw(st.integers(1, 3))
    rank = draw(st.integers(0, 3))
    which = draw(st.sampled_from(["in", "out", "both"]))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    lhs = draw(st.booleans())
    return shape, in_axes, out_axes, stack_axes, n, rank, which, batch, seed, lhs


@given(variant_cases())
def test_in_and_out_vectors_match_dense_reference(case):
    shape, in_axes, out_axes, stack_axes, n, rank, which, batch, seed, lhs = case
    rng = np.random.default_rng(seed)
    w, a, b, scale = random_lora(
        rng, shape, in_axes, out_axes, stack_axes, n_adapters=n, rank=rank
    )
    nd = len(shape)
    lay = lx.LeafLayout(
        "w",
        shape,
        *(tuple(ax % nd for ax in g) for g in (in_axes, out_axes, stack_axes)),
    )
    stack, ins, outs = lay.stack_shape, lay.in_shape, lay.out_shape
    ns = len(stack)
    h = nonzero(rng, (*stack, n, *ins)) if which in ("in", "both") else None
    g = nonzero(rng, (*stack, n, *outs)) if which in ("out", "both") else None
    idx = rng.integers(-1, n, size=(batch,)).astype(np.int32)
    lora = lx.BatchedLoraArray(
        w,
        a,
        b,
        scale=scale,
        indices=idx,
        in_axes=in_axes,
        out_axes=out_axes,
        stack_axes=stack_axes,
        in_scale=None if h is None else h[..., None],
        out_scale=None if g is None else np.expand_dims(g, ns + 1),
    )
    # x: (*stack batch axes, B, *in); W's stack axes are dot batch axes.
    x = nonzero(rng, (*stack, batch, *ins))
    s_w = [ax % nd for ax in stack_axes]
    i_w = [ax % nd for ax in in_axes]
    c_x = tuple(range(ns + 1, ns + 1 + len(ins)))
    b_x = tuple(range(ns))
    if lhs:
        dn = ((tuple(i_w), c_x), (tuple(s_w), b_x))
        f = lambda W, x: jax.lax.dot_general(W, x, dn)  # noqa: E731
    else:
        dn = ((c_x, tuple(i_w)), (b_x, tuple(s_w)))
        f = lambda W, x: jax.lax.dot_general(x, W, dn)  # noqa: E731
    got = jax.jit(lx.quaxify(f))(lora, x)
    # The reference: x's example axis is its first free axis.
    w_e = variant_weights(w, a, b, scale, h, g, idx, in_axes, out_axes, stack_axes)
    want = reference_dot_general(x, w_e, dn, lhs, 1, 0)
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


# --- adapters of every kind in one model --------------------------------------

L, D, F = 2, 6, 5


def _params(rng):
    """A tiny two-layer MLP stack run by lax.scan: up (L, D, F), down (L, F, D)."""
    return {
        "up": jnp.asarray(nonzero(rng, (L, D, F)) * rng.choice([-1, 1], (L, D, F))),
        "down": jnp.asarray(nonzero(rng, (L, F, D)) * rng.choice([-1, 1], (L, F, D))),
        "head": jnp.asarray(rng.normal(size=(D, 3)), jnp.float32),
    }


def forward(p, x):
    def layer(h, wts):
        up, down = wts
        return h + jnp.tanh(h @ up) @ down, None

    h, _ = jax.lax.scan(layer, x, (p["up"], p["down"]))
    return h @ p["head"]


RULES = {
    "lora": [lx.LoraRule(r"up|down", 2, stack_axes=0), lx.LoraRule("head", 1)],
    "dora": [lx.LoraRule(r"up|down|head", 3, alpha=2.0, variant="dora", stack_axes=0)],
    "ia3": [
        lx.LoraRule("up", 0, variant="ia3", stack_axes=0),
        lx.LoraRule("down", 0, variant="ia3_feedforward", stack_axes=0),
    ],
    "dora+lora": [
        lx.LoraRule("up", 2, variant="dora", stack_axes=0),
        lx.LoraRule("head", 2),
    ],
}
RULES["dora"][0] = lx.LoraRule(r"up|down", 3, alpha=2.0, variant="dora", stack_axes=0)
RULES["dora"].append(lx.LoraRule("head", 2, variant="dora"))


def _random_adapter(params, rules, rng, key):
    ad = lx.init_adapter(params, rules, key=jax.random.key(key))
    return jax.tree.map(
        lambda v: (
            v * jnp.asarray(nonzero(rng, v.shape, 0.7, 1.3), v.dtype)
            + jnp.asarray(0.2 * rng.normal(size=v.shape), v.dtype)
        ),
        ad,
    )


def _np_merged(ad, path, w):
    """The adapter's weight at `path`, merged in float64 NumPy (layer-stacked
    leaves have the stack axis first; in-axis then out-axis)."""
    w = np.asarray(w, np.float64)
    if path not in ad.paths:
        return w
    a, b = (np.asarray(v, np.float64) for v in ad.weights[path])
    if path in ad.vera:  # the LoRA (A·diag(d), B·diag(b)) it stands for
        d, bvec = (np.asarray(v, np.float64) for v in ad.vera[path])
        a, b = a * d[..., None, :], b * bvec[..., None, :]
    m = w + ad.scale(path) * (a @ b)
    if path in ad.magnitudes:  # m / ‖W + sAB‖ over the in-axis, per out column
        mag = np.asarray(ad.magnitudes[path], np.float64)
        m = m * (mag / np.linalg.norm(m, axis=-2))[..., None, :]
    if path in ad.in_scales:
        m = m * np.asarray(ad.in_scales[path], np.float64)[..., :, None]
    if path in ad.out_scales:
        m = m * np.asarray(ad.out_scales[path], np.float64)[..., None, :]
    return m


def _np_forward(p, x):
    h = np.asarray(x, np.float64)
    for layer in range(L):
        h = h + np.tanh(h @ p["up"][layer]) @ p["down"][layer]
    return h @ p["head"]


def _reference(params, adapters, idx, x):
    rows = []
    for e, i in enumerate(np.asarray(idx)):
        p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        if i >= 0:
            p = {k: _np_merged(adapters[i], k, v) for k, v in p.items()}
        rows.append(_np_forward(p, x[e]))
    return np.stack(rows)


@pytest.fixture(scope="module")
def mixed():
    rng = np.random.default_rng(3)
    params = _params(rng)
    adapters = [_random_adapter(params, RULES[k], rng, j) for j, k in enumerate(RULES)]
    idx = jnp.array([0, 1, 2, -1, 3, 1, 2, 0])
    x = jnp.asarray(rng.normal(size=(len(idx), D)), jnp.float32)
    return params, adapters, idx, x


def test_kinds(mixed):
    _, adapters, _, _ = mixed
    assert [ad.kind("up") for ad in adapters] == ["lora", "dora", "ia3", "dora"]
    assert adapters[2].kind("down") == "ia3" and adapters[2].ranks == (0, 0)
    stack = lx.stack_adapters(adapters)
    for i, ad in enumerate(adapters):  # stack[i] gives each adapter back
        back = stack[i]
        assert back.paths == ad.paths
        for field in ("magnitudes", "in_scales", "out_scales"):
            mine, theirs = getattr(ad, field), getattr(back, field)
            assert set(mine) == set(theirs)
            for p in mine:
                np.testing.assert_array_equal(mine[p], theirs[p])


def test_mixed_batch_matches_reference(mixed):
    params, adapters, idx, x = mixed
    served = lx.loraify(params, adapters, idx)
    got = np.asarray(jax.jit(lx.quaxify(forward))(served, x))
    want = _reference(params, adapters, idx, x)
    np.testing.assert_allclose(got, want, **TOL)
    base = _np_forward({k: np.asarray(v, np.float64) for k, v in params.items()}, x)
    for e, i in enumerate(np.asarray(idx)):  # every adapter moves its rows
        moved = np.abs(want[e] - base[e]).max()
        assert (moved > 1e-2) if i >= 0 else (moved < 1e-12), (e, i, moved)


def test_variants_absent_from_a_leaf_cost_nothing(mixed):
    """Only LoRA adapters at `head`: no vectors there, nothing gathered for them."""
    params, adapters, idx, _ = mixed
    served = lx.loraify(params, [adapters[0], adapters[2]], idx % 2)
    assert served["head"].in_scale is None and served["head"].out_scale is None
    assert served["up"].out_scale is not None and served["up"].in_scale is None


def test_under_vmap_with_scalar_indices(mixed):
    params, adapters, idx, x = mixed
    served = lx.loraify(params, adapters, idx)

    def one(i, xe):
        return lx.quaxify(forward)(lx.with_indices(served, i), xe[None])[0]

    got = np.asarray(jax.jit(jax.vmap(one))(idx, x))
    np.testing.assert_allclose(got, _reference(params, adapters, idx, x), **TOL)


def test_new_adapters_leave_the_model_unchanged(mixed):
    """DoRA starts at the weight's norms, IA3 at 1: the model itself."""
    params, _, idx, x = mixed
    fresh = [lx.init_adapter(params, RULES[k], key=jax.random.key(9)) for k in RULES]
    got = jax.jit(lx.quaxify(forward))(lx.loraify(params, fresh, idx), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(forward(params, x)), **TOL)


def test_merge_matches_numpy(mixed):
    params, adapters, _, x = mixed
    for ad in adapters:
        merged = lx.merge(params, ad)
        for k in params:
            np.testing.assert_allclose(
                np.asarray(merged[k], np.float64),
                _np_merged(ad, k, params[k]),
                rtol=1e-5,
                atol=1e-5,
            )


def test_gradients_reach_each_kinds_own_parameters(mixed):
    """Training through `loraify` inside the loss: the gradient of every
    factor and vector matches float64 JAX on the merged weights, with the DoRA
    norm detached as in PEFT; the base weights get none."""
    params, adapters, idx, x = mixed
    target = jnp.asarray(np.random.default_rng(5).normal(size=(len(idx), 3)))

    def loss(ads, p):
        y = lx.quaxify(forward)(lx.loraify(p, ads, idx), x)
        return jnp.sum((y - target) ** 2)

    # Jitted, as training is: eagerly, quax dispatches every primitive of the
    # backward pass one by one (4x the time for the same numbers).
    grads = jax.jit(jax.grad(loss))(adapters, params)

    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        ads64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), adapters)

        def merged(ad, path, w):
            if path not in ad.paths:
                return w
            a, b = ad.weights[path]
            m = w + ad.scale(path) * (a @ b)
            if path in ad.magnitudes:
                norm = jax.lax.stop_gradient(jnp.linalg.norm(m, axis=-2))
                m = m * (ad.magnitudes[path] / norm)[..., None, :]
            if path in ad.in_scales:
                m = m * ad.in_scales[path][..., :, None]
            if path in ad.out_scales:
                m = m * ad.out_scales[path][..., None, :]
            return m

        def loss64(ads):
            ys = []
            for e, i in enumerate(np.asarray(idx)):
                p = p64 if i < 0 else {k: merged(ads[i], k, v) for k, v in p64.items()}
                ys.append(forward(p, jnp.asarray(x[e : e + 1], jnp.float64))[0])
            return jnp.sum((jnp.stack(ys) - jnp.asarray(target, jnp.float64)) ** 2)

        want = jax.jit(jax.grad(loss64))(ads64)
    for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        if not np.size(want_leaf):  # IA3's empty rank-0 factors
            continue
        scale = float(np.abs(np.asarray(want_leaf)).max()) + 1e-6
        np.testing.assert_allclose(
            np.asarray(got_leaf), np.asarray(want_leaf), atol=2e-4 * scale, rtol=2e-4
        )
    assert any(
        float(np.abs(np.asarray(v)).max()) > 1e-3 for v in jax.tree.leaves(grads)
    )


# --- what is refused ---------------------------------------------------------


def test_refusals(mixed):
    params, adapters, idx, x = mixed
    with pytest.raises(ValueError, match="write rank 0"):
        lx.LoraRule("up", 2, variant="ia3")
    with pytest.raises(ValueError, match="unknown variant"):
        lx.LoraRule("up", 2, variant="loha")
    # A tied head reads the weight along its out-axes: not with variant vectors.
    served = lx.loraify(params, adapters, idx)
    with pytest.raises(lx.UnsupportedOperationError, match="DoRA or IA3"):
        lx.quaxify(lambda p, h: h @ p["head"].T)(served, jnp.ones((len(idx), 3)))
    # Nor a row lookup.
    with pytest.raises(lx.UnsupportedOperationError, match="DoRA or IA3"):
        lx.quaxify(lambda p, t: p["head"][t])(served, jnp.zeros((len(idx),), int))
    # A bank holds the kinds it was built for.
    bank = lx.AdapterBank(params, RULES["dora"], slots=2)
    with pytest.raises(ValueError, match=r"DORA adapter .*kinds=\('lora', 'dora'\)"):
        bank.add("d", adapters[1])
    with pytest.raises(ValueError, match=r"IA3 adapter .*kinds=\('lora', 'ia3'\)"):
        bank.add("i", adapters[2])
    bank.add("l", lx.init_adapter(params, RULES["lora"], key=jax.random.key(0)))
    with pytest.raises(ValueError, match="unknown kind"):
        lx.AdapterBank(params, RULES["dora"], slots=2, kinds=("lora", "loha"))


@pytest.mark.parametrize("update", [False, True])
def test_a_bank_serves_every_kind(mixed, update):
    """LoRA, DoRA, IA3 and DoRA+LoRA adapters (and VeRA, a LoRA) from one bank in
    one batch, through fewer slots than adapters, and after `bank.update` swaps
    two of them: every row equals its adapter merged in float64 NumPy."""
    params, adapters, idx, x = mixed
    rng = np.random.default_rng(7)
    vera_rules = [lx.LoraRule(r"up|down", 2, variant="vera", stack_axes=0)]
    vera = with_random_vera(
        lx.init_adapter(params, vera_rules, key=jax.random.key(9)), rng
    )
    every = [*adapters, vera]
    rules = [lx.LoraRule(r"up|down", 3, stack_axes=0), lx.LoraRule("head", 3)]
    bank = lx.AdapterBank(params, rules, slots=4, kinds=("dora", "ia3"))
    names = [f"k{i}" for i in range(len(every))]
    for n, ad in zip(names, every):
        bank.add(n, ad)
    if update:  # k0 becomes the DoRA adapter, k1 the plain LoRA one
        bank.update("k0", adapters[1])
        bank.update("k1", adapters[0])
        every = [adapters[1], adapters[0], *every[2:]]

    @jax.jit
    def step(params, served, x):
        return lx.quaxify(forward)(lx.loraify(params, served), x)

    batches = [[0, 1, 2, -1, 3, 1, 2, 0], [4, -1, 4, 1, 0, 3, 3, 0]]
    for rows in batches:
        names_ = [None if i < 0 else names[i] for i in rows]
        got = np.asarray(step(params, bank.served(bank.indices(names_)), x))
        want = _reference(params, every, jnp.asarray(rows), x)
        np.testing.assert_allclose(got, want, **TOL)


# --- VeRA, trained here --------------------------------------------------------


def test_vera_trains_its_vectors_only(mixed, tmp_path):
    params, _, _, x = mixed
    rules = [lx.LoraRule(r"up|down", 4, variant="vera", stack_axes=0)]
    fresh = lx.init_adapter(params, rules, key=jax.random.key(3))
    assert fresh.kind("up") == "vera" and fresh.kind("down") == "vera"
    # One pair of projections for every leaf: down's (F, r) block is up's top rows.
    a_up, _ = fresh.weights["up"]
    a_down, _ = fresh.weights["down"]
    np.testing.assert_array_equal(a_up[0][:F], a_down[0])
    np.testing.assert_array_equal(a_up[0], a_up[1])  # the same in every layer
    idx = jnp.array([0, -1, 0, 0, -1, 0, 0, 0])
    # New: the model itself (b starts at 0).
    same = jax.jit(lx.quaxify(forward))(lx.loraify(params, fresh, idx), x)
    np.testing.assert_allclose(np.asarray(same), np.asarray(forward(params, x)), **TOL)

    rng = np.random.default_rng(11)
    trained = with_random_vera(fresh, rng)
    served = jax.jit(lx.quaxify(forward))(lx.loraify(params, trained, idx), x)

    def np_weight(path):
        a, b = (np.asarray(v, np.float64) for v in trained.weights[path])
        d, bv = (np.asarray(v, np.float64) for v in trained.vera[path])
        w = np.asarray(params[path], np.float64)
        return w + (a * d[:, None, :]) @ (b * bv[:, None, :])

    merged = {"up": np_weight("up"), "down": np_weight("down")}
    merged["head"] = np.asarray(params["head"], np.float64)
    base = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for e, i in enumerate(np.asarray(idx)):
        want = _np_forward(merged if i >= 0 else base, x[e])
        np.testing.assert_allclose(np.asarray(served[e]), want, **TOL)
    np.testing.assert_allclose(
        np.asarray(lx.merge(params, trained)["up"]), merged["up"], rtol=1e-5, atol=1e-5
    )

    # Gradients: to d and b, none to the projections; the mask says the same.
    def loss(ad):
        y = lx.quaxify(forward)(lx.loraify(params, ad, idx), x)
        return jnp.sum(y**2)

    grads = jax.jit(jax.grad(loss))(trained)  # jitted, as training is
    for path in ("up", "down"):
        assert not np.any(np.asarray(grads.weights[path][0]))
        assert not np.any(np.asarray(grads.weights[path][1]))
        assert np.abs(np.asarray(grads.vera[path][0])).max() > 1e-4
        assert np.abs(np.asarray(grads.vera[path][1])).max() > 1e-4
    mask = lx.adapter_mask(trained)
    assert mask.weights["up"] == (False, False) and mask.vera["up"] == (True, True)

    # A checkpoint keeps the kind, the projections and the vectors.
    lx.save_adapter(tmp_path / "vera", trained)
    back = lx.load_adapter(tmp_path / "vera", params)
    assert back.kind("up") == "vera"
    for path in ("up", "down"):
        for got, want in zip(
            (*back.weights[path], *back.vera[path]),
            (*trained.weights[path], *trained.vera[path]),
        ):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def with_random_vera(adapter, rng):
    """The adapter with random non-zero VeRA vectors (projections untouched)."""
    vera = {
        p: tuple(
            jnp.asarray(nonzero(rng, v.shape) * rng.choice([-1, 1], v.shape), v.dtype)
            for v in vecs
        )
        for p, vecs in adapter.vera.items()
    }
    return dataclasses.replace(adapter, vera=vera)


def test_match_rules_table_shows_kinds_and_trainable_counts(mixed):
    params = mixed[0]
    rules = [
        lx.LoraRule("up", 3, variant="dora", stack_axes=0),
        lx.LoraRule("down", 0, variant="ia3_feedforward", stack_axes=0),
        lx.LoraRule("head", 2, variant="vera"),
    ]
    table = str(lx.match_rules(params, rules))
    lines = table.splitlines()
    assert " kind " in lines[0]
    by_path = {line.split()[0]: line for line in lines[2:5]}
    for path, kind in [("up", "dora"), ("down", "ia3_feedforward"), ("head", "vera")]:
        assert f" {kind} " in by_path[path], by_path[path]
    # DoRA: L * (r (D + F) + F); IA3 on the input: L * F; VeRA: r + out (3).
    n = L * (3 * (D + F) + F) + L * F + (2 + 3)
    assert f"{n:,} adapter parameters" in table
    ad = lx.init_adapter(params, rules, key=jax.random.key(0))
    mask = lx.adapter_mask(ad)
    trainable = sum(
        int(np.size(v))
        for v, keep in zip(jax.tree.leaves(ad), jax.tree.leaves(mask))
        if keep
    )
    assert trainable == n


@pytest.mark.parametrize("i", [-1, 0, 1])
def test_materialised_weight_with_vectors(i):
    """The opt-in dense weight is diag(h_i) (W + s_i A_i B_i) diag(g_i), and the
    base weight itself for -1."""
    rng = np.random.default_rng(7)
    w, a, b, scale = random_lora(rng, (2, 4, 3), (1,), (2,), (0,), n_adapters=2, rank=2)
    h, g = nonzero(rng, (2, 2, 4)), nonzero(rng, (2, 2, 3))
    lora = lx.BatchedLoraArray(
        w,
        a,
        b,
        scale=scale,
        indices=np.int32(i),
        in_axes=1,
        out_axes=2,
        stack_axes=0,
        allow_materialise=True,
        in_scale=h[..., None],
        out_scale=g[:, :, None, :],
    )
    want = variant_weights(w, a, b, scale, h, g, np.int32(i), (1,), (2,), (0,))
    np.testing.assert_allclose(np.asarray(lora.materialise()), want, rtol=1e-5)
