"""The benchmark suite: batched multi-LoRA against the base model and the
alternatives, on the workloads of the performance issue.

- W1 prefill: 16 sequences x 128 tokens through a stack of MLP layers
  (d_model 1024, d_ff 4096), 16 adapters of rank 16, one adapter per sequence.
- W2 the same tokens, a random adapter per token.
- W3 decode: 64 single-token rows over 8 adapters; and over 64 distinct adapters
  (there the adapters hold more bytes than the base weight).
- W4 scaling, one 1024 -> 4096 layer, one adapter per sequence: adapters in
  {1, 4, 16, 64, 256} x rank in {8, 16, 64}, and mixed ranks.

Variants, timed interleaved in one process (median of `--repeats` runs each):
`base` (no LoRA), `gather`/`segment`/`dense`/`auto` (ours, strategy forced),
`merged` (W + s·A_i B_i built per example, then a batched matmul), `loop` (a
per-adapter loop inside jit, each adapter's product masked onto its rows: one
program for any assignment), `sub-batch` (PEFT's mixed batches: each adapter's rows
gathered, adapted, scattered back; their counts are shapes, so a new program per
batch composition),
`quax` (quax's own single-adapter LoraArray, only with 1 adapter).

Reported: time as a ratio to `base`, trace+compile time (cold, median of 3; one in
`--quick` mode) as a ratio to base's, and XLA's temporary memory (compiled memory
analysis) in MiB. A table is printed and written to `--out` (Markdown), and a plot
of overhead vs number of adapters is saved as PNG next to it.

Run: python -m benchmarks.suite            (full; ~30 minutes on 2 CPU cores)
     python -m benchmarks.suite --quick    (tiny shapes, seconds; used by tests)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import quax
import quax.examples.lora as quax_lora

import lorax_arrays as lx
from benchmarks._common import make_adapters, mlp, mlp_params

OURS = ["gather", "segment", "dense", "auto"]


def merged_forward(params, stack, idx, x):
    """Merge per example: W_e = W + s·A_i B_i for every example and layer."""
    ws = {}
    for name, w in params.items():
        a, b = stack.weights[name]  # (L, n, d_in, r), (L, n, r, d_out)
        s = jnp.where(idx >= 0, stack.scales[name][jnp.maximum(idx, 0)], 0.0)
        delta = jnp.einsum(
            "lbir,lbro->lbio", a[:, jnp.maximum(idx, 0)], b[:, jnp.maximum(idx, 0)]
        )
        ws[name] = w[:, None] + s[None, :, None, None] * delta  # (L, B, in, out)

    def layer(h, p):
        up = jax.nn.gelu(jnp.einsum("bti,bio->bto", h, p["w1"]))
        return h + jnp.einsum("bti,bio->bto", up, p["w2"]), None

    return jax.lax.scan(layer, x, ws)[0]


def unrolled_mlp(params, x, lin):
    """`mlp` with its layers unrolled in Python and every matmul `lin(h, name, w,
    layer)`, for the loops, which treat each adapted matmul themselves."""
    h = x
    for layer in range(params["w1"].shape[0]):
        up = jax.nn.gelu(lin(h, "w1", params["w1"][layer], layer))
        h = h + lin(up, "w2", params["w2"][layer], layer)
    return h


def loop_forward(params, stack, idx, x):
    """Base matmul, then for each adapter its low-rank product over the whole batch,
    masked onto the rows that use it: one program for any assignment."""

    def lin(h, name, w, layer):
        y = h @ w
        a, b = stack.weights[name]
        for i in range(stack.n_adapters):
            rows = (idx == i)[:, None, None]
            d = (h @ a[layer, i]) @ b[layer, i] * stack.scales[name][i]
            y = y + jnp.where(rows, d, 0.0)
        return y

    return unrolled_mlp(params, x, lin)


def make_subbatch_forward(idx):
    """PEFT's mixed-adapter batch as JAX can run it: the rows of each adapter are
    gathered, adapted and scattered back. Their counts are shapes, so they are
    fixed when tracing: every new batch composition compiles a new program."""
    idx = np.asarray(idx)
    groups = [(int(i), np.nonzero(idx == i)[0]) for i in np.unique(idx) if i >= 0]

    def forward(params, stack, x):
        def lin(h, name, w, layer):
            y = h @ w
            a, b = stack.weights[name]
            for i, rows in groups:
                d = (h[rows] @ a[layer, i]) @ b[layer, i] * stack.scales[name][i]
                y = y.at[rows].add(d)
            return y

        return unrolled_mlp(params, x, lin)

    return forward


def quax_weights(params, stack, prefix=""):
    """`params` with every weight the stack adapts replaced by quax's LoraArray
    holding adapter 0 (its scale folded into A); `prefix` is stripped from the
    stack's paths to find the weight in `params`."""
    out = dict(params)
    for path, (a, b) in stack.weights.items():
        name = path.removeprefix(prefix)
        la = quax_lora.LoraArray.__new__(quax_lora.LoraArray)
        for field, value in [
            ("_w", params[name]),
            ("a", a[:, 0] * stack.scales[path][0]),
            ("b", b[:, 0]),
            ("stop_gradient", True),
            ("allow_materialise", False),
        ]:
            object.__setattr__(la, field, value)
        out[name] = la
    return out


