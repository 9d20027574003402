"""What the LoRA variants cost to serve: DoRA, IA3 and VeRA adapters against plain
LoRA and the base model, and all of them mixed in one batch.

Adapter `i` on a weight stands for `diag(h_i) (W + s_i A_i B_i) diag(g_i)`; served
from one stack, every row pays for the stack's largest rank and for any vector
some adapter in the stack has. Workloads (the MLP stack of `benchmarks/suite.py`,
two scanned layers, d_model 1024, d_ff 4096):

- W1 prefill: 16 sequences x 128 tokens, 16 adapters, one adapter per sequence.
- W3 decode: 64 single-token rows over 8 adapters.

Variants, each `jax.jit(lx.quaxify(mlp))` on `lx.loraify(params, adapters, idx)`
made once outside the timed call (as a server does: DoRA's norms are computed
there), timed interleaved in one process (fresh random order every round, median
of the repeats):

- `base`: the model without adapters.
- `lora`: every adapter a LoRA of rank 16 on w1 and w2.
- `dora`: every adapter a DoRA of rank 16 (LoRA plus a magnitude per out-feature).
- `ia3`: every adapter IA3 (rank 0): `ia3` on w1's output, `ia3_feedforward`
  on w2's input.
- `vera`: every adapter a VeRA, served as the LoRA it is (shared projections
  scaled by its vectors, alpha = rank) at VeRA's typical rank 256 (capped to
  d_model).
- `mixed`: adapters of every kind in one stack (LoRA, DoRA, IA3 and VeRA in
  turn) and base rows (-1) in the batch. The stack pads every adapter to the
  largest rank there (VeRA's), so every row pays for it.
- `mixed-r16`: the same without the VeRA adapters (LoRA, DoRA, IA3 and base rows,
  rank 16): what the mix costs when the ranks agree.

Before timing, every variant's output is checked row by row against each row's
adapter alone, merged into the weights with `lx.merge` (base rows: the base model),
and every adapted row must differ from the base model's, so a broken variant cannot
produce a good number. Also reported: the one-off time of `lx.loraify` (DoRA's
computes the column norms of `W + s·A B` for every adapter), and XLA's temporary
memory of each compiled program (compiled memory analysis) in MiB.

Run: python -m benchmarks.variants            (full; ~6 minutes on 2 CPU cores)
     python -m benchmarks.variants --quick    (tiny shapes, seconds; used by tests)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lorax_arrays as lx
from benchmarks._common import interleaved, mlp, mlp_params

VARIANTS = ["base", "lora", "dora", "ia3", "vera", "mixed", "mixed-r16"]
RANK = 16  # LoRA and DoRA
VERA_RANK = 256  # capped to d_model
MIXED = ["lora", "dora", "ia3", "vera"]  # adapter i of `mixed` is MIXED[i % 4]
MIXED_R16 = ["lora", "dora", "ia3"]
# A row agrees with its adapter merged into the weights to this (relative to the
# largest output); an adapted row differs from the base model's by more than MOVED.
TOL, MOVED = 1e-4, 1e-3


def rules(kind: str, vera_rank: int) -> list[lx.LoraRule]:
    if kind == "lora":
        return [lx.LoraRule(r"w[12]", RANK, alpha=2 * RANK, stack_axes=0)]
    if kind == "dora":
        return [
            lx.LoraRule(r"w[12]", RANK, alpha=2 * RANK, variant="dora", stack_axes=0)
        ]
    if kind == "ia3":
        return [
            lx.LoraRule("w1", 0, variant="ia3", stack_axes=0),
            lx.LoraRule("w2", 0, variant="ia3_feedforward", stack_axes=0),
        ]
    if kind == "vera":  # VeRA's scale is 1: alpha = rank
        return [lx.LoraRule(r"w[12]", vera_rank, alpha=vera_rank, stack_axes=0)]
    raise ValueError(kind)


def vera_projections(params, vera_rank: int, rng) -> dict:
    """VeRA's frozen projections, shared by every adapter (and every layer):
    per weight `A: (d_in, r)` and `B: (r, d_out)`, Kaiming-uniform as in PEFT."""
    out = {}
    for name, w in sorted(params.items()):
        d_in, d_out = w.shape[-2:]
        a = rng.uniform(-1, 1, (d_in, vera_rank)) / d_in**0.5
        b = rng.uniform(-1, 1, (vera_rank, d_out)) / vera_rank**0.5
        out[name] = (a.astype(np.float32), b.astype(np.float32))
    return out


def make_adapter(params, kind: str, seed: int, vera_rank: int, shared: dict):
    """A random adapter of `kind`, as if trained: every factor and vector moved
    from its initial value (the noise drawn on the host: no kernel to compile)."""
    rng = np.random.default_rng(seed)
    ad = lx.init_adapter(params, rules(kind, vera_rank), key=jr.PRNGKey(seed))
    if kind == "vera":  # the LoRA a VeRA adapter is: A·diag(d), B·diag(b)
        weights = {}
        for name, (a_s, b_s) in shared.items():
            layers = params[name].shape[0]
            d = 0.1 + 0.05 * rng.normal(size=(layers, 1, vera_rank))  # d starts at 0.1
            b = rng.normal(size=(layers, 1, b_s.shape[-1]))  # b starts at 0
            weights[name] = tuple(
                jnp.asarray(v, jnp.float32) for v in (a_s * d, b_s * b)
            )
        return eqx.tree_at(lambda x: x.weights, ad, weights)
    leaves, tree = jax.tree.flatten(ad)
    leaves = [
        jnp.asarray(np.asarray(x) + 0.02 * rng.normal(size=x.shape), x.dtype)
        for x in leaves
    ]
    return jax.tree.unflatten(tree, leaves)


def np_gelu(x):
    """`jax.nn.gelu` (its default tanh approximation) in NumPy."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_mlp(params, x):
    h = x
    for layer in range(params["w1"].shape[0]):
        h = h + np_gelu(h @ params["w1"][layer]) @ params["w2"][layer]
    return h


