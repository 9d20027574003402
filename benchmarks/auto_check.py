"""How good are `auto`'s picks? One `(tokens x 1024) @ (1024 x 4096)` layer,
rank 16, over a grid of adapter patterns: every strategy is timed (interleaved,
medians) and `auto`'s pick is compared with the fastest.

Prints, per shape: each strategy's time as a ratio to the base matmul, the
fastest, `auto`'s pick and its regret (time of the pick / time of the fastest).

Run: python -m benchmarks.auto_check [--repeats 9]
     python -m benchmarks.auto_check --quick   (tiny shapes, seconds; used by tests)
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

# (label, rows G, tokens per row R, adapters n): indices have shape (G,)
GRID = [
    ("prefill, per sequence", 16, 128, 4),
    ("prefill, per sequence", 16, 128, 16),
    ("prefill, per sequence", 16, 128, 64),
    ("prefill, per token", 2048, 1, 4),
    ("prefill, per token", 2048, 1, 16),
    ("prefill, per token", 2048, 1, 64),
    ("prefill, per token", 2048, 1, 256),
    ("decode", 64, 1, 8),
    ("decode", 64, 1, 64),
    ("decode", 256, 1, 16),
]


def programs(g, r_tok, n, d_in=1024, d_out=4096, rank=16):
    k = jr.split(jr.PRNGKey(0), 5)
    w = jr.normal(k[0], (d_in, d_out)) / d_in**0.5
    a = jr.normal(k[1], (n, d_in, rank)) / d_in**0.5
    b = jr.normal(k[2], (n, rank, d_out))
    x = jr.normal(k[3], (g, r_tok, d_in))
    idx = jr.randint(k[4], (g,), 0, n)
    matmul = lambda w, x: x @ w  # noqa: E731
    lora = lx.BatchedLoraArray(w, a, b, scale=1.0, indices=idx, in_axes=0, out_axes=1)
    out = {"base": (jax.jit(matmul), (w, x))}
    for s in ("gather", "dense", "segment"):
        out[s] = (jax.jit(lx.quaxify(matmul, strategy=s)), (lora, x))
    (choice,) = lx.explain_strategies(matmul, lora, x)  # auto's pick, one product
    return out, choice.strategy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    dims = dict(d_in=32, d_out=64, rank=4) if args.quick else {}
    reps = 2 if args.quick else args.repeats
    print(
        "| pattern | G x R tokens | adapters | gather | dense | segment | fastest | "
        "auto picks | regret |\n|---|---|---|---|---|---|---|---|---|"
    )
    regrets = []
    # --quick (the tests) smoke-tests every fourth grid row: each row compiles four
    # programs, and only the script's plumbing is under test there.
    for label, g, r_tok, n in GRID[::4] if args.quick else GRID:
        if args.quick:
            g, r_tok = max(2, g // 16), max(1, r_tok // 16)
        progs, pick = programs(g, r_tok, n, **dims)
        for f, a in progs.values():
            jax.block_until_ready(f(*a))
        times = {k: [] for k in progs}
        order = np.random.default_rng(0)
        for _ in range(reps):
            for k in order.permutation(list(progs)):  # a fresh order every round
                f, a = progs[k]
                t = time.perf_counter()
                jax.block_until_ready(f(*a))
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        ours = {k: med[k] / med["base"] for k in ("gather", "dense", "segment")}
        best = min(ours, key=ours.get)
        regret = ours[pick] / ours[best]
        regrets.append(regret)
        cells = " | ".join(f"{v:.2f}x" for v in ours.values())
        print(
            f"| {label} | {g} x {r_tok} | {n} | {cells} | {best} | {pick} | "
            f"{regret:.2f} |",
            flush=True,
        )
    dev = jax.devices()[0]
    print(
        f"\n{dev.platform}, jax {jax.__version__}: worst regret "
        f"{max(regrets):.2f}, mean {sum(regrets) / len(regrets):.2f}."
    )
    return jnp.asarray(regrets)


if __name__ == "__main__":
    main()
