"""Shared by the benchmark scripts: interleaved timing, and the MLP workload of
the performance issue (a `lax.scan` over layers of `w1`/`w2`, and a stack of
random adapters for it), used by `suite`, `index_guard`, `variants` and
`compile_time`."""

from __future__ import annotations

import statistics
import time

import jax
import jax.random as jr
import numpy as np

import lorax_arrays as lx


def interleaved(variants: dict, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each variant, timed interleaved: every round
    runs each once, in a fresh random order (a variant that runs right after a
    heavy one pays for the memory it freed; shuffling spreads that cost).
    `variants` maps a name to a thunk, or to `(run, warm)` where `warm()`
    compiles what `run()` needs; a thunk is warmed by calling it."""
    variants = {k: v if isinstance(v, tuple) else (v, v) for k, v in variants.items()}
    for _, warm in variants.values():
        warm()
    times = {k: [] for k in variants}
    order = np.random.default_rng(seed)
    for _ in range(repeats):
        for name in order.permutation(list(variants)):
            t = time.perf_counter()
            variants[name][0]()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def mlp_params(key, layers, d_model, d_ff):
    k1, k2 = jr.split(key)
    return {
        "w1": jr.normal(k1, (layers, d_model, d_ff)) / d_model**0.5,
        "w2": jr.normal(k2, (layers, d_ff, d_model)) / d_ff**0.5,
    }


def mlp(params, x):
    def layer(h, p):
        return h + jax.nn.gelu(h @ p["w1"]) @ p["w2"], None

    return jax.lax.scan(layer, x, params)[0]


def make_adapters(params, n, ranks, key):
    """n adapters for every weight of `params`; ranks cycle through `ranks`."""
    out = []
    for i, k in enumerate(jr.split(key, n)):
        r = ranks[i % len(ranks)]
        rules = [lx.LoraRule(r"w[12]", rank=r, alpha=2 * r, stack_axes=0)]
        ad = lx.init_adapter(params, rules, key=k)
        leaves, tree = jax.tree.flatten(ad)
        ks = jr.split(jr.fold_in(k, 1), len(leaves))
        leaves = [x + 0.02 * jr.normal(kk, x.shape) for x, kk in zip(leaves, ks)]
        out.append(jax.tree.unflatten(tree, leaves))
    return lx.stack_adapters(out)
