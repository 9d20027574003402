"""Decode-shaped low-rank products: the ways of computing `s · (x · A[i]) · B[i]`
when every row is one token with its own adapter, timed against the base matmul.

The problem is `_strategies`' canonical one with `S = 1` stack group and `R = 1`
token per row: `x: (1, G, 1, d_in)`, `A: (1, n, d_in, r)`, `B: (1, n, r, d_out)`,
`ids, s: (G,)`. A decode step of a served model is this product for every adapted
projection of every layer, one token per batch row.

Forms (each computes the low-rank term; the timed program adds it to `x @ W`):

- `gather`, `dense`, `segment`: the library's strategies (`_strategies.low_rank`),
  as `auto` can pick them. On CPU, `gather` computes a decode product's `· B[i]`
  as `B[ids]` gathered once (kept out of the next fusion) and a halving sum of
  the products over the rank (`_strategies._times_rows_b`).
- `einsum`: `jnp.einsum` over `jnp.take(A, ids)` and `jnp.take(B, ids)`: what one
  writes first (bounds-checked takes, einsum's own dot).
- Two stages, `t = x · A[i]` (`(G, r)`) and `u = t · B[i]` (`(G, d_out)`), named
  `<A stage>/<B stage>`, each one of:
  - `bmm`: gather the factors into a new `(G, ...)` buffer, then a batched
    matmul (`bmm/bmm` is `gather` before the decode form);
  - `mr`: the gather fused into a multiply-reduce, `(x[:, :, None] *
    A[ids]).sum(1)`: XLA fuses the gather into the reduction, so no `(G, ...)`
    copy of the factors is written and read back;
  - `ur` (B stage; for the A stage, one row reduction per rank column): the
    multiply-reduce over the rank written out, `Σ_k t[:, k] · B[ids, k, :]`, one
    elementwise fusion with the row gathers inside;
  - `tr` (B stage): the multiply-reduce with the rank as the reduced minor axis;
  - `oh`: every adapter, selected by a one-hot (this is `dense`; its B stage
    reads non-finite entries as 0 and flags their adapter's rows NaN, to keep
    isolation).
  Timed: `bmm/bmm`, `mr/mr`, `mr/bmm`, `bmm/mr`, `bmm/ur`, `bmm/tr`, `ur/ur`,
  `oh/ur`, `oh/mr`.
- `tied`: `bmm/bmm` with each gather tied to its stage's input by an
  optimization barrier (whether XLA hoisting the gathers is what costs).
- `loop`: each distinct adapter of the batch read once: a `while_loop` over the
  batch's distinct adapters (sorted ids), each iteration one `(G, d_in) · A_j`
  and `· B_j` for every row, kept on the rows of adapter `j` by a select.

Each is jitted with the row scale applied last by `scale_rows` (exactly 0 on base
rows), as the library does.

Model of a decode step: `L` layers of the projection (separate weights and
factors per layer), each layer's input the previous one's output nudged by its
row means (so XLA runs them in sequence, as a model's), and the weights come from
memory as in a real step, not from the cache: `L` is chosen so the base weights
are at least 64 MiB (4 to 32 layers). Two layouts: `scan` (stacked layers,
`lax.scan`, as the serving model) and `unrolled` (a list of per-layer arrays in
a Python loop, as the unscanned model). The base program is the same layers
with `x @ W` alone; every ratio is (adapted product) / (base product), median of
`--repeats` interleaved rounds (`benchmarks._common.interleaved`).

Bound: the bytes a memory-bound product must read, `W` plus the batch's distinct
adapters' `A` and `B`, over `W`'s bytes: the ratio if both ran at the base's
bandwidth.

Correctness, before timing, for every form: against a float64 NumPy per-row
`x @ (W + s_g A_i B_i)` (a base row, `s = 0`, is `x @ W` exactly; a NaN scale,
as `scale_rows` writes for a stale or out-of-range index, is a NaN row), and
isolation: with one adapter's `A` and `B` made non-finite, only its rows change.
The script exits non-zero if a form fails.

Run: python benchmarks/decode_forms.py                 (full grid, scan layout)
     python benchmarks/decode_forms.py --layout unrolled
     python benchmarks/decode_forms.py --quick         (toy sizes, for the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks._common import interleaved
from lorax_arrays._core.indices import scale_rows
from lorax_arrays._core.lax import take
from lorax_arrays._rules import strategies as _strategies


@dataclasses.dataclass(frozen=True)
class Case:
    d_in: int
    d_out: int
    rank: int
    g: int  # rows (one token each)
    n: int  # adapters in the stack
    k: int  # distinct adapters among the rows


def _rows(s, u):
    return lax.reshape(s, (1, s.shape[0]) + (1,) * (u.ndim - 2))


# --- the stages (canonical shapes: x (1, G, 1, d_in), a (1, n, d_in, r), ...) ---


def _a_bmm(x, a, ids):
    return _strategies._bmm(x, take(a, ids, 1), None, None)  # (1, G, 1, r)


def _a_mr(x, a, ids):
    # (1, G, 1, d_in, 1) * (1, G, 1, d_in, r), summed over d_in
    ag = take(a, ids, 1)[:, :, None]
    return jnp.sum(x[..., None] * ag, axis=-2)


def _a_ur(x, a, ids):
    """`t[:, k] = Σ_d x · A[ids, :, k]`, one row reduction per rank column."""
    cols = []
    for k in range(a.shape[3]):
        ak = take(lax.index_in_dim(a, k, 3, keepdims=False), ids, 1)  # (1, G, d_in)
        cols.append(jnp.sum(x * ak[:, :, None], axis=-1, keepdims=True))
    return jnp.concatenate(cols, axis=-1)


def _a_oh(x, a, ids):
    n = a.shape[1]
    hit = ids[:, None] == jnp.arange(n, dtype=ids.dtype)  # (G, n)
    dn = (((3,), (2,)), ((0,), (0,)))
    t = lax.dot_general(x, a, dn)  # (1, G, 1, n, r)
    keep = lax.broadcast_in_dim(hit, t.shape, (1, 3))
    return jnp.where(keep, t, jnp.zeros((), t.dtype)), hit


def _b_bmm(t, b, ids):
    return _strategies._bmm(t, take(b, ids, 1), None, None)


def _b_mr(t, b, ids):
    bg = take(b, ids, 1)[:, :, None]  # (1, G, 1, r, d_out)
    return jnp.sum(t[..., None] * bg, axis=-2)


def _b_ur(t, b, ids):
    """The multiply-reduce over the rank written out term by term: `Σ_k t[:, k] ·
    B[ids, k, :]`, one elementwise fusion with the row gathers inside, vectorised
    over d_out (XLA CPU's reduction over a non-minor axis is not)."""
    u = None
    for k in range(b.shape[2]):
        bk = take(lax.index_in_dim(b, k, 2, keepdims=False), ids, 1)  # (1, G, d_out)
        term = t[..., k : k + 1] * bk[:, :, None]
        u = term if u is None else u + term
    return u


def _b_tr(t, b, ids):
    """The multiply-reduce with the rank as the minor (reduced) axis: a row
    reduction, reading the gathered B transposed."""
    bg = jnp.swapaxes(take(b, ids, 1), -1, -2)[:, :, None]  # (1, G, 1, d_out, r)
    return jnp.sum(t[..., None, :] * bg, axis=-1)


def _b_oh(t_all, b, ids, s):
    """`t_all` (1, G, 1, n, r), masked: `Σ_j,r t · B_j`, with `_dense`'s guard."""
    finite = jnp.isfinite(b)
    b_ok = jnp.all(finite, axis=(2, 3))
    b = jnp.where(finite, b, jnp.zeros((), b.dtype))
    dn = (((3, 4), (1, 2)), ((0,), (0,)))
    u = lax.dot_general(t_all, b, dn)
    row_ok = take(b_ok, ids, 1) | (s == 0)[None, :]
    return u, row_ok


def _two_stage(a_stage, b_stage):
    def form(x, a, b, ids, s):
        if a_stage == "oh":
            t_all, _ = _a_oh(x, a, ids)
            t = None
        else:
            t = {"bmm": _a_bmm, "mr": _a_mr, "ur": _a_ur}[a_stage](x, a, ids)
        if b_stage == "oh":
            if t is not None:  # spread t onto its adapter's slot
                hit = ids[:, None] == jnp.arange(a.shape[1], dtype=ids.dtype)
                keep = lax.broadcast_in_dim(hit, t.shape[:3] + hit.shape[1:2], (1, 3))
                t_all = jnp.where(keep[..., None], t[..., None, :], 0.0)
            u, row_ok = _b_oh(t_all, b, ids, s)
            u = scale_rows(u, _rows(s, u))
            return jnp.where(row_ok[:, :, None, None], u, jnp.nan)
        if t is None:  # oh A stage: the selected adapter is the only nonzero
            t = jnp.sum(t_all, axis=-2)
        u = {
            "bmm": _b_bmm,
            "mr": _b_mr,
            "ur": _b_ur,
            "tr": _b_tr,
        }[b_stage](t, b, ids)
        return scale_rows(u, _rows(s, u))

    return form


def _tied(x, a, b, ids, s):
    """`gather` with each gather tied to its stage's input by an optimization
    barrier (`ids` passed through it with `x`, then with `t`), so XLA cannot
    hoist the gathers of every layer ahead of the layers' products."""
    ids_a, x = lax.optimization_barrier((ids, x))
    t = _strategies._bmm(x, take(a, ids_a, 1), None, None)
    ids_b, t = lax.optimization_barrier((ids, t))
    u = _strategies._bmm(t, take(b, ids_b, 1), None, None)
    return scale_rows(u, _rows(s, u))


def _einsum(x, a, b, ids, s):
    ag = jnp.take(a, ids, axis=1)
    bg = jnp.take(b, ids, axis=1)
    t = jnp.einsum("sgtd,sgdr->sgtr", x, ag)
    u = jnp.einsum("sgtr,sgro->sgto", t, bg)
    return scale_rows(u, _rows(s, u))


def _loop(x, a, b, ids, s):
    """Each distinct adapter once: a while_loop over the sorted distinct ids."""
    g = ids.shape[0]
    srt = jnp.sort(ids)
    first = jnp.concatenate([jnp.ones((1,), bool), srt[1:] != srt[:-1]])
    count = jnp.sum(first)
    # the distinct ids first, in order (stable sort of "not first")
    uniq = srt[jnp.argsort(~first, stable=True)]
    x2 = x[0, :, 0]  # (G, d_in)
    u0 = jnp.zeros((g, b.shape[-1]), x.dtype)

    def body(carry):
        j, u = carry
        aid = uniq[j]
        aj = lax.dynamic_index_in_dim(a[0], aid, 0, keepdims=False)
        bj = lax.dynamic_index_in_dim(b[0], aid, 0, keepdims=False)
        uj = (x2 @ aj) @ bj
        return j + 1, jnp.where((ids == aid)[:, None], uj, u)

    _, u = lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), u0))
    u = u[None, :, None]
    return scale_rows(u, _rows(s, u))


