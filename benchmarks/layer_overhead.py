"""One projection layer: batched multi-LoRA against the base model and the
alternatives a user would otherwise reach for.

Workload (defaults): 16 sequences x 128 tokens, d_in 1024 -> d_out 4096, 16 adapters
of rank 16, one adapter per sequence, float32. Variants, timed interleaved in one
process (median of many runs):

- base:      x @ W, no LoRA (the floor is ~1.02x: the extra flops of rank 16);
- ours:      lx.quaxify(x @ W) with W a BatchedLoraArray (gather per sequence);
- merged:    build W + s·A_i B_i for every sequence, then a batched matmul;
- loop:      base matmul, then one low-rank update per adapter, masked onto the
             rows that use it (a Python loop over adapters inside jit; one
             program for any assignment of adapters);
- sub-batch: PEFT's mixed batch: each adapter's rows gathered, adapted and
             scattered back (their counts are shapes: a program per composition);
- one-hot:   x·A for every adapter, masked by a one-hot of the indices, then ·B.

Prints each variant's median time as a ratio to the base matmul.

Run: python -m benchmarks.layer_overhead [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lorax_arrays as lx


def build(batch, seq, d_in, d_out, n_adapters, rank, key):
    kw, ka, kb, kx, ki = jr.split(key, 5)
    w = jr.normal(kw, (d_in, d_out)) / d_in**0.5
    a = jr.normal(ka, (n_adapters, d_in, rank)) / d_in**0.5
    b = jr.normal(kb, (n_adapters, rank, d_out)) / rank**0.5
    scale = jnp.full((n_adapters,), 2.0)
    x = jr.normal(kx, (batch, seq, d_in))
    idx = jr.randint(ki, (batch,), 0, n_adapters)
    return w, a, b, scale, x, idx


def variants(n_adapters, idx):
    @jax.jit
    def base(w, a, b, scale, x, idx):
        return x @ w

    @jax.jit
    def ours(w, a, b, scale, x, idx):
        lora = lx.BatchedLoraArray(
            w, a, b, scale=scale, indices=idx, in_axes=0, out_axes=1
        )
        return lx.quaxify(lambda W, x: x @ W)(lora, x)

    @jax.jit
    def merged(w, a, b, scale, x, idx):
        w_e = w + scale[idx, None, None] * jnp.einsum("bir,bro->bio", a[idx], b[idx])
        return jnp.einsum("bti,bio->bto", x, w_e)

    @jax.jit
    def loop(w, a, b, scale, x, idx):
        y = x @ w
        for i in range(n_adapters):
            mask = (idx == i)[:, None, None]
            y = y + jnp.where(mask, scale[i] * ((x @ a[i]) @ b[i]), 0.0)
        return y

    groups = [(int(i), np.nonzero(np.asarray(idx) == i)[0]) for i in np.unique(idx)]

    @jax.jit
    def sub_batch(w, a, b, scale, x, idx):
        y = x @ w
        for i, rows in groups:
            y = y.at[rows].add(scale[i] * ((x[rows] @ a[i]) @ b[i]))
        return y

    @jax.jit
    def one_hot(w, a, b, scale, x, idx):
        t = jnp.einsum("bti,nir->btnr", x, a)
        t = t * (jax.nn.one_hot(idx, n_adapters) * scale)[:, None, :, None]
        return x @ w + jnp.einsum("btnr,nro->bto", t, b)

    return {
        "base": base,
        "ours": ours,
        "merged": merged,
        "loop": loop,
        "sub-batch": sub_batch,
        "one-hot": one_hot,
    }


def time_interleaved(fns, args, repeats):
    for f in fns.values():  # compile and warm up
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    times = {k: [] for k in fns}
    order = np.random.default_rng(0)
    for _ in range(repeats):
        for k in order.permutation(list(fns)):  # a fresh order every round
            f = fns[k]
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--d-out", type=int, default=4096)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    args = p.parse_args()
    if args.quick:
        args.seq, args.d_in, args.d_out, args.repeats = 16, 128, 256, 5
    data = build(
        args.batch,
        args.seq,
        args.d_in,
        args.d_out,
        args.adapters,
        args.rank,
        jr.PRNGKey(0),
    )
    fns = variants(args.adapters, data[-1])
    ref = fns["merged"](*data)
    for k, f in fns.items():
        err = float(jnp.max(jnp.abs(f(*data) - ref)) / jnp.max(jnp.abs(ref)))
        assert k == "base" or err < 1e-4, (k, err)
    med = time_interleaved(fns, data, args.repeats)
    print(
        f"{args.batch} seqs x {args.seq} tokens, {args.d_in} -> {args.d_out}, "
        f"{args.adapters} adapters of rank {args.rank}, one adapter per sequence, "
        f"float32, {jax.default_backend()}; median of {args.repeats}, interleaved"
    )
    print(f"{'variant':<10} {'ms':>9} {'/ base':>8} {'/ ours':>8}")
    for k, t in med.items():
        print(
            f"{k:<10} {t * 1e3:>9.2f} {t / med['base']:>7.2f}x {t / med['ours']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