def np_merged(params, ad: lx.Adapter) -> dict:
    """The weights with `ad` alone merged, in NumPy (not `lx.merge`):
    `diag(h) (W + s·A B) diag(g)`, DoRA's g = m / ‖W + s·A B‖ over the in-axis."""
    out = {}
    for name, w in params.items():
        m = np.asarray(w)
        if name in ad.paths:
            a, b = (np.asarray(v) for v in ad.weights[name])  # (L, in, r), (L, r, out)
            m = m + ad.scale(name) * (a @ b)
            if name in ad.magnitudes:
                mag = np.asarray(ad.magnitudes[name])
                m = m * (mag / np.linalg.norm(m, axis=-2))[..., None, :]
            if name in ad.in_scales:
                m = m * np.asarray(ad.in_scales[name])[..., :, None]
            if name in ad.out_scales:
                m = m * np.asarray(ad.out_scales[name])[..., None, :]
        out[name] = m
    return out


def check_rows(name, got, params, adapters, idx, x) -> float:
    """Every row of the batched output `got` against its adapter alone, merged into
    the weights in NumPy (the base model for -1 rows); adapted rows must have moved
    from the base model's. Returns the largest deviation relative to the largest
    output."""
    got, x, idx = np.asarray(got), np.asarray(x), np.asarray(idx)
    base = np_mlp({k: np.asarray(v) for k, v in params.items()}, x)
    scale = float(np.abs(base).max())
    worst = 0.0
    for i in np.unique(idx):
        rows = np.nonzero(idx == i)[0]
        want = base[rows] if i < 0 else np_mlp(np_merged(params, adapters[i]), x[rows])
        err = np.abs(got[rows] - want).reshape(len(rows), -1).max(1) / scale
        moved = np.abs(want - base[rows]).reshape(len(rows), -1).max(1) / scale
        worst = max(worst, float(err.max()))
        assert (err < TOL).all(), (name, int(i), rows, err)
        assert ((moved > MOVED) == (i >= 0)).all(), (name, int(i), rows, moved)
    return worst