def _library(name):
    def form(x, a, b, ids, s):
        return _strategies.low_rank(name, x, a, b, ids, s)

    return form


FORMS = {
    "gather": _library("gather"),
    "bmm/bmm": _two_stage("bmm", "bmm"),
    "dense": _library("dense"),
    "segment": _library("segment"),
    "tied": _tied,
    "einsum": _einsum,
    "mr/mr": _two_stage("mr", "mr"),
    "mr/bmm": _two_stage("mr", "bmm"),
    "bmm/mr": _two_stage("bmm", "mr"),
    "bmm/ur": _two_stage("bmm", "ur"),
    "bmm/tr": _two_stage("bmm", "tr"),
    "ur/ur": _two_stage("ur", "ur"),
    "oh/ur": _two_stage("oh", "ur"),
    "oh/mr": _two_stage("oh", "mr"),
    "loop": _loop,
}


# --- the data ---


def make_ids(case: Case, rng) -> np.ndarray:
    """`case.g` rows over `case.k` distinct adapters of `case.n` (each used at
    least once when k <= g), in a shuffled order."""
    chosen = rng.choice(case.n, size=case.k, replace=False)
    ids = np.concatenate([chosen, rng.choice(chosen, size=case.g - case.k)])
    return rng.permutation(ids).astype(np.int32)