def quax_forward(params, stack, idx, x):
    """quax's own LoraArray, one adapter for the whole batch (adapter 0)."""
    return quax.quaxify(mlp)(quax_weights(params, stack), x)


def variants(params, stack, idx, x):
    """name -> (jitted fn, args). All take the same arrays, so they are comparable."""
    served = lx.loraify(params, stack, idx)
    v = {"base": (jax.jit(mlp), (params, x))}
    r = stack.weights["w1"][0].shape[-1]
    for s in OURS:
        if s == "dense" and stack.n_adapters * r > params["w1"].shape[-1]:
            continue  # x·A for every adapter costs more than the base matmul
        v[s] = (jax.jit(lx.quaxify(mlp, strategy=s)), (served, x))
    if idx.ndim == 1:  # the alternatives serve one adapter per example
        v["merged"] = (jax.jit(merged_forward), (params, stack, idx, x))
        if stack.n_adapters <= 64:
            v["loop"] = (jax.jit(loop_forward), (params, stack, idx, x))
            v["sub-batch"] = (
                jax.jit(make_subbatch_forward(idx)),
                (params, stack, x),
            )
    if stack.n_adapters == 1:
        v["quax"] = (jax.jit(quax_forward), (params, stack, idx, x))
    return v


# Cold trace + compile measurements per variant (the median is reported); 1 in
# --quick mode, where only the script's plumbing is under test.
COLD_COMPILES = 3


def measure(v, repeats):
    compile_s, mem, programs = {k: [] for k in v}, {}, {}
    for _ in range(COLD_COMPILES):  # cold trace + compile, interleaved
        for name, (f, args) in v.items():
            jax.clear_caches()
            t = time.perf_counter()
            compiled = f.lower(*args).compile()
            compile_s[name].append(time.perf_counter() - t)
            programs[name] = compiled
            try:
                ma = compiled.memory_analysis()
                mem[name] = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20
            except Exception:  # backend without memory analysis
                mem[name] = float("nan")
    compile_s = {k: statistics.median(t) for k, t in compile_s.items()}
    # Time the programs just compiled (calling `f` again would compile once more,
    # the caches having been cleared).
    for name, (_, args) in v.items():
        jax.block_until_ready(programs[name](*args))
    times = {k: [] for k in v}
    order = np.random.default_rng(0)
    for _ in range(repeats):
        # A fresh order every round: a variant that runs right after a heavy one
        # (merged, loop) pays for the memory it freed; shuffling spreads that cost.
        for name in order.permutation(list(v)):
            _, args = v[name]
            t = time.perf_counter()
            jax.block_until_ready(programs[name](*args))
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(t) for k, t in times.items()}
    return med, compile_s, mem


def check_agree(v):
    ref = np.asarray(v["gather"][0](*v["gather"][1]))
    for name, (f, args) in v.items():
        if name in ("base", "quax"):
            continue
        err = np.max(np.abs(np.asarray(f(*args)) - ref)) / np.max(np.abs(ref))
        assert err < 1e-3, (name, err)


def run_workload(
    label, layers, batch, seq, d_model, d_ff, n, ranks, per_token, repeats, key
):
    kp, ka, kx, ki = jr.split(key, 4)
    params = mlp_params(kp, layers, d_model, d_ff)
    stack = make_adapters(params, n, ranks, ka)
    x = jr.normal(kx, (batch, seq, d_model))
    shape = (batch, seq) if per_token else (batch,)
    idx = jr.randint(ki, shape, 0, n)
    v = variants(params, stack, idx, x)
    check_agree(v)
    med, comp, mem = measure(v, repeats)
    # What `auto` picks for each adapted matmul (w1 and w2; it sees shapes only).
    choices = lx.explain_strategies(mlp, lx.loraify(params, stack, idx), x)
    picked = "+".join(sorted({c.strategy for c in choices}))
    return {
        "label": label,
        "n": n,
        "ranks": ranks,
        "med": med,
        "compile": comp,
        "mem": mem,
        "auto": picked,
    }


