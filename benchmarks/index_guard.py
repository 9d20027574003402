"""What the out-of-range index guard costs: a traced adapter index outside
`[-1, n)` makes its rows NaN (`_indices.gathered_scale`) instead of silently
serving the last adapter, as a bare clamp would.

The guard is a gather from `[0, *scale, NaN]` on the `(rows,)` vector of scales,
once per adapted matmul. Measured on the benchmark suite's workloads (the same MLP
stack and shapes as `benchmarks/suite.py`): W1 (16 sequences x 128 tokens, 16
adapters, one per sequence) and W3 (64 decode rows over 8 adapters, where a
matmul is cheapest and the guard's share largest). Each workload runs twice, traced
with and without the guard, timed interleaved in one process (fresh random order
every round, median of `--repeats`). Also printed: the jaxpr equations each adds.

A third variant serves the same adapters as an `AdapterBank` does, in the per-step
pattern of a server: the bank's issued indices (`generation * n + slot`) passed
traced into the jitted step and set with `lx.with_indices`, which decodes them on
the device against the `(n,)` generations (`_indices.decode_issued`: once per
step for every leaf, a gather per row), so that a copied or stale index selects
nothing. Its cost is printed against both.

Run: python -m benchmarks.index_guard            (~2 minutes on 2 CPU cores)
     python -m benchmarks.index_guard --quick    (tiny shapes; used by tests)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.extend.core as jex
import jax.random as jr
import numpy as np
from jax import lax

import lorax_arrays as lx
from benchmarks._common import make_adapters, mlp, mlp_params
from lorax_arrays._core import array as _array, indices as _indices, lax as _lax
from lorax_arrays._rules import dot as _rules_dot, lookup as _rules_lookup


def unguarded_scale(scale, indices):
    """The scale without the guard (as before it): `scale[i]`, 0 for -1, and
    whatever adapter the clamp lands on for anything out of range."""
    keep = lax.ge(indices, lax.full_like(indices, 0))
    zero = lax.full_like(indices, 0, scale.dtype)
    safe = _indices.clamp_indices(indices, scale.shape[0])
    return lax.select(keep, _lax.take(scale, safe, 0), zero)


@contextlib.contextmanager
def guard_removed():
    """Traces inside the block use `unguarded_scale` in every rule."""
    modules = (_indices, _array, _rules_dot, _rules_lookup)
    saved = [m.gathered_scale for m in modules]
    for m in modules:
        m.gathered_scale = unguarded_scale
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.gathered_scale = f


def n_eqns(f, *args) -> int:
    """Equations in the jaxpr of `f`, sub-jaxprs (the scan body) included."""

    def count(jaxpr):
        return sum(
            1 + sum(count(sub) for sub in jex.jaxprs_in_params(e.params))
            for e in jaxpr.eqns
        )

    return count(jax.make_jaxpr(f)(*args).jaxpr)


def workload(label, layers, batch, seq, d_model, d_ff, n, repeats, key):
    kp, ka, kx, ki = jr.split(key, 4)
    params = mlp_params(kp, layers, d_model, d_ff)
    stack = make_adapters(params, n, [16], ka)
    x = jr.normal(kx, (batch, seq, d_model))
    idx = jr.randint(ki, (batch,), 0, n)
    served = lx.loraify(params, stack, idx)
    # As a bank serves them: issued values, decoded against the generations.
    gens = jax.numpy.arange(n, dtype=jax.numpy.int32) * 7 + 1000
    issued = jax.tree.map(
        lambda x: (
            x.replace(generations=gens) if isinstance(x, lx.BatchedLoraArray) else x
        ),
        served,
        is_leaf=lambda x: isinstance(x, lx.BatchedLoraArray),
    )
    issued_idx = gens[idx] * n + idx
    # A new function object per variant: JAX caches traces by function.
    fwd = lx.quaxify(mlp)
    guarded = jax.jit(fwd).lower(served, x).compile()
    eq_guarded = n_eqns(fwd, served, x)
    with guard_removed():
        fwd = lx.quaxify(lambda p, x: mlp(p, x))
        bare = jax.jit(fwd).lower(served, x).compile()
        eq_bare = n_eqns(fwd, served, x)

    def step(p, i, x):  # a server's jitted step: indices traced
        return lx.quaxify(lambda p, x: mlp(p, x))(lx.with_indices(p, i), x)

    decoded = jax.jit(step).lower(issued, issued_idx, x).compile()
    eq_issued = n_eqns(step, issued, issued_idx, x)
    a, b = np.asarray(guarded(served, x)), np.asarray(bare(served, x))
    np.testing.assert_array_equal(a, b)  # in-range indices: the same numbers
    np.testing.assert_array_equal(a, np.asarray(decoded(issued, issued_idx, x)))
    progs = {
        "guarded": lambda: guarded(served, x),
        "unguarded": lambda: bare(served, x),
        "issued": lambda: decoded(issued, issued_idx, x),
    }
    times = {k: [] for k in progs}
    order = np.random.default_rng(0)
    for _ in range(repeats):
        for name in order.permutation(list(progs)):
            t = time.perf_counter()
            jax.block_until_ready(progs[name]())
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["guarded"] / med["unguarded"]
    issued_ratio = med["issued"] / med["unguarded"]
    print(
        f"| {label} | {med['unguarded'] * 1e3:.2f} | {med['guarded'] * 1e3:.2f} | "
        f"{med['issued'] * 1e3:.2f} | {ratio:.4f}x | {issued_ratio:.4f}x | "
        f"{eq_guarded - eq_bare} / {eq_issued - eq_bare} |",
        flush=True,
    )
    return ratio, issued_ratio


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=41)
    args = p.parse_args()
    if args.quick:
        d_model, d_ff, seq, batch, layers, dec, reps = 32, 64, 8, 4, 2, 8, 3
    else:
        d_model, d_ff, seq, batch, layers, dec = 1024, 4096, 128, 16, 2, 64
        reps = args.repeats
    print(
        "| workload | unguarded ms | guarded ms | bank-issued ms | guarded / "
        "unguarded | bank-issued / unguarded | added jaxpr equations (guarded / "
        "issued) |\n|---|---|---|---|---|---|---|"
    )
    key = jr.PRNGKey(0)
    w1, w1_issued = workload(
        "W1 prefill, 16 adapters", layers, batch, seq, d_model, d_ff, 16, reps, key
    )
    workload("W3 decode, 8 adapters", layers, dec, 1, d_model, d_ff, 8, reps, key)
    for what, r in (("the guard", w1), ("the guard + issued indices", w1_issued)):
        verdict = "met" if r < 1.01 else "NOT met"
        print(f"W1 cost of {what}: {100 * (r - 1):+.2f}% (target < 1%: {verdict})")


if __name__ == "__main__":
    main()