def make_layer(case: Case, rng, layers: int):
    w = rng.standard_normal((layers, case.d_in, case.d_out)) / math.sqrt(case.d_in)
    a = rng.standard_normal((layers, 1, case.n, case.d_in, case.rank))
    a /= math.sqrt(case.d_in)
    b = rng.standard_normal((layers, 1, case.n, case.rank, case.d_out)) * 0.1
    return (w.astype(np.float32), a.astype(np.float32), b.astype(np.float32))


def reference(x, w, a, b, ids, s):
    """float64 NumPy, row by row: `x_g @ (W + s_g A_i B_i)`."""
    x, w, a, b = (np.asarray(v, np.float64) for v in (x, w, a, b))
    out = []
    for gi, (i, sc) in enumerate(zip(ids, s)):
        if sc == 0:
            out.append(x[gi] @ w)
        else:
            out.append(x[gi] @ (w + sc * a[0, i] @ b[0, i]))
    return np.stack(out)


def adapted(form):
    def product(x, w, a, b, ids, s):
        x4 = x[None, :, None]
        u = form(x4, a, b, ids, s)[0, :, 0]
        return x @ w + u

    return product


def check(case: Case, rng) -> None:
    """Every form against the float64 reference, base and NaN rows, isolation."""
    w, a, b = (v[0] for v in make_layer(case, rng, 1))
    x = rng.standard_normal((case.g, case.d_in)).astype(np.float32)
    ids = make_ids(case, rng)
    s = np.full((case.g,), 0.5, np.float32)
    s[0] = 0.0  # a base row (its id is clamped to 0)
    ids[0] = 0
    if case.g > 2:
        s[1] = np.nan  # a stale / out-of-range row, as scale_rows sees it
    want = reference(x, w, a, b, ids, np.nan_to_num(s))
    poisoned = int(ids[-1])
    a_bad, b_bad = a.copy(), b.copy()
    a_bad[0, poisoned, 0, 0] = np.inf
    b_bad[0, poisoned, 0, 0] = np.nan
    for name, form in FORMS.items():
        f = jax.jit(adapted(form))
        got = np.asarray(f(x, w, a, b, ids, s), np.float64)
        nan_rows = np.isnan(s)
        assert np.isnan(got[nan_rows]).all(), (name, "NaN scale must give NaN rows")
        ok = ~nan_rows
        scale = np.abs(want[ok]).max()
        err = np.abs(got[ok] - want[ok]).max() / scale
        assert err < 1e-5, (name, case, err)
        # a base row is the base product exactly (the form's term is exactly 0)
        base0 = np.asarray(jax.jit(lambda x, w: x @ w)(x, w))[0]
        assert np.array_equal(got[0], base0), (name, "base row differs")
        bad = np.asarray(f(x, w, a_bad, b_bad, ids, s), np.float64)
        mine = ids == poisoned
        others = ok & ~mine & (s != 0) | (s == 0)
        assert np.array_equal(bad[others], got[others]), (name, "isolation")
        assert not np.isfinite(bad[mine & (s != 0) & ok]).all(), (name, "poison")