def measure(v, repeats):
    """Compiles each variant once (its temporary memory from XLA's analysis),
    then times the compiled programs interleaved, in a fresh order every round."""
    programs, mem = {}, {}
    for name, (f, args) in v.items():
        compiled = f.lower(*args).compile()
        programs[name] = compiled
        try:
            mem[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        except Exception:  # backend without memory analysis
            mem[name] = float("nan")
    runs = {
        name: lambda p=programs[name], a=args: jax.block_until_ready(p(*a))
        for name, (_, args) in v.items()
    }
    return interleaved(runs, repeats), mem


def time_loraify(params, stack, idx, repeats) -> float:
    """The median of `repeats` warm calls of `lx.loraify` (eager, as a server
    calls it once per stack of adapters), in seconds."""
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(lx.loraify(params, stack, idx))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def strategies(served, x) -> str:
    """What `auto` picks for the adapted matmuls (w1, w2), '-' for none (IA3)."""
    picks = [c.strategy for c in lx.explain_strategies(mlp, served, x)]
    return "/".join(dict.fromkeys(picks)) or "-"


def run_workload(label, layers, batch, seq, d_model, d_ff, n, repeats, key):
    kp, kx, ki = jr.split(key, 3)
    params = mlp_params(kp, layers, d_model, d_ff)
    x = jr.normal(kx, (batch, seq, d_model))
    vera_rank = min(VERA_RANK, d_model)
    shared = vera_projections(params, vera_rank, np.random.default_rng(0))
    # One adapter per sequence, as in suite.py; the mixed batches also have base
    # rows: every adapter number and -1 in turn, shuffled.
    idx = jr.randint(ki, (batch,), 0, n)
    mixed_idx = jnp.asarray(
        np.random.default_rng(1).permutation(np.arange(batch) % (n + 1) - 1)
    )
    kinds = {k: [k] * n for k in ("lora", "dora", "ia3", "vera")}
    for name, mix in (("mixed", MIXED), ("mixed-r16", MIXED_R16)):
        kinds[name] = [mix[i % len(mix)] for i in range(n)]
    stacks, seed = {}, 0
    v = {"base": (jax.jit(mlp), (params, x))}
    ranks, errs, first, picks = {"base": 0}, {}, {}, {"base": "-"}
    for name, ks in kinds.items():
        adapters = []
        for kind in ks:
            adapters.append(make_adapter(params, kind, seed, vera_rank, shared))
            seed += 1
        stack = lx.stack_adapters(adapters)
        ix = mixed_idx if name.startswith("mixed") else idx
        stacks[name] = stack
        t = time.perf_counter()  # once, outside the timed call; its first call
        served = jax.block_until_ready(lx.loraify(params, stack, ix))
        first[name] = time.perf_counter() - t
        picks[name] = strategies(served, x)
        ranks[name] = int(served["w1"].a.shape[-1])  # the stack's largest
        # A new function object per variant: each its own program.
        f = jax.jit(lx.quaxify(mlp))
        v[name] = (f, (served, x))
        errs[name] = check_rows(name, f(served, x), params, adapters, ix, x)
    kinds_in_mixed = {MIXED[i % 4] for i in np.asarray(mixed_idx) if i >= 0}
    assert kinds_in_mixed == set(MIXED) and (mixed_idx < 0).any(), mixed_idx
    med, mem = measure(v, repeats)
    loraify_s = {
        k: (first[k], time_loraify(params, stacks[k], idx, max(3, min(repeats, 10))))
        for k in ("lora", "dora")
    }
    return {
        "label": label,
        "med": med,
        "mem": mem,
        "ranks": ranks,
        "errs": errs,
        "loraify": loraify_s,
        "picks": picks,
        "n": n,
    }


def table(results) -> str:
    head = "| variant | rank served |"
    sep = "|---|---|"
    for r in results:
        w = r["label"].split()[0]
        head += f" {w} ms | {w} / base | {w} / lora | {w} temp MiB | {w} auto |"
        sep += "---|---|---|---|---|"
    lines = [head, sep]
    for name in VARIANTS:
        row = f"| {name} | {results[0]['ranks'][name]} |"
        for r in results:
            med, mem = r["med"], r["mem"]
            row += (
                f" {med[name] * 1e3:.2f} | {med[name] / med['base']:.2f}x | "
                f"{med[name] / med['lora']:.2f}x | {mem[name]:.1f} | "
                f"{r['picks'][name]} |"
            )
        lines.append(row)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=15, help="W1 rounds")
    p.add_argument("--decode-repeats", type=int, default=200, help="W3 rounds")
    p.add_argument("--out", default=None, help="also write the report (Markdown)")
    args = p.parse_args()
    if args.quick:
        d_model, d_ff, seq, batch, layers, dec = 32, 64, 8, 8, 2, 16
        n1, reps, dec_reps = 8, 2, 2
    else:
        d_model, d_ff, seq, batch, layers, dec = 1024, 4096, 128, 16, 2, 64
        n1, reps, dec_reps = 16, args.repeats, args.decode_repeats
    key = jr.PRNGKey(0)
    workloads = [  # (label, batch, tokens per row, adapters, repeats)
        (f"W1 prefill, {batch}x{seq} tokens, {n1} adapters", batch, seq, n1, reps),
        (f"W3 decode, {dec} rows, 8 adapters", dec, 1, 8, dec_reps),
    ]
    results = []
    for label, b, t, n, r in workloads:
        t0 = time.perf_counter()
        res = run_workload(label, layers, b, t, d_model, d_ff, n, r, key)
        results.append(res)
        worst = max(res["errs"].values())
        print(
            f"{label}: every row matches its adapter merged alone (worst "
            f"{worst:.1e} of the largest output) [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    dev = jax.devices()[0]
    lines = [
        f"Device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}; "
        f"d_model {d_model}, d_ff {d_ff}, {layers} layers; medians of interleaved "
        f"runs ({reps} rounds W1, {dec_reps} W3).",
        "",
        table(results),
        "",
        "One-off `lx.loraify` per stack of adapters (eager; first call, which "
        "compiles its eager ops, / warm median); DoRA's computes the column norms:",
    ]
    for r in results:
        (lf, lw), (df, dw) = r["loraify"]["lora"], r["loraify"]["dora"]
        w = r["label"].split()[0]
        lines.append(
            f"- {r['label']}: lora {lf * 1e3:.1f} / {lw * 1e3:.2f} ms, "
            f"dora {df * 1e3:.1f} / {dw * 1e3:.1f} ms "
            f"(warm: {dw / r['med']['dora']:.2f} of a {w} dora forward pass)"
        )
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n")


if __name__ == "__main__":
    main()
