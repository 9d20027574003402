"""Train a LoRA, a DoRA, an IA3 and a VeRA adapter on one frozen model, then serve
all four and the base model in a single batch.

Each adapter is trained with optax on its own toy task (a different target
function). Training differentiates with respect to the adapter only: `lx.loraify`
runs inside the loss, and `lx.adapter_mask` keeps VeRA's frozen projections out of
the update. Serving stacks the four kinds; every row of the batch then picks its
own adapter, and each row is checked against the model with that adapter merged
in (`lx.merge`) run alone.

Run: python examples/mixed_variants.py [--steps 60]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorax_arrays as lx


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 64, rngs=rngs)
        self.down = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


KINDS = {
    "lora": [lx.LoraRule("up|down", 4)],
    "dora": [lx.LoraRule("up|down", 4, variant="dora")],
    "ia3": [
        lx.LoraRule("up", 0, variant="ia3"),
        lx.LoraRule("down", 0, variant="ia3_feedforward"),
    ],
    "vera": [lx.LoraRule("up|down", 32, variant="vera")],
}


def train(model, rules, target, key, steps):
    """A few Adam steps of one adapter on `x -> target(x)`; returns it and its
    first and last loss."""
    adapter = lx.init_adapter(model, rules, key=key)
    mask = lx.adapter_mask(adapter)
    opt = optax.masked(optax.adam(3e-2), mask)
    state = opt.init(adapter)
    x = jax.random.normal(jax.random.fold_in(key, 1), (64, 16))
    y = target(x)
    forward = lx.quaxify(lambda m, x: m(x))

    def loss(ad):
        served = lx.loraify(model, ad, jnp.zeros(len(x), jnp.int32))
        return jnp.mean((forward(served, x) - y) ** 2)

    @jax.jit
    def step(ad, state):
        value, grads = jax.value_and_grad(loss)(ad)
        updates, state = opt.update(grads, state, ad)
        return optax.apply_updates(ad, updates), state, value

    first = None
    for _ in range(steps):
        adapter, state, value = step(adapter, state)
        first = float(value) if first is None else first
    return adapter, first, float(value)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()

    model = MLP(nnx.Rngs(0))
    targets = {  # a different toy task per adapter
        "lora": lambda x: model(x) + 0.5 * jnp.sin(x),
        "dora": lambda x: 1.5 * model(x),
        "ia3": lambda x: model(x) * jnp.linspace(0.5, 1.5, 16),
        "vera": lambda x: model(x) - 0.3 * x,
    }
    adapters = []
    for j, (kind, rules) in enumerate(KINDS.items()):
        ad, first, last = train(
            model, rules, targets[kind], jax.random.key(j), args.steps
        )
        n = sum(
            x.size
            for x, m in zip(jax.tree.leaves(ad), jax.tree.leaves(lx.adapter_mask(ad)))
            if m
        )
        print(f"trained {kind:<5} ({n:>5} parameters): loss {first:.4f} -> {last:.4f}")
        adapters.append(ad)

    names = list(KINDS)
    requests = ["dora", "vera", None, "lora", "ia3", "dora", "lora", "vera"]
    stack = lx.stack_adapters(adapters, names=names)
    idx = stack.indices(requests)
    x = jax.random.normal(jax.random.key(99), (len(requests), 16))
    served = lx.loraify(model, stack, idx)
    y = nnx.jit(lx.quaxify(lambda m, x: m(x)))(served, x)

    print(f"\none batch of {len(requests)} requests, one call:")
    worst = 0.0
    for row, name in enumerate(requests):
        alone = model if name is None else lx.merge(model, adapters[names.index(name)])
        err = float(jnp.abs(y[row] - alone(x[row])).max())
        moved = float(jnp.abs(y[row] - model(x[row])).max())
        worst = max(worst, err)
        label = name or "base"
        print(
            f"  row {row}: {label:<5} |batched - alone| = {err:.1e}, "
            f"moved from base by {moved:.3f}"
        )
    print(f"Largest deviation from each adapter alone: {worst:.1e}")
    assert worst < 1e-4, worst
    return worst


if __name__ == "__main__":
    main()