def fmt_row(res):
    med, base = res["med"], res["med"]["base"]
    cells = []
    for k in [*OURS, "merged", "loop", "sub-batch", "quax"]:
        cells.append(f"{med[k] / base:.2f}x" if k in med else "-")
    best = min((k for k in OURS[:3] if k in med), key=lambda k: med[k])
    comp = res["compile"]["auto"] / res["compile"]["base"]
    mem = f"{res['mem']['auto']:.0f} / {res['mem']['base']:.0f}"
    return (
        f"| {res['label']} | {base * 1e3:.1f} | "
        + " | ".join(cells)
        + f" | {res['auto']} (best {best}) | {comp:.2f}x | {mem} |"
    )


class _Rows(list):
    """Prints each row as soon as it is measured (long runs show progress)."""

    def append(self, res):
        if not self:
            print(HEADER, flush=True)
        print(fmt_row(res), flush=True)
        super().append(res)


HEADER = (
    "| workload | base ms | gather | segment | dense | auto | merged | loop | "
    "sub-batch | quax | auto picks | compile (auto/base) | MiB (auto / base) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", default="W1,W2,W3,W4")
    p.add_argument("--out", default="benchmarks/results/suite.md")
    p.add_argument("--w4-ranks", default=None, help="e.g. 16 or 8,16,64")
    args = p.parse_args()
    global COLD_COMPILES
    if args.quick:
        COLD_COMPILES = 1
        d_model, d_ff, seq, batch, layers, dec = 32, 64, 8, 4, 2, 8
        scale_ns, scale_ranks, reps = [1, 4, 16], [4, 8], 2
    else:
        d_model, d_ff, seq, batch, layers, dec = 1024, 4096, 128, 16, 2, 64
        scale_ns, scale_ranks, reps = [1, 4, 16, 64, 256], [8, 16, 64], args.repeats
    if args.w4_ranks:
        scale_ranks = [int(r) for r in args.w4_ranks.split(",")]
    key = jr.PRNGKey(0)
    only = args.only.split(",")
    rows = _Rows()
    targets = [  # (part, label, batch, tokens per row, adapters, per-token indices)
        ("W1", "W1 prefill, adapter per sequence", batch, seq, 16, False),
        ("W2", "W2 prefill, adapter per token", batch, seq, 16, True),
        ("W3", "W3 decode, 8 adapters", dec, 1, 8, False),
        ("W3", "W3 decode, 64 adapters", dec, 1, 64, False),
    ]
    for part, label, b, t, n, per_token in targets:
        if part in only:
            rows.append(
                run_workload(
                    label, layers, b, t, d_model, d_ff, n, [16], per_token, reps, key
                )
            )
    scaling = []
    if "W4" in only:
        for r in scale_ranks:
            for n in scale_ns:
                res = run_workload(
                    f"W4 n={n} r={r}",
                    1,
                    batch,
                    seq,
                    d_model,
                    d_ff,
                    n,
                    [r],
                    False,
                    reps,
                    key,
                )
                rows.append(res)
                scaling.append(res)
        n = scale_ns[-1]
        mixed = scale_ranks if args.quick else [8, 16, 64]
        rows.append(
            run_workload(
                f"W4 n={n} mixed ranks",
                1,
                batch,
                seq,
                d_model,
                d_ff,
                n,
                mixed,
                False,
                reps,
                key,
            )
        )
    dev = jax.devices()[0]
    head = (
        f"Device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}; "
        f"times are medians of interleaved runs; ratios to the base model."
    )
    table = "\n".join([head, "", HEADER, *[fmt_row(r) for r in rows]])
    print("\n" + head)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    if scaling:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in scale_ranks:
            res = [x for x in scaling if x["ranks"] == [r]]
            ns = [x["n"] for x in res]
            for k, style in [
                ("auto", "-o"),
                ("merged", "--x"),
                ("loop", ":s"),
                ("sub-batch", "-.d"),
            ]:
                ys = [
                    x["med"][k] / x["med"]["base"] if k in x["med"] else np.nan
                    for x in res
                ]
                ax.plot(ns, ys, style, label=f"{k}, rank {r}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the batch")
        ax.set_ylabel("time / base model")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
        ax.set_title("W4: overhead vs adapters (one adapter per sequence)")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