# --- timing ---


def layers_for(case: Case) -> int:
    if case.d_in * case.d_out < 2**16:  # toy sizes (--quick): just the plumbing
        return 2
    w_bytes = case.d_in * case.d_out * 4
    return int(min(32, max(4, math.ceil(64 * 2**20 / w_bytes))))


def programs(case: Case, layout: str, forms):
    """name -> jitted `f(x, ws, as, bs, ids, s)`: the layers in sequence, each
    one's product (base: `x @ W`) feeding the next one's input."""

    def base_layer(x, w, a, b, ids, s):
        return x @ w

    layer = {"base": base_layer, **{n: adapted(FORMS[n]) for n in forms}}

    def chained(fn):
        """One layer, its input the previous layer's (as in a model: XLA cannot
        run the layers side by side): the next x is this x nudged by the row
        means of this layer's output."""

        def layer_step(x, w, a, b, ids, s):
            y = fn(x, w, a, b, ids, s)
            return x + 1e-3 * jnp.mean(y, axis=1, keepdims=True), y

        return layer_step

    def build(fn):
        step_fn = chained(fn)
        if layout == "scan":

            def run(x, ws, as_, bs, ids, s):
                def step(x, p):
                    return step_fn(x, *p, ids, s)[0], None

                return lax.scan(step, x, (ws, as_, bs))[0]

        else:

            def run(x, ws, as_, bs, ids, s):
                for w, a, b in zip(ws, as_, bs):
                    x = step_fn(x, w, a, b, ids, s)[0]
                return x

        return jax.jit(run)

    return {name: build(fn) for name, fn in layer.items()}


_built: dict = {}


