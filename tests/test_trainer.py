"""`lx.AdapterTrainer`: many tenants trained in one step, each exactly as if it were
trained alone.

The reference for isolation is written independently of the library: each tenant
trained by itself with plain optax on a plain parameterisation of its own kind
(`x W + s (x A) B`; DoRA `(x W + s (x A) B) * m / ||W + s A B||`; IA3 `(x W) * g`),
on its own rows only, with its own learning rate and clipping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_arrays as lx

D, H, E, ROWS, STEPS = 6, 10, 4, 20, 10
RULES = [lx.LoraRule("w1|w2", rank=4)]
BASE_LR = 1e-2


def _params():
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(rng.standard_normal((D, H)) / np.sqrt(D), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((H, E)) / np.sqrt(H), jnp.float32),
    }


def forward(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def loss_fn(tree, batch):
    x, y = batch
    return jnp.mean((forward(tree, x) - y) ** 2, axis=-1)  # one loss per row


def _noisy(adapter, seed, std=0.3):
    """A trained-looking adapter: every array plus noise (so B != 0)."""
    rng = np.random.default_rng(seed)

    def noisy(x):  # in NumPy: no compile per shape
        x = np.asarray(x)
        return jnp.asarray(x + std * rng.standard_normal(x.shape).astype(x.dtype))

    return jax.tree.map(noisy, adapter)


# name -> (rules, learning rate, clip norm); different ranks, leaves, kinds.
TENANTS = {
    "small": ([lx.LoraRule("w1", 1, alpha=2.0)], 2e-2, None),
    "big": ([lx.LoraRule("w1|w2", 4, alpha=8.0, use_rslora=True)], 5e-3, 0.05),
    "dora": ([lx.LoraRule("w2", 2, alpha=4.0, variant="dora")], None, 1.0),
    "ia3": ([lx.LoraRule("w2", 0, variant="ia3")], 3e-2, None),
    "vera": ([lx.LoraRule("w1", 3, variant="vera")], 2e-2, 0.5),
}
# Each row's tenant: interleaved, different counts, base and padding rows.
ROW_NAMES = [
    "big", "small", None, "dora", "big", "ia3", "vera", "__base__", "small", "dora",
    "big", "ia3", None, "vera", "dora", "ia3", "vera", "small", "ia3", "big",
]  # fmt: skip


def _adapters(params):
    return {
        name: _noisy(lx.init_adapter(params, rules, key=jax.random.key(i)), 10 + i)
        for i, (name, (rules, _, _)) in enumerate(TENANTS.items())
    }


def _batch(step):
    rng = np.random.default_rng(100 + step)
    x = rng.standard_normal((ROWS, D)).astype(np.float32)
    y = rng.standard_normal((ROWS, E)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _optimizer():
    return optax.inject_hyperparams(optax.adam)(learning_rate=BASE_LR)


def _trainer(params, adapters, slots=4, **kw):
    trainer = lx.AdapterTrainer(
        params, RULES, slots=slots, optimizer=_optimizer(), **kw
    )
    for name, adapter in adapters.items():
        _, lr, clip = TENANTS[name]
        trainer.add(name, adapter, learning_rate=lr, max_grad_norm=clip)
    return trainer


# -- the independent reference ------------------------------------------------------


def _solo_params(adapter):
    """The tenant's trainable arrays as a plain dict (path -> dict of arrays)."""
    out = {}
    for path in adapter.paths:
        a, b = adapter.weights[path]
        if path in adapter.vera:  # VeRA trains d and b; its projections are frozen
            d, b_vec = adapter.vera[path]
            out[path] = {"d": d, "bv": b_vec}
            continue
        leaf = {"a": a, "b": b} if a.shape[-1] else {}
        if path in adapter.magnitudes:
            leaf["m"] = adapter.magnitudes[path]
        if path in adapter.out_scales:
            leaf["g"] = adapter.out_scales[path]
        out[path] = leaf
    return out


