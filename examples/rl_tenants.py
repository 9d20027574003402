"""A toy RL loop for many tenants: sample from a bank, train in one step, publish.

Each tenant ("alice", "bob", "carol") fine-tunes its own LoRA on one frozen
policy: given a context token, pick an action; tenant t is rewarded when the
action is its own target for that context. Every RL step:

1. samples one action per row from the *current* policies, served by an
   `lx.AdapterBank` (rows of all tenants in one batch, one compiled program);
2. trains every tenant on its own rows in one `lx.AdapterTrainer` step
   (REINFORCE: loss = -(reward - mean reward) * log pi(action), per row);
3. publishes each tenant's new weights with `bank.update(name,
   trainer.adapter(name))`, so the next step samples from them.

Run: python examples/rl_tenants.py [--steps 60]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_arrays as lx

CONTEXTS, ACTIONS, D = 4, 6, 16
TENANTS = ("alice", "bob", "carol")
ROWS = 8  # rows per tenant per step


def policy_logits(params, context):
    return jnp.tanh(params["embed"][context]) @ params["head"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    params = {
        "embed": jnp.asarray(rng.standard_normal((CONTEXTS, D)), jnp.float32),
        "head": jnp.asarray(rng.standard_normal((D, ACTIONS)) / D**0.5, jnp.float32),
    }
    targets = {t: rng.integers(0, ACTIONS, CONTEXTS) for t in TENANTS}
    rules = [lx.LoraRule("head", rank=4)]
    trainer = lx.AdapterTrainer(
        params,
        rules,
        slots=len(TENANTS),
        optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=5e-2),
    )
    bank = lx.AdapterBank(params, rules, slots=len(TENANTS))
    for i, name in enumerate(TENANTS):
        trainer.add(name, key=jax.random.key(i), max_grad_norm=1.0)
        bank.add(name, trainer.adapter(name))

    @jax.jit
    def sample(params, served, contexts, key):
        logits = lx.quaxify(policy_logits)(lx.loraify(params, served), contexts)
        return jax.random.categorical(key, logits)

    def loss_fn(tree, batch):  # REINFORCE, one loss per row
        contexts, actions, advantages = batch
        logp = jax.nn.log_softmax(policy_logits(tree, contexts))
        return -advantages * jnp.take_along_axis(logp, actions[:, None], 1)[:, 0]

    names = [t for _ in range(ROWS) for t in TENANTS]  # interleaved rows
    history = {t: [] for t in TENANTS}
    key = jax.random.key(42)
    for _ in range(args.steps):
        key, k = jax.random.split(key)
        contexts = jnp.asarray(rng.integers(0, CONTEXTS, len(names)), jnp.int32)
        served = bank.served(bank.indices(names))
        actions = np.asarray(sample(params, served, contexts, k))
        ctx = np.asarray(contexts)
        rewards = np.array(
            [float(a == targets[n][c]) for n, c, a in zip(names, ctx, actions)]
        )
        advantages = np.zeros_like(rewards)
        for t in TENANTS:  # each tenant's own baseline
            rows = np.array([n == t for n in names])
            history[t].append(rewards[rows].mean())
            advantages[rows] = rewards[rows] - rewards[rows].mean()
        batch = (contexts, jnp.asarray(actions), jnp.asarray(advantages, jnp.float32))
        trainer.step(loss_fn, batch, names)
        for t in TENANTS:  # publish: the next step samples the new weights
            bank.update(t, trainer.adapter(t))
    for t in TENANTS:
        first, last = np.mean(history[t][:10]), np.mean(history[t][-10:])
        print(f"{t:6s} reward: first 10 steps {first:.2f}, last 10 steps {last:.2f}")
    print(f"bank versions: {[bank.version(t) for t in TENANTS]}")


if __name__ == "__main__":
    main()
