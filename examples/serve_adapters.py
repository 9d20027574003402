"""Serve several LoRA adapters, and the base model, in one jitted batch.

A small Equinox transformer block (attention + MLP, written with no knowledge of
LoRA) gets four adapters of different ranks on its attention and MLP projections.
Eight requests, each naming its adapter or the base model, go through one jitted
forward pass. For each request we print the adapter it used and how far its output
is from running that request alone through the adapter's merged model.

Run: python examples/serve_adapters.py [--batch 8] [--seq 6] [--d-model 32]
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lorax_arrays as lx


class Block(eqx.Module):
    """A pre-norm transformer block from stock Equinox layers."""

    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, d_model: int, n_heads: int, *, key):
        k1, k2 = jr.split(key)
        self.norm1 = eqx.nn.LayerNorm(d_model)
        self.attn = eqx.nn.MultiheadAttention(n_heads, d_model, key=k1)
        self.norm2 = eqx.nn.LayerNorm(d_model)
        self.mlp = eqx.nn.MLP(d_model, d_model, 4 * d_model, depth=1, key=k2)

    def __call__(self, x):  # x: (seq, d_model), one example
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(self.mlp)(h)


def make_adapters(model, ranks, key):
    """One adapter per rank, with random (as if trained) A and B."""
    adapters = []
    for r, k in zip(ranks, jr.split(key, len(ranks))):
        rules = [
            lx.LoraRule(
                r"attn/(query|key|value|output)_proj/weight", rank=r, alpha=2 * r
            ),
            lx.LoraRule(r"mlp/layers/\d/weight", rank=r, alpha=r),
        ]
        k_init, k_b = jr.split(k)
        adapter = lx.init_adapter(model, rules, key=k_init)
        # init_adapter starts B at zero (the adapter is a no-op until trained);
        # pretend these were trained by drawing B at random.
        rng = np.random.default_rng(int(jr.randint(k_b, (), 0, 2**31 - 1)))
        adapter = eqx.tree_at(
            lambda ad: ad.weights,
            adapter,
            {
                path: (a, jnp.asarray(0.1 * rng.standard_normal(b.shape), b.dtype))
                for path, (a, b) in adapter.weights.items()
            },
        )
        adapters.append(adapter)
    return adapters, rules


def main(batch: int = 8, seq: int = 6, d_model: int = 32, seed: int = 0) -> float:
    key_model, key_ad, key_x = jr.split(jr.PRNGKey(seed), 3)
    model = Block(d_model, n_heads=4, key=key_model)
    names = ["support", "legal", "code", "poetry"]
    ranks = [2, 4, 8, 16]
    adapters, rules = make_adapters(model, ranks, key_ad)
    print("What the rules adapt (shown for the rank-16 adapter):")
    print(lx.match_rules(model, rules))
    stack = lx.stack_adapters(adapters, names=names)

    # Each request names its adapter; None (or "__base__") is the base model.
    mix = ["support", "legal", None, "code", "poetry", "legal", "support", None]
    requests = [mix[e % len(mix)] for e in range(batch)]
    indices = stack.indices(requests)
    x = jr.normal(key_x, (batch, seq, d_model))

    served = lx.loraify(model, stack, indices)

    @eqx.filter_jit
    @lx.quaxify
    def serve(model, x):
        return jax.vmap(model)(x)

    print("\nCompiling the batched forward pass…", flush=True)
    out = serve(served, x)

    print(
        f"\nServed {batch} requests in one jitted call ({len(names)} adapters "
        f"of ranks {ranks}, plus the base model)."
    )
    print(f"{'request':>7}  {'adapter':<8} {'rank':>4}  {'max |batched - alone|':>22}")
    worst = 0.0
    for e, name in enumerate(requests):
        alone = model if name is None else lx.merge(model, stack[name])
        ref = eqx.filter_jit(alone)(x[e])
        err = float(jnp.max(jnp.abs(out[e] - ref)))
        worst = max(worst, err)
        rank = "-" if name is None else str(ranks[names.index(name)])
        print(f"{e:>7}  {name or 'base':<8} {rank:>4}  {err:>22.2e}")
    differ = float(jnp.max(jnp.abs(out - jax.vmap(model)(x))))
    print(f"\nLargest deviation from the merged models: {worst:.2e} (float32).")
    print(f"For scale, the adapters move outputs by up to {differ:.2f}.")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    worst = main(args.batch, args.seq, args.d_model, args.seed)
    if worst > 1e-4:
        raise SystemExit(f"Batched outputs differ from the merged models: {worst}")