def _solo_forward(base, p, scales, x, frozen=None):
    def layer(path, h):
        y = h @ base[path]
        q = p.get(path, {})
        if "d" in q:  # VeRA: (A diag(d)) (B diag(b)), A and B frozen projections
            a, b = frozen[path]
            y = y + scales[path] * ((h @ (a * q["d"])) @ (b * q["bv"]))
        if "a" in q:
            y = y + scales[path] * (h @ q["a"]) @ q["b"]
        if "m" in q:
            v = base[path] + scales[path] * q["a"] @ q["b"]
            norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=0)))
            y = y * q["m"] / norm
        if "g" in q:
            y = y * q["g"]
        return y

    return layer("w2", jnp.tanh(layer("w1", x)))


def train_alone(base, adapter, name, steps):
    """The tenant trained by itself on its own rows: plain optax."""
    _, lr, clip = TENANTS[name]
    adam = optax.adam(BASE_LR if lr is None else lr)
    opt = adam if clip is None else optax.chain(optax.clip_by_global_norm(clip), adam)
    p = _solo_params(adapter)
    scales = {path: adapter.scale(path) for path in adapter.paths}
    frozen = {path: adapter.weights[path] for path in adapter.vera}
    state = opt.init(p)
    rows = np.array([n == name for n in ROW_NAMES])

    @jax.jit
    def step(p, state, x, y):
        def loss(p):
            out = _solo_forward(base, p, scales, x, frozen)
            return jnp.mean(jnp.mean((out - y) ** 2, axis=-1))

        value, g = jax.value_and_grad(loss)(p)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, value

    losses = []
    for k in range(steps):
        x, y = _batch(k)
        p, state, value = step(p, state, x[rows], y[rows])
        losses.append(float(value))
    return p, losses


def _rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_each_tenant_trains_as_if_alone():
    params = _params()
    adapters = _adapters(params)
    trainer = _trainer(params, adapters, slots=5, kinds=("dora", "ia3", "vera"))
    together = []
    for k in range(STEPS):
        together.append(trainer.step(loss_fn, _batch(k), ROW_NAMES))
        assert trainer.last_skipped == ()
    for name, adapter in adapters.items():
        solo, solo_losses = train_alone(params, adapter, name, STEPS)
        got = _solo_params(trainer.adapter(name))
        assert jax.tree.structure(got) == jax.tree.structure(solo), name
        for path in solo:
            for field, ref in solo[path].items():
                start = _solo_params(adapter)[path][field]
                assert _rel(ref, start) > 1e-3, (name, path, field)  # it trained
                err = _rel(got[path][field], ref)
                assert err < 1e-5, (name, path, field, err)
        np.testing.assert_allclose([t[name] for t in together], solo_losses, rtol=1e-5)


# -- lifecycle, non-finite gradients, accumulation -------------------------------

LORA_ONLY = {n: TENANTS[n] for n in ("small", "big")}


def _lora_setup(slots=3):
    params = _params()
    adapters = {n: a for n, a in _adapters(params).items() if n in LORA_ONLY}
    return params, adapters, _trainer(params, adapters, slots=slots)


def test_add_and_remove_between_steps_never_recompile():
    params, adapters, trainer = _lora_setup(slots=3)
    traces = []

    def counted(tree, batch):
        traces.append(1)  # runs only when JAX traces
        return loss_fn(tree, batch)

    names = [n if n in ("small", "big") else None for n in ROW_NAMES]
    trainer.step(counted, _batch(0), names)
    trainer.add("new", key=jax.random.key(7), learning_rate=1e-3)
    assert trainer.names == ("small", "big", "new")
    trainer.step(counted, _batch(1), [n or "new" for n in names])
    trainer.remove("small")
    assert "small" not in trainer and len(trainer) == 2
    fresh = _noisy(lx.init_adapter(params, RULES, key=jax.random.key(8)), 3)
    trainer.add("again", fresh)  # into the freed slot, with a fresh state
    got = trainer.adapter("again")
    for path in fresh.paths:
        for x, y in zip(got.weights[path], fresh.weights[path]):
            np.testing.assert_array_equal(x, y)
    assert int(trainer.optimizer_state("again").count) == 0
    trainer.step(counted, _batch(2), [n and ("again" if n == "small" else n)
                                      for n in names])  # fmt: skip
    assert len(traces) == 1

    # More tenants than slots: an error naming both numbers.
    with pytest.raises(ValueError, match=r"make 4 tenants, but the trainer has 3 s"):
        trainer.add("fourth", key=jax.random.key(10))
    with pytest.raises(lx.UnknownAdapterError, match="'smal'"):
        trainer.step(counted, _batch(3), ["smal"] * ROWS)


