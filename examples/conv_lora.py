"""Serve several conv LoRA adapters, and the base model, in one batch.

A small Flax NNX CNN (two convolutions and a linear head, written with no knowledge
of LoRA) gets four adapters of different ranks on its conv kernels and its head.
A conv kernel `(kh, kw, I, O)` is adapted as PEFT adapts a `Conv2d`: A is a conv
with the kernel's spatial shape into `r` channels, B a 1x1 conv out of them. In a
`LoraRule` that is "the out-feature axis is the only out-axis":
`lx.LoraRule(pattern, rank, out_axes=-1)` (Equinox's `(O, I, kh, kw)` kernels:
`out_axes=0`); the spatial axes and the in-feature axis are then the in-axes.

Eight images, each naming its adapter or the base model, go through one jitted
forward pass. Each adapted conv is computed as the base conv plus one more conv
with every adapter's A side by side, from which each image keeps its own adapter's
channels; no per-image kernel is built. For each image we print the adapter it
used, its predicted class, and how far its logits are from running that image
alone through the adapter's merged model.

Run: python examples/conv_lora.py [--batch 8] [--size 16]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from flax import nnx
from jax import lax

import lorax_arrays as lx


class CNN(nnx.Module):
    """Two convolutions and a linear head, NHWC images."""

    def __init__(self, classes: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(32, classes, rngs=rngs)

    def __call__(self, x):  # (B, H, W, 3) -> (B, classes)
        h = nnx.relu(self.conv1(x))
        h = nnx.relu(self.conv2(h))
        return self.head(h.mean(axis=(1, 2)))


def rules(rank: int) -> list[lx.LoraRule]:
    return [
        # Flax conv kernels are (kh, kw, I, O): the out-feature axis is the last.
        lx.LoraRule(r"conv\d/kernel", rank=rank, alpha=2 * rank, out_axes=-1),
        lx.LoraRule(r"head/kernel", rank=rank, alpha=rank),
    ]


def make_adapters(model, ranks, key) -> list[lx.Adapter]:
    """One adapter per rank, with random (as if trained) A and B."""
    adapters = []
    for r, k in zip(ranks, jr.split(key, len(ranks))):
        k_init, k_b = jr.split(k)
        adapter = lx.init_adapter(model, rules(r), key=k_init)
        # init_adapter starts B at zero (the adapter is a no-op until trained);
        # pretend these were trained by drawing B at random.
        rng = np.random.default_rng(int(jr.randint(k_b, (), 0, 2**31 - 1)))
        weights = {
            path: (a, jnp.asarray(0.2 * rng.standard_normal(b.shape), b.dtype))
            for path, (a, b) in adapter.weights.items()
        }
        adapters.append(dataclasses.replace(adapter, weights=weights))
    return adapters


def count_convs(f, *args) -> int:
    """How many convolutions the program of `f(*args)` runs."""

    def count(jaxpr) -> int:
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's own Jaxpr
        return sum(
            (eqn.primitive is lax.conv_general_dilated_p)
            + sum(count(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
            for eqn in jaxpr.eqns
        )

    return count(jax.make_jaxpr(f)(*args))


def main(batch: int = 8, size: int = 16, seed: int = 0) -> float:
    key_model, key_ad, key_x = jr.split(jr.PRNGKey(seed), 3)
    model = CNN(classes=10, rngs=nnx.Rngs(key_model))
    names = ["sketch", "xray", "satellite", "night"]
    ranks = [2, 4, 8, 8]
    adapters = make_adapters(model, ranks, key_ad)
    print("What the rules adapt (shown for the rank-8 adapter):")
    print(lx.match_rules(model, rules(8)))

    stack = lx.stack_adapters(adapters, names=names)
    requests = [(names + [None])[e % (len(names) + 1)] for e in range(batch)]
    indices = stack.indices(requests)
    served = lx.loraify(model, stack, indices)
    images = jr.normal(key_x, (batch, size, size, 3))

    forward = jax.jit(lx.quaxify(lambda m, x: m(x)))
    logits = np.asarray(forward(served, images))

    base_convs = count_convs(lambda m, x: m(x), model, images)
    served_convs = count_convs(lx.quaxify(lambda m, x: m(x)), served, images)
    print(
        f"\nThe model runs {base_convs} convolutions; served with {len(names)} "
        f"adapters, {served_convs}.\nEach adapted conv adds one, whose kernel holds "
        "every adapter's A side by side:\nno per-image kernel is built."
    )

    base_logits = np.asarray(jax.jit(lambda m, x: m(x))(model, images))
    print(f"\n{'image':>5}  {'adapter':<9}  {'class':>5}  {'moved':>7}  deviation")
    worst = 0.0
    for e, name in enumerate(requests):
        alone = model if name is None else lx.merge(model, stack[name])
        want = np.asarray(alone(images[e : e + 1]))[0]
        dev = float(np.abs(logits[e] - want).max() / np.abs(want).max())
        moved = float(np.abs(logits[e] - base_logits[e]).max())
        worst = max(worst, dev)
        label = name or "base"
        print(
            f"{e:>5}  {label:<9}  {int(logits[e].argmax()):>5}  {moved:>7.3f}  "
            f"{dev:.1e}"
        )
    print(
        "\n'moved': the largest change of the image's logits from the base model's;"
        "\n'deviation': from running the image alone through its adapter's merged"
        "\nmodel, relative to its largest logit."
    )
    print(f"Largest deviation from the merged models: {worst:.1e} (float32 rounding)")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    worst = main(args.batch, args.size, args.seed)
    assert worst < 1e-4, worst