def time_case(case: Case, layout: str, forms, repeats: int, rng):
    n_layers = layers_for(case)
    # The programs and weights depend on the shapes only: the cases that differ
    # in `k` alone (the ids) share them, and compile once.
    key = (dataclasses.replace(case, k=0), layout, tuple(forms))
    if key not in _built:
        _built.clear()
        w, a, b = make_layer(case, rng, n_layers)
        if layout == "unrolled":
            w, a, b = ([jnp.asarray(v[i]) for i in range(n_layers)] for v in (w, a, b))
        else:
            w, a, b = (jnp.asarray(v) for v in (w, a, b))
        x = jnp.asarray(rng.standard_normal((case.g, case.d_in)), jnp.float32)
        _built[key] = (programs(case, layout, forms), (x, w, a, b))
    progs, (x, w, a, b) = _built[key]
    ids = jnp.asarray(make_ids(case, rng))
    s = jnp.full((case.g,), 0.5, jnp.float32)
    args = (x, w, a, b, ids, s)
    variants = {
        name: (lambda p=p: jax.block_until_ready(p(*args))) for name, p in progs.items()
    }
    times = interleaved(variants, repeats)
    base = times["base"]
    ab = case.rank * (case.d_in + case.d_out)
    bound = 1 + case.k * ab / (case.d_in * case.d_out)
    return n_layers, base / n_layers, {n: times[n] / base for n in forms}, bound


QUICK_GRID = dict(shapes=[(16, 24)], ranks=[4], gs=[8], ns=[4])
FULL_GRID = dict(
    shapes=[(512, 1408), (1408, 512), (512, 512)],
    ranks=[16, 8],
    gs=[8, 32, 64],
    ns=[16, 64],
)


def cases(grid):
    """Per shape, rank, G and n: one adapter, a few (4), and every row its own
    adapter as far as the stack allows (min(G, n))."""
    out = []
    for (d_in, d_out), rank, g, n in itertools.product(
        grid["shapes"], grid["ranks"], grid["gs"], grid["ns"]
    ):
        for k in sorted({1, min(4, g, n), min(g, n)}):
            out.append(Case(d_in, d_out, rank, g, n, k))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes (for the tests)")
    p.add_argument("--layout", choices=["scan", "unrolled"], default="scan")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--forms", default=None, help="comma-separated; default all")
    p.add_argument("--shapes", default=None, help="e.g. 512x1408,1408x512")
    p.add_argument("--ranks", default=None)
    p.add_argument("--gs", default=None)
    p.add_argument("--ns", default=None)
    p.add_argument("--no-time", action="store_true", help="checks only")
    args = p.parse_args()
    # --quick tests the plumbing: every form checked, two timed
    forms = (args.forms or ("gather,bmm/bmm" if args.quick else ",".join(FORMS))).split(
        ","
    )
    unknown = set(forms) - set(FORMS)
    if unknown:
        p.error(f"unknown forms {sorted(unknown)}; known: {', '.join(FORMS)}")
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    checked = [Case(16, 24, 4, 8, 5, 3)]
    if not args.quick:
        checked += [Case(24, 16, 2, 6, 4, 4), Case(8, 8, 3, 5, 7, 1)]
    for case in checked:
        check(case, rng)
    print(
        f"checked {len(FORMS)} forms on {len(checked)} cases against the float64 "
        f"reference, base and NaN rows, isolation: ok "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    if args.no_time:
        return

    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    repeats = 2 if args.quick else args.repeats
    if args.shapes:
        grid["shapes"] = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    for key in ("ranks", "gs", "ns"):
        if getattr(args, key):
            grid[key] = [int(v) for v in getattr(args, key).split(",")]

    print(
        f"\nlayout {args.layout}, {repeats} interleaved rounds, median; "
        f"ratios to the base product x @ W of the same layers; jax "
        f"{jax.__version__}, {jax.default_backend()}"
    )
    head = [
        "d_in→d_out",
        "r",
        "G",
        "n",
        "k",
        "L",
        "base µs/layer",
        "bound",
        *forms,
        "best",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for case in cases(grid):
        n_layers, base, ratios, bound = time_case(
            case, args.layout, forms, repeats, rng
        )
        best = min(ratios, key=ratios.get)
        row = [
            f"{case.d_in}→{case.d_out}",
            case.rank,
            case.g,
            case.n,
            case.k,
            n_layers,
            f"{base * 1e6:.0f}",
            f"{bound:.2f}",
            *(f"{ratios[f]:.2f}" for f in forms),
            best,
        ]
        print("| " + " | ".join(map(str, row)) + " |", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
