"""Trace + compile time of batched-LoRA programs against the plain model's.

Every LoRA adds matmuls to the program, so it adds compile time; the question is
how much more ours costs than the least any LoRA can cost. Three programs:

- `mlp`: the benchmark suite's model (2 scanned MLP layers, d_model 1024, d_ff
  4096), 16 x 128 tokens, both weights adapted;
- `generate`: `examples/generate.py` (a decoder with a KV cache, greedy prefill and
  12 decode steps in one jitted call), attention and MLP projections adapted;
- `generate+embed`: the same with the tied embedding adapted too (a low-rank
  row lookup and a transposed head).

Variants: `base` (no LoRA); `ours` (16 adapters, one per row, `auto`); `ours n=1`
(a stack of one adapter); `quax` (quax's single-adapter `LoraArray` on the same
weights: the cost of the smallest LoRA program, not available with the embedding
adapted). Each is traced and compiled cold (`jax.clear_caches()`) `--repeats`
times, interleaved; medians are reported as ratios to `base`, split into trace
(Python: quax dispatch and our rules) and lower + compile (XLA).

Run: python -m benchmarks.compile_time [--repeats 7]
     python -m benchmarks.compile_time --quick   (a small MLP, 1 repeat; for tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import quax

import lorax_arrays as lx
from benchmarks import _common, suite

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str):
    """`examples/<name>.py` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _example("generate")


def mlp_programs(n, d_model=1024, d_ff=4096, seq=128):
    kp, ka, kx, ki = jr.split(jr.PRNGKey(0), 4)
    params = _common.mlp_params(kp, 2, d_model, d_ff)
    x = jr.normal(kx, (16, seq, d_model))
    stack = _common.make_adapters(params, n, [16], ka)
    one = _common.make_adapters(params, 1, [16], ka)
    idx = jr.randint(ki, (16,), 0, n)
    zeros = jnp.zeros((16,), jnp.int32)
    return {
        "base": (jax.jit(_common.mlp), (params, x)),
        "ours": (jax.jit(lx.quaxify(_common.mlp)), (lx.loraify(params, stack, idx), x)),
        "ours n=1": (
            jax.jit(lx.quaxify(_common.mlp)),
            (lx.loraify(params, one, zeros), x),
        ),
        "quax": (
            jax.jit(quax.quaxify(_common.mlp)),
            (suite.quax_weights(params, one), x),
        ),
    }


def generate_programs(n, embed):
    kp, ka, kx, ki = jr.split(jr.PRNGKey(0), 4)
    params = gen.init_params(kp)
    prompts = jr.randint(kx, (16, 6), 0, gen.VOCAB)
    ranks = [2, 4, 8, 16]

    def stack_of(k):
        adapters = []
        for i, kk in enumerate(jr.split(ka, k)):
            r = ranks[i % len(ranks)]
            rules = [lx.LoraRule(r"layers/(wq|wv|wo|w1|w2)", rank=r, stack_axes=0)]
            if embed:
                rules.append(lx.LoraRule(r"^embed$", rank=r, in_axes=0, out_axes=1))
            ad = lx.init_adapter(params, rules, key=kk)
            adapters.append(jax.tree.map(lambda x: x + 0.1, ad))  # B != 0
        return lx.stack_adapters(adapters)

    def run(f):
        return jax.jit(f, static_argnums=2)

    idx = jr.randint(ki, (16,), 0, n)
    zeros = jnp.zeros((16,), jnp.int32)
    out = {
        "base": (run(gen.generate), (params, prompts, 12)),
        "ours": (
            run(lx.quaxify(gen.generate)),
            (lx.loraify(params, stack_of(n), idx), prompts, 12),
        ),
        "ours n=1": (
            run(lx.quaxify(gen.generate)),
            (lx.loraify(params, stack_of(1), zeros), prompts, 12),
        ),
    }
    if not embed:
        layers = suite.quax_weights(params["layers"], stack_of(1), prefix="layers/")
        out["quax"] = (
            run(quax.quaxify(gen.generate)),
            ({**params, "layers": layers}, prompts, 12),
        )
    return out


def measure(programs, repeats):
    trace = {k: [] for k in programs}
    comp = {k: [] for k in programs}
    for _ in range(repeats):
        for name, (f, args) in programs.items():
            jax.clear_caches()
            t0 = time.perf_counter()
            traced = f.trace(*args)
            t1 = time.perf_counter()
            traced.lower().compile()
            t2 = time.perf_counter()
            trace[name].append(t1 - t0)
            comp[name].append(t2 - t1)
    med = lambda v: statistics.median(v)  # noqa: E731
    return {k: (med(trace[k]), med(comp[k])) for k in programs}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--adapters", type=int, default=16)
    args = p.parse_args()
    n = args.adapters
    mlp = mlp_programs(n, 32, 64, 8) if args.quick else mlp_programs(n)
    repeats = 1 if args.quick else args.repeats
    rows = [("mlp", mlp)]
    if not args.quick:  # --quick (the tests) checks the plumbing on the MLP alone
        rows.append(("generate", generate_programs(n, embed=False)))
        rows.append(("generate+embed", generate_programs(n, embed=True)))
    print(
        "| program | base s (trace + compile) | ours | ours n=1 | quax 1 adapter | "
        "ours: trace / compile vs base |\n|---|---|---|---|---|---|"
    )
    for label, programs in rows:
        # The single-adapter programs must compute the same thing.
        if "quax" in programs:
            a = programs["ours n=1"]
            b = programs["quax"]
            err = np.max(np.abs(np.asarray(a[0](*a[1])) - np.asarray(b[0](*b[1]))))
            assert err < 1e-3, (label, err)
        res = measure(programs, repeats)
        tot = {k: sum(v) for k, v in res.items()}
        base = tot["base"]
        cells = [
            f"{tot[k] / base:.2f}x" if k in tot else "-"
            for k in ("ours", "ours n=1", "quax")
        ]
        tr = res["ours"][0] / res["base"][0]
        co = res["ours"][1] / res["base"][1]
        print(
            f"| {label} | {base:.2f} ({res['base'][0]:.2f} + {res['base'][1]:.2f}) | "
            + " | ".join(cells)
            + f" | "
            f"{tr:.2f}x / {co:.2f}x |",
            flush=True,
        )
    dev = jax.devices()[0]
    print(
        f"\n{dev.platform}, jax {jax.__version__}; medians of {repeats} cold "
        f"traces+compiles, interleaved; ours uses {n} adapters."
    )


if __name__ == "__main__":
    main()