def test_a_non_finite_tenant_is_skipped_and_nobody_else_is_affected():
    params, adapters, trainer = _lora_setup()
    trainer.add("bad", key=jax.random.key(5))
    _, _, clean = _lora_setup()
    clean.add("bad", key=jax.random.key(5))
    names = [n if n in ("small", "big") else "bad" for n in ROW_NAMES]
    for k in range(3):
        x, y = _batch(k)
        if k == 1:  # one of bad's rows gets a NaN target
            y_bad = y.at[names.index("bad")].set(jnp.nan)
            before = trainer.adapter("bad"), trainer.optimizer_state("bad")
            losses = trainer.step(loss_fn, (x, y_bad), names)
            assert trainer.last_skipped == ("bad",)
            assert np.isnan(losses["bad"]) and np.isfinite(losses["small"])
            after = trainer.adapter("bad"), trainer.optimizer_state("bad")
            for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
                np.testing.assert_array_equal(u, v)  # weights and state kept
            clean.step(loss_fn, (x, y), [n if n != "bad" else None for n in names])
        else:
            trainer.step(loss_fn, (x, y), names)
            clean.step(loss_fn, (x, y), names)
            assert trainer.last_skipped == ()
    for name in ("small", "big"):
        got, want = trainer.adapter(name), clean.adapter(name)
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_micro_batches_and_per_token_names_give_the_same_update():
    params, adapters, one = _lora_setup()
    _, _, four = _lora_setup()
    _, _, tokens = _lora_setup()
    names = [n if n in ("small", "big") else None for n in ROW_NAMES]
    x, y = _batch(0)
    seq = 3
    xt = jnp.broadcast_to(x[:, None], (ROWS, seq, D)) * jnp.arange(1, seq + 1)[:, None]
    yt = jnp.broadcast_to(y[:, None], (ROWS, seq, E))

    def row_loss(tree, batch):  # a row's loss: the mean over its tokens
        return jnp.mean(token_loss(tree, batch), axis=-1)

    def token_loss(tree, batch):
        x, y = batch
        return jnp.mean((forward(tree, x) - y) ** 2, axis=-1)

    l1 = one.step(row_loss, (xt, yt), names)
    l4 = four.step(row_loss, (xt, yt), names, micro_batches=4)
    per_token = [[n] * seq for n in names]
    lt = tokens.step(token_loss, (xt, yt), per_token)
    for name in ("small", "big"):
        np.testing.assert_allclose(l4[name], l1[name], rtol=1e-6)
        np.testing.assert_allclose(lt[name], l1[name], rtol=1e-6)
        for other in (four, tokens):
            got, want = other.adapter(name), one.adapter(name)
            for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="3 equal micro-batches"):
        one.step(row_loss, (xt, yt), names, micro_batches=3)
    with pytest.raises(ValueError, match=r"losses of shape \(20,\)"):
        one.step(row_loss, (xt, yt), per_token)


def test_add_refuses_what_the_slots_cannot_hold():
    params, adapters, trainer = _lora_setup()
    dora = lx.init_adapter(params, TENANTS["dora"][0], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"kinds=\('lora', 'dora'\)"):
        trainer.add("d", dora)
    big = lx.init_adapter(params, [lx.LoraRule("w1", 8)], key=jax.random.key(0))
    with pytest.raises(ValueError, match="rank 8, above the trainer's capacity 4"):
        trainer.add("b8", big)
    plain = lx.AdapterTrainer(params, RULES, slots=1, optimizer=optax.adam(1e-3))
    with pytest.raises(ValueError, match="inject_hyperparams"):
        plain.add("x", key=jax.random.key(0), learning_rate=1e-2)
    with pytest.raises(ValueError, match="already training"):
        trainer.add("small", key=jax.random.key(0))


