"""Training many adapters in one step: `lx.AdapterTrainer` against the alternatives.

Model: the Llama-style decoder of `benchmarks/serving.py` (its `score`: teacher-
forced logits at every position, stacked layers under `lax.scan`), float32. Eight
tenants adapt q, k, v, o, gate, up and down in every layer; every other tenant has
half the capacity rank (zero-padded in its slot). Each tenant has `rows` sequences
of `seq` tokens per step; the loss is next-token cross-entropy, one per row, and
the optimizer Adam (per-tenant learning rates through `optax.inject_hyperparams`).

Timed, interleaved (every round runs each once, in a fresh random order; medians):

- `multi-tenant`: one `trainer.step` over all eight tenants' rows (one forward
  and backward pass, then each slot's own update);
- `(a) sequential`: eight single-adapter steps, one per tenant on its own rows
  (plain optax on an `lx.Adapter`, `lx.loraify` inside the loss): what training
  the tenants one after another costs for the same rows;
- `(b) one adapter, same batch`: one single-adapter step on all the rows (the
  cost floor: one LoRA training step of the same size).

Targets (issue #20): at least 3x the throughput of (a), at most 1.15x the step
time of (b).

Run: python benchmarks/multi_tenant.py [--quick] [--repeats N] [--rows R]
     [--seq T]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_arrays as lx
from benchmarks._common import interleaved
from benchmarks.serving import FULL, PROJECTIONS, QUICK, init_params, score

TENANTS = 8


def rules(cfg):
    return [lx.LoraRule(PROJECTIONS, rank=cfg.rank, stack_axes=0)]


def tenant_rank(i, cfg):
    return cfg.rank if i % 2 == 0 else cfg.rank // 2


def make_tenant(params, cfg, i):
    rank = tenant_rank(i, cfg)
    rule = lx.LoraRule(PROJECTIONS, rank=rank, alpha=2.0 * rank, stack_axes=0)
    return lx.init_adapter(params, rule, key=jax.random.key(i))


def row_losses(cfg, tree, tokens):
    """Next-token cross-entropy, one per row (the mean over its positions)."""
    logits = score(tree, tokens[:, :-1], cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return ce.mean(axis=-1)


def single_step(params, cfg, optimizer):
    """A plain single-adapter LoRA training step (the alternatives' step)."""

    def loss(adapter, tokens):
        idx = jnp.zeros((tokens.shape[0],), jnp.int32)
        tree = lx.loraify(params, adapter, idx)
        return jnp.mean(lx.quaxify(row_losses, strategy=None)(cfg, tree, tokens))

    @jax.jit
    def step(adapter, state, tokens):
        value, g = jax.value_and_grad(loss)(adapter, tokens)
        updates, state = optimizer.update(g, state, adapter)
        return optax.apply_updates(adapter, updates), state, value

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rows", type=int, default=None, help="rows per tenant")
    p.add_argument("--seq", type=int, default=None, help="tokens per row")
    args = p.parse_args()
    cfg = QUICK if args.quick else dataclasses.replace(FULL, layers=4)
    rows = args.rows or (2 if args.quick else 2)
    seq = args.seq or (8 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 7)
    params = init_params(cfg)
    names = [f"tenant{i}" for i in range(TENANTS)]
    adapters = [make_tenant(params, cfg, i) for i in range(TENANTS)]
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    trainer = lx.AdapterTrainer(params, rules(cfg), slots=TENANTS, optimizer=optimizer)
    for i, (name, adapter) in enumerate(zip(names, adapters)):
        trainer.add(name, adapter, learning_rate=1e-3 * (1 + i % 3))

    rng = np.random.default_rng(0)
    batch = rows * TENANTS
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (batch, seq + 1)), jnp.int32)
    row_names = [names[i % TENANTS] for i in range(batch)]  # interleaved
    own = {n: tokens[np.array([r == n for r in row_names])] for n in names}

    def loss_fn(tree, tokens):
        return row_losses(cfg, tree, tokens)

    def multi():
        trainer.step(loss_fn, tokens, row_names)

    step = single_step(params, cfg, optimizer)
    states = {n: [a, optimizer.init(a)] for n, a in zip(names, adapters)}

    def sequential():
        for n in names:
            a, s = states[n]
            a, s, value = step(a, s, own[n])
            states[n] = [a, s]
        value.block_until_ready()

    one = [adapters[0], optimizer.init(adapters[0])]

    def same_batch():
        a, s, value = step(one[0], one[1], tokens)
        one[0], one[1] = a, s
        value.block_until_ready()

    t0 = time.perf_counter()
    losses = trainer.step(loss_fn, tokens, row_names)
    compile_s = time.perf_counter() - t0
    assert sorted(losses) == sorted(names) and trainer.last_skipped == ()
    times = interleaved(
        {
            "multi-tenant": multi,
            "(a) sequential": sequential,
            "(b) one adapter, same batch": same_batch,
        },
        repeats,
    )
    ratio_a = times["(a) sequential"] / times["multi-tenant"]
    ratio_b = times["multi-tenant"] / times["(b) one adapter, same batch"]
    print(
        f"{jax.default_backend()}: {TENANTS} tenants (ranks {cfg.rank} and "
        f"{cfg.rank // 2}), {rows} rows x {seq} tokens each, d_model "
        f"{cfg.d_model}, {cfg.layers} layers; first step (compile) {compile_s:.1f} s"
    )
    print("| variant | step ms | tokens/s |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * t:.1f} | {batch * seq / t:.0f} |")
    verdict_a = "met" if ratio_a >= 3 else "MISSED"
    verdict_b = "met" if ratio_b <= 1.15 else "MISSED"
    print(f"throughput vs (a) sequential: {ratio_a:.2f}x (target >= 3x: {verdict_a})")
    print(
        f"step time vs (b) one adapter: {ratio_b:.2f}x (target <= 1.15x: {verdict_b})"
    )


if __name__ == "__main__":
    main()
