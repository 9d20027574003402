"""A qwix-quantised base under many adapters: weight memory and speed against the
float base with the same adapters.

Model (defaults): a Flax NNX stack of 4 residual MLP blocks, d 512 -> 2048 -> 512
(`nnx.Linear`), every kernel adapted; 8 adapters of rank 16, one per sequence, with
base-only (-1) rows mixed in. The base is the float model, or that model after
qwix's post-training quantisation to int8 or int4 (per-channel, weights only:
QLoRA's setting), converted with `lx.from_qwix`. Two workloads: prefill (8
sequences x 64 tokens) and decode (8 sequences x 1 token).

Variants, timed interleaved in one process (median of many runs), each
`jax.jit`-compiled:

- float:        `lx.quaxify(model)` over the float base with the adapters;
- int8 / int4:  the same over the quantised base (qwix's dot_general for the
                base product, the low-rank term in float);
- float, no LoRA / qwix int8, no LoRA: the float model and qwix's own quantised
                model (its interception) without adapters, for reference.

Prints the bytes of the kernels (the weights that are quantised) for each base,
and each variant's median time as a ratio to the float base with adapters.

Run: python -m benchmarks.qwix_base [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

import lorax_arrays as lx
from benchmarks._common import interleaved


class Block(nnx.Module):
    def __init__(self, d, hidden, rngs):
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class Stack(nnx.Module):
    def __init__(self, d, hidden, layers, rngs):
        self.blocks = nnx.List([Block(d, hidden, rngs) for _ in range(layers)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def quantised(model, x, qtype):
    rule = qwix.QtRule(module_path=".*", weight_qtype=qtype)
    return qwix.quantize_model(model, qwix.PtqProvider([rule]), x)


def _bits(dtype) -> int:
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    return jnp.finfo(dtype).bits


def kernel_bytes(tree) -> tuple[int, int]:
    """(bytes on the device, bytes at the values' bit width) of every kernel: a
    float kernel, or a quantised one's codes and scales."""
    is_q = lambda x: isinstance(x, lx.QwixArray)  # noqa: E731
    device = packed = 0
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0]:
        if "kernel" not in jax.tree_util.keystr(kp):
            continue
        for x in jax.tree.leaves(leaf.qarray if is_q(leaf) else leaf):
            device += x.on_device_size_in_bytes()
            packed += x.size * _bits(x.dtype) // 8
    return device, packed


def random_adapters(model, rules, n, key) -> list[lx.Adapter]:
    out = []
    for i in range(n):
        ad = lx.init_adapter(model, rules, key=jax.random.fold_in(key, i))
        weights = {}
        for path, (a, b) in ad.weights.items():
            k = jax.random.fold_in(jax.random.fold_in(key, 1000 + i), hash(path) % 997)
            weights[path] = (a, 0.02 * jax.random.normal(k, b.shape, b.dtype))
        out.append(dataclasses.replace(ad, weights=weights))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    args = p.parse_args()
    if args.quick:
        args.d, args.hidden, args.layers, args.seq, args.repeats = 32, 64, 1, 4, 2

    model = Stack(args.d, args.hidden, args.layers, nnx.Rngs(0))
    x_calib = jnp.ones((1, args.d))
    q = {qt: quantised(model, x_calib, qt) for qt in ("int8", "int4")}
    bases = {"float": model} | {qt: lx.from_qwix(m) for qt, m in q.items()}

    rules = [lx.LoraRule("kernel", args.rank, alpha=2.0 * args.rank)]
    adapters = random_adapters(model, rules, args.adapters, jax.random.PRNGKey(1))
    stack = lx.stack_adapters(adapters)
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(stack.weights))

    print(
        f"{args.layers} blocks, d {args.d} -> {args.hidden} -> {args.d}, "
        f"{args.adapters} adapters of rank {args.rank} on every kernel, "
        f"{jax.default_backend()}"
    )
    float_bytes = kernel_bytes(model)[0]
    head = ("base", "kernel bytes", "/ float", "at bit width", "/ float")
    print("\n{:<8} {:>14} {:>8} {:>14} {:>8}".format(*head))
    for name, base in bases.items():
        dev, packed = kernel_bytes(base)
        print(
            f"{name:<8} {dev:>14,} {dev / float_bytes:>7.3f}x {packed:>14,} "
            f"{packed / float_bytes:>7.3f}x"
        )
    print(f"adapters: {adapter_bytes:,} bytes (the same for every base)")

    call = jax.jit(lx.quaxify(lambda m, x: m(x)))
    plain = jax.jit(lambda m, x: m(x))
    key = jax.random.PRNGKey(2)
    for workload, seq in (("prefill", args.seq), ("decode", 1)):
        x = jax.random.normal(key, (args.batch, seq, args.d))
        idx = jnp.arange(args.batch) % (args.adapters + 1) - 1  # -1 rows included
        served = {k: lx.loraify(b, stack, idx) for k, b in bases.items()}
        fns = {k: (call, (s, x)) for k, s in served.items()}
        fns["float, no LoRA"] = (plain, (model, x))
        fns["qwix int8, no LoRA"] = (plain, (q["int8"], x))
        # The quantised rows stay close to the float model's (the quantisation
        # error), and base rows equal qwix's own quantised model.
        y_f, y_8 = call(served["float"], x), call(served["int8"], x)
        rel = float(jnp.max(jnp.abs(y_8 - y_f)) / jnp.max(jnp.abs(y_f)))
        assert rel < 0.05, rel
        base_rows = np.asarray(idx) == -1
        np.testing.assert_allclose(
            np.asarray(y_8)[base_rows],
            np.asarray(plain(q["int8"], x))[base_rows],
            rtol=1e-5,
            atol=1e-5,
        )
        med = interleaved(
            {
                k: lambda f=f, a=a: jax.block_until_ready(f(*a))
                for k, (f, a) in fns.items()
            },
            args.repeats,
        )
        print(
            f"\n{workload}: {args.batch} sequences x {seq} tokens; median of "
            f"{args.repeats}, interleaved"
        )
        print(f"{'variant':<20} {'ms':>9} {'/ float':>8}")
        for k, t in med.items():
            print(f"{k:<20} {t * 1e3:>9.2f} {t / med['float']:>7.2f}x")


if __name__ == "__main__":
    main()
