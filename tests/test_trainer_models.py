"""`lx.AdapterTrainer` on unmodified models: a `transformers` Flax Llama (its
`params` dict) and a Flax NNX module (the module itself). Two tenants trained
together equal each trained alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_arrays as lx


def _together_equals_alone(tree, rules, loss_fn, batch, names, steps=3):
    def trainer(slots):
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
        return lx.AdapterTrainer(tree, rules, slots=slots, optimizer=opt)

    tenants = {
        "a": dict(key=jax.random.key(0)),
        "b": dict(key=jax.random.key(1), learning_rate=3e-2, max_grad_norm=0.5),
    }
    both = trainer(2)
    for name, kw in tenants.items():
        both.add(name, **kw)
    first = last = None
    for _ in range(steps):
        losses = both.step(loss_fn, batch, names)
        first = first or losses
        last = losses
    for name in tenants:
        assert last[name] < first[name], (name, first, last)
    alone = trainer(1)  # one tenant at a time (add/remove: no recompile)
    for name, kw in tenants.items():
        alone.add(name, **kw)
        mine = [n if n == name else None for n in names]
        for _ in range(steps):
            alone.step(loss_fn, batch, mine)
        got, want = both.adapter(name), alone.adapter(name)
        alone.remove(name)
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            scale = np.abs(np.asarray(v)).max()
            assert np.abs(np.asarray(u) - np.asarray(v)).max() <= 1e-5 * scale


def test_transformers_flax_llama():
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = FlaxLlamaForCausalLM(config, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 48, (4, 6)), jnp.int32)

    def loss_fn(params, ids):  # next-token cross-entropy, one loss per row
        logits = model(ids, params=params).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(
            axis=-1
        )

    rules = [lx.LoraRule("q_proj|v_proj", rank=2)]
    _together_equals_alone(model.params, rules, loss_fn, ids, ["a", "b", None, "a"])


def test_nnx_module():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(6, 12, rngs=rngs)
            self.down = nnx.Linear(12, 3, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.gelu(self.up(x)))

    model = MLP(nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((6, 6)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)

    def loss_fn(m, batch):
        x, y = batch
        return jnp.mean((m(x) - y) ** 2, axis=-1)

    rules = [lx.LoraRule("kernel", rank=2)]
    names = ["b", "a", "a", None, "b", "a"]
    _together_equals_alone(model, rules, loss_fn, (x, y), names)