# -- publishing to a bank, checkpoints ------------------------------------------


def _merged_f64(params, adapter):
    """The model's weights with `adapter` folded in, in NumPy float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for path in adapter.paths:
        a, b = (np.asarray(x, np.float64) for x in adapter.weights[path])
        if path in adapter.vera:  # the projections scaled by d and b
            d, b_vec = (np.asarray(x, np.float64) for x in adapter.vera[path])
            a, b = a * d, b * b_vec
        w = p[path] + adapter.scale(path) * (a @ b)
        if path in adapter.magnitudes:
            m = np.asarray(adapter.magnitudes[path], np.float64)
            w = w * m / np.sqrt(np.sum(w * w, axis=0))
        if path in adapter.out_scales:
            w = w * np.asarray(adapter.out_scales[path], np.float64)
        p[path] = w
    return p


def test_published_adapters_serve_the_trained_weights():
    params = _params()
    adapters = {n: a for n, a in _adapters(params).items() if n != "small"}
    trainer = _trainer(params, adapters, slots=4, kinds=("dora", "ia3", "vera"))
    bank = lx.AdapterBank(params, RULES, slots=4, kinds=("dora", "ia3"))
    for name, adapter in adapters.items():
        bank.add(name, adapter)  # the policy before training
    names = [n if n in adapters else None for n in ROW_NAMES]
    serve = jax.jit(lambda p, s, x: lx.quaxify(forward)(lx.loraify(p, s), x))
    x, _ = _batch(9)
    for k in range(2):
        trainer.step(loss_fn, _batch(k), names)
        for name in adapters:  # publish: the next batch samples the new weights
            bank.update(name, trainer.adapter(name))
        out = np.asarray(serve(params, bank.served(bank.indices(names)), x))
        for name in adapters:
            assert bank.version(name) == 2 + k
            p = _merged_f64(params, trainer.adapter(name))
            rows = [i for i, n in enumerate(names) if n == name]
            xs = np.asarray(x, np.float64)[rows]
            ref = np.tanh(xs @ p["w1"]) @ p["w2"]
            np.testing.assert_allclose(out[rows], ref, rtol=1e-5, atol=1e-5)
            assert _rel(ref, np.tanh(xs @ _params()["w1"]) @ _params()["w2"]) > 1e-2


def test_a_tenant_resumes_exactly_from_a_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    params, adapters, trainer = _lora_setup()
    names = [n if n in ("small", "big") else None for n in ROW_NAMES]
    for k in range(2):
        trainer.step(loss_fn, _batch(k), names)
    lx.save_adapter(tmp_path / "big" / "adapter", trainer.adapter("big"))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "big" / "optimizer", trainer.optimizer_state("big"))
    trainer.step(loss_fn, _batch(2), names)  # the uninterrupted run

    resumed = lx.AdapterTrainer(params, RULES, slots=2, optimizer=_optimizer())
    adapter = lx.load_adapter(tmp_path / "big" / "adapter", params)
    abstract = jax.eval_shape(lambda: trainer.optimizer_state("big"))
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(tmp_path / "big" / "optimizer", abstract)
    resumed.add("big", adapter, optimizer_state=state, max_grad_norm=0.05)
    assert resumed.learning_rate("big") == pytest.approx(5e-3)
    assert int(resumed.optimizer_state("big").count) == 2
    resumed.step(loss_fn, _batch(2), [n if n == "big" else None for n in names])
    for u, v in zip(
        jax.tree.leaves((resumed.adapter("big"), resumed.optimizer_state("big"))),
        jax.tree.leaves((trainer.adapter("big"), trainer.optimizer_state("big"))),
    ):
        np.testing.assert_array_equal(u, v)
