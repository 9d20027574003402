"""A grouped-matmul MoE layer (Qwen3-MoE-shaped) served with LoRA adapters on its
expert weights: the base layer, one adapter for the whole batch, and an adapter per
token (issue #22).

Layer: EasyDeL's `standard_moe` path (as `tests/moe_models.py`'s `easydel_moe`,
on flattened tokens `x: (N, D)`): router, softmax, top-k, renormalised, tokens
repeated k times and sorted by expert (`argsort`, `inputs[order]`), `bincount`
group sizes, SwiGLU experts `down(silu(gate(x)) * up(x))` as three
`lax.ragged_dot`s, unsorted, weighted sum. Qwen3-MoE shapes: d_model 2048, expert
intermediate 768, top-k 8, E in {8, 16, 64} (`--quick`: toy sizes); float32.
Adapters: rank 16 on `gate`, `up`, `down` (`(E, d, f)`, stacked over the experts).

Variants, each jitted (`lx.quaxify` for the adapted ones), timed interleaved
(`benchmarks._common.interleaved`: every round runs each once, in a fresh random
order; medians of `--repeats` rounds):

- `base`: the layer on the plain weights;
- `scalar`: one adapter for the whole batch (`lx.with_indices(tree, i)`, `i` a
  traced scalar, as a server passes it): the grouped low-rank product;
- `per-token`: 8 adapters, a random one per token (`(N,)` indices, traced): the
  rows carry their positions through the sort (`RowIds`); the low-rank term in
  the form `auto` picks;
- `sorted` and `expert-grouped`: the same with each form of the per-row term
  forced (`strategy="segment"`: rows sorted by (expert, adapter), `E·n` groups;
  `strategy="gather"`: the model's `E` groups, every adapter's columns).

Per variant: `host` is the time until the jitted call returns (tracing-cache
lookup, argument flattening, dispatch), `total` the time until its result is
ready; the ratio is total over the base's. Bound: what the adapters add if the
layer ran at the base's rate, in flops (`x·A·B` per token and expert slot over the
base's matmuls) and in weight bytes (the adapters' factors the batch reads, one
adapter for `scalar`, the distinct ones of the batch for `per-token`, over the
experts' and router's weights).

A second table: the time to trace and lower each variant (`jax.jit(f).lower`)
and to compile it, on the first case of the grid (median of 3 fresh jits): what
the row positions cost before the first call.

Correctness first, on a small case: `scalar` equals the base layer on the weights
with its adapter merged (in NumPy), and `per-token` equals, row by row, the base
layer on the weights of that row's adapter (the layer is row-independent: each
token's output depends on its own input and weights only). The script exits
non-zero if a variant disagrees.

Run: python -m benchmarks.moe                     (full grid, all variants)
     python -m benchmarks.moe --variants base,scalar
     python -m benchmarks.moe --quick             (toy sizes, for the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import lorax_arrays as lx
from benchmarks._common import interleaved

VARIANTS = ("base", "scalar", "per-token", "sorted", "expert-grouped")


@dataclasses.dataclass(frozen=True)
class Case:
    d: int  # d_model
    f: int  # expert intermediate
    e: int  # experts
    k: int  # experts per token
    tokens: int
    rank: int
    adapters: int


def moe(p, x, k):
    """EasyDeL `standard_moe` on flattened tokens `x: (N, D)`."""
    e = p["router"].shape[1]
    probs = jax.nn.softmax(x @ p["router"], axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    weights = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-8)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat)
    sorted_x = jnp.repeat(x, k, axis=0)[order, ...]
    sizes = jnp.bincount(flat, length=e)
    h0 = jax.lax.ragged_dot(sorted_x, p["gate"], sizes)
    h1 = jax.lax.ragged_dot(sorted_x, p["up"], sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(h0) * h1, p["down"], sizes)
    out = out[jnp.argsort(order), ...].reshape(x.shape[0], k, x.shape[1])
    return jnp.sum(out * weights[..., None], axis=1)


def rules(rank):
    return [
        lx.LoraRule(
            "^(gate|up|down)$",
            rank=rank,
            alpha=2.0 * rank,
            stack_axes=0,
            in_axes=1,
            out_axes=2,
        )
    ]


def make_params(case: Case, rng):
    def normal(*shape):
        w = rng.standard_normal(shape, dtype=np.float32)
        return w / np.float32(np.sqrt(shape[-2]))

    return {
        "router": normal(case.d, case.e),
        "gate": normal(case.e, case.d, case.f),
        "up": normal(case.e, case.d, case.f),
        "down": normal(case.e, case.f, case.d),
    }


def make_stack(params, case: Case, rng):
    """`case.adapters` adapters with random non-zero factors, stacked."""
    out = []
    for i in range(case.adapters):
        fresh = lx.init_adapter(params, rules(case.rank), key=jax.random.key(i))
        weights = {}
        for path, (a, b) in fresh.weights.items():
            a_new = rng.standard_normal(np.shape(a), dtype=np.float32)
            b_new = rng.standard_normal(np.shape(b), dtype=np.float32)
            a_new /= np.float32(np.sqrt(np.shape(a)[-2]))
            weights[path] = (a_new, b_new * np.float32(0.05))
        out.append(eqx.tree_at(lambda ad: ad.weights, fresh, weights))
    return out, lx.stack_adapters(out)


def merged(params, adapter):
    """The weights with `adapter` merged, in NumPy (float64, then float32)."""
    out = dict(params)
    for path, (a, b) in adapter.weights.items():
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        delta = np.einsum("edr,erf->edf", a, b) * float(adapter.scale(path))
        out[path] = (np.asarray(params[path], np.float64) + delta).astype(np.float32)
    return out


# --- the variants: each `(params, tree, x, rng) -> jitted call's arguments` ---


def base_variant(case: Case, params, tree, x, rng):
    f = jax.jit(lambda p, x: moe(p, x, case.k))
    return f, (params, x)


def scalar_variant(case: Case, params, tree, x, rng):
    """One adapter for the batch, its index traced."""

    @jax.jit
    def f(tree, x, i):
        return lx.quaxify(lambda p, x: moe(p, x, case.k))(lx.with_indices(tree, i), x)

    return f, (tree, x, jnp.int32(rng.integers(case.adapters)))


def per_token_variant(case: Case, params, tree, x, rng, strategy=None):
    """A random adapter per token (`(N,)` indices, traced); the per-row term in
    the form `auto` picks, or forced (`segment`: sorted, `gather`: grouped by
    expert)."""

    @jax.jit
    def f(tree, x, idx):
        layer = lx.quaxify(lambda p, x: moe(p, x, case.k), strategy=strategy)
        return layer(lx.with_indices(tree, idx), x)

    idx = rng.integers(case.adapters, size=case.tokens).astype(np.int32)
    return f, (tree, x, jnp.asarray(idx))


BUILD = {
    "base": base_variant,
    "scalar": scalar_variant,
    "per-token": per_token_variant,
    "sorted": lambda *a: per_token_variant(*a, strategy="segment"),
    "expert-grouped": lambda *a: per_token_variant(*a, strategy="gather"),
}
PER_ROW = ("per-token", "sorted", "expert-grouped")


def check(case: Case, variants, rng) -> None:
    """Each variant against the base layer on NumPy-merged weights."""
    params = make_params(case, rng)
    adapters, stack = make_stack(params, case, rng)
    tree = lx.loraify(params, stack)
    x = jnp.asarray(rng.standard_normal((case.tokens, case.d), dtype=np.float32))
    layer = jax.jit(lambda p, x: moe(p, x, case.k))
    per_adapter = [np.asarray(layer(merged(params, ad), x)) for ad in adapters]
    for name in variants:
        f, args = BUILD[name](case, params, tree, x, rng)
        got = np.asarray(f(*args))
        if name == "base":
            want = np.asarray(layer(params, x))
        elif name == "scalar":
            want = per_adapter[int(args[-1])]
        elif name not in PER_ROW:
            raise ValueError(name)
        else:
            idx = np.asarray(args[-1])
            want = np.stack([per_adapter[i][n] for n, i in enumerate(idx)])
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, (name, case, err)


def bounds(case: Case, distinct: int):
    """(flops ratio, bytes ratio): base + low-rank term over base."""
    base_flops = 2 * case.tokens * (case.k * 3 * case.d * case.f + case.d * case.e)
    lora_flops = 2 * case.tokens * case.k * 3 * case.rank * (case.d + case.f)
    base_bytes = 4 * (3 * case.e * case.d * case.f + case.d * case.e)
    lora_bytes = 4 * distinct * 3 * case.e * case.rank * (case.d + case.f)
    return 1 + lora_flops / base_flops, 1 + lora_bytes / base_bytes


def time_case(case: Case, variants, repeats: int, rng):
    params = {k: jnp.asarray(v) for k, v in make_params(case, rng).items()}
    _, stack = make_stack(params, case, rng)
    tree = lx.loraify(params, stack)
    x = jnp.asarray(rng.standard_normal((case.tokens, case.d), dtype=np.float32))
    host: dict[str, list[float]] = {n: [] for n in variants}
    thunks = {}
    distinct = {}
    for name in variants:
        f, args = BUILD[name](case, params, tree, x, rng)
        if name in PER_ROW:
            distinct[name] = len(np.unique(np.asarray(args[-1])))

        def run(f=f, args=args, name=name):
            t = time.perf_counter()
            out = f(*args)
            host[name].append(time.perf_counter() - t)
            jax.block_until_ready(out)

        thunks[name] = (run, lambda f=f, args=args: jax.block_until_ready(f(*args)))
    total = interleaved(thunks, repeats)
    host_med = {n: float(np.median(v)) for n, v in host.items()}
    return total, host_med, distinct


QUICK = dict(d=64, f=32, k=2, es=[4, 8], tokens=[16], rank=4, adapters=4)
FULL = dict(d=2048, f=768, k=8, es=[8, 16, 64], tokens=[64, 2048], rank=16, adapters=8)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (for the tests)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, of " + ", ".join(VARIANTS),
    )
    p.add_argument("--es", default=None, help="experts, e.g. 8,16,64")
    p.add_argument("--tokens", default=None, help="tokens per call, e.g. 64,2048")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown or "base" not in variants:
        p.error(f"variants: 'base' and any of {', '.join(VARIANTS)}; got {variants}")
    grid = dict(QUICK if args.quick else FULL)
    for key in ("es", "tokens"):
        if getattr(args, key):
            grid[key] = [int(v) for v in getattr(args, key).split(",")]
    repeats = 3 if args.quick else args.repeats
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    small = Case(d=16, f=12, e=4, k=2, tokens=24, rank=3, adapters=3)
    check(small, variants, rng)
    print(
        f"checked {len(variants)} variants ({', '.join(variants)}) against the "
        f"base layer on NumPy-merged weights: ok ({time.perf_counter() - t0:.1f} s)"
    )

    print(
        f"\nd_model {grid['d']}, expert intermediate {grid['f']}, top-k "
        f"{grid['k']}, rank {grid['rank']}, {grid['adapters']} adapters (per-token); "
        f"{repeats} interleaved rounds, median; host = until the call returns, "
        f"total = until the result is ready, ratio = total / base total; jax "
        f"{jax.__version__}, {jax.default_backend()}"
    )
    head = ["E", "tokens", "base ms"]
    for name in variants:
        if name != "base":
            head += [f"{name} ms", f"{name} host ms", f"{name} ratio"]
    head += ["base host ms", "bound flops", "bound bytes (1 adapter)"]
    per_row = [n for n in variants if n in PER_ROW]
    if per_row:
        head.append("bound bytes (per-token)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for e in grid["es"]:
        for n_tok in grid["tokens"]:
            case = Case(
                grid["d"],
                grid["f"],
                e,
                grid["k"],
                n_tok,
                grid["rank"],
                grid["adapters"],
            )
            total, host, distinct = time_case(case, variants, repeats, rng)
            flops, bytes_one = bounds(case, 1)
            row = [e, n_tok, f"{total['base'] * 1e3:.3f}"]
            for name in variants:
                if name != "base":
                    row += [
                        f"{total[name] * 1e3:.3f}",
                        f"{host[name] * 1e3:.3f}",
                        f"{total[name] / total['base']:.2f}",
                    ]
            row += [f"{host['base'] * 1e3:.3f}", f"{flops:.3f}", f"{bytes_one:.3f}"]
            if per_row:
                row.append(f"{bounds(case, distinct[per_row[0]])[1]:.3f}")
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
    first = Case(grid["d"], grid["f"], grid["es"][0], grid["k"], grid["tokens"][0],
                 grid["rank"], grid["adapters"])  # fmt: skip
    if args.quick:  # the base and the form `auto` picks (for the tests)
        timed = [n for n in variants if n in ("base", "per-token")]
        compile_table(first, timed, rng, rounds=1)
    else:
        compile_table(first, variants, rng, rounds=3)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def compile_table(case: Case, variants, rng, rounds: int = 3) -> None:
    """Trace-and-lower and compile times per variant (fresh jits, median)."""
    params = {k: jnp.asarray(v) for k, v in make_params(case, rng).items()}
    _, stack = make_stack(params, case, rng)
    tree = lx.loraify(params, stack)
    x = jnp.asarray(rng.standard_normal((case.tokens, case.d), dtype=np.float32))
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in variants}
    for _ in range(rounds):
        for name in variants:
            f, args = BUILD[name](case, params, tree, x, rng)
            t = time.perf_counter()
            lowered = f.lower(*args)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            times[name][0].append(t1 - t)
            times[name][1].append(t2 - t1)
    print(
        f"\nTrace and compile, E {case.e}, {case.tokens} tokens ({rounds} fresh "
        "jit(s), median; ratio = over base)"
    )
    print("| variant | trace+lower ms | ratio | compile ms | ratio |")
    print("|---|---|---|---|---|")
    lo_base = float(np.median(times["base"][0]))
    co_base = float(np.median(times["base"][1]))
    for name in variants:
        lo, co = (float(np.median(v)) for v in times[name])
        print(
            f"| {name} | {lo * 1e3:.1f} | {lo / lo_base:.2f} | {co * 1e3:.1f} | "
            f"{co / co_base:.2f} |"
        )


if __name__ == "__main__":
    main()
