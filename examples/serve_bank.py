"""Serve 20 adapters through 8 device slots: an `lx.AdapterBank` replays a stream.

A server keeps one compiled forward pass for hours while its adapters come and go.
Here a small transformer (two blocks of attention + MLP, plain functions of a
parameter dict, with no knowledge of LoRA) serves a stream of requests, each naming
one of 20 adapters or the base model, with a skewed popularity (a few tenants send
most requests):

1. the 20 adapters, of ranks 4, 8 and 16, some on the attention projections only,
   some on the MLP only, with their own alphas and some with rsLoRA, are written to
   a directory, one subdirectory each (`lx.save_adapter`, two of them in PEFT's
   format with `lx.save_peft_adapter`);
2. an `lx.AdapterBank` with 8 slots of capacity rank 16 is filled by listing that
   directory (`lx.load_adapter` / `lx.load_peft_adapter`, then `bank.add`);
3. the requests are served in batches of up to 10 (at most 8 distinct adapters per
   batch, padded with base-model rows to a fixed shape); for each batch we print
   which adapters `bank.indices` loaded into which slot and which it evicted;
4. halfway through, one adapter is removed (`bank.remove`), and a request for it
   is refused with a `KeyError`; so are an unknown name and a batch naming more
   adapters than the bank has slots;
5. every output is checked against the model with its adapter merged alone (by
   NumPy, in float64, from the adapter as it was before it went to disk), and the
   forward pass must have been traced once for the whole stream.

Run: python examples/serve_bank.py [--requests 200] [--batch 10] [--slots 8]
     [--workdir DIR]  (keeps the adapter directories in DIR/adapters)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

import lorax_arrays as lx

D_MODEL, HEADS, SEQ, BLOCKS = 32, 4, 6, 2
HEAD_DIM = D_MODEL // HEADS
CAPACITY = 16  # the largest rank the bank takes
ATTN = r"attn/[qkvo]_proj/kernel"
MLP = r"mlp/(up|down)_proj/kernel"
TARGETS = {"attn": [ATTN], "mlp": [MLP], "all": [ATTN, MLP]}
PEFT_ADAPTERS = {4, 13}  # these two are written in PEFT's format


def init_params(rng) -> dict:
    """Random weights, drawn on the host; kernels are `(in, out)`, as in Flax."""

    def dense(n_in, n_out):
        w = rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)
        return {"kernel": jnp.asarray(w, jnp.float32)}

    block = lambda: {  # noqa: E731
        "attn": {f"{c}_proj": dense(D_MODEL, D_MODEL) for c in "qkvo"},
        "mlp": {
            "up_proj": dense(D_MODEL, 4 * D_MODEL),
            "down_proj": dense(4 * D_MODEL, D_MODEL),
        },
    }
    return {"blocks": [block() for _ in range(BLOCKS)]}


def rms_norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def forward(params, x):
    """A small pre-norm transformer on one request, x: (seq, d_model)."""
    for p in params["blocks"]:
        h = rms_norm(x)
        q, k, v = (
            (h @ p["attn"][f"{c}_proj"]["kernel"]).reshape(SEQ, HEADS, HEAD_DIM)
            for c in "qkv"
        )
        scores = jnp.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
        att = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + att.reshape(SEQ, D_MODEL) @ p["attn"]["o_proj"]["kernel"]
        h = jax.nn.gelu(rms_norm(x) @ p["mlp"]["up_proj"]["kernel"])
        x = x + h @ p["mlp"]["down_proj"]["kernel"]
    return x


# -- the adapters ---------------------------------------------------------------------


def adapter_specs(n: int) -> list[dict]:
    """What each adapter is: its rank, the leaves it adapts, its alpha and rsLoRA."""
    specs = []
    for i in range(n):
        rank = (4, 8, 16)[i % 3]
        specs.append(
            {
                "name": f"tenant{i:02d}",
                "rank": rank,
                "targets": ("all", "attn", "mlp", "all")[i % 4],
                "alpha": rank * (1.0, 2.0, 0.5, 4.0)[i % 4],
                "use_rslora": i % 5 == 2,
                "peft": i in PEFT_ADAPTERS,
            }
        )
    return specs


def scale(spec: dict) -> float:
    """LoRA's `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA."""
    r = spec["rank"]
    return spec["alpha"] / (math.sqrt(r) if spec["use_rslora"] else r)


def make_adapter(params, spec: dict, rng) -> lx.Adapter:
    """An adapter as if trained: random A and B (`init_adapter` starts B at zero),
    B drawn so that every adapter changes its weights by about as much."""
    rules = [
        lx.LoraRule(
            pattern,
            rank=spec["rank"],
            alpha=spec["alpha"],
            use_rslora=spec["use_rslora"],
        )
        for pattern in TARGETS[spec["targets"]]
    ]
    # Only the adapter's structure (paths, layouts, ranks, alphas) is needed here.
    adapter = eqx.filter_eval_shape(lx.init_adapter, params, rules, key=jr.PRNGKey(0))
    weights = {}
    for path, (a, b) in adapter.weights.items():
        fan_in = a.shape[0]
        a = rng.standard_normal(a.shape) / math.sqrt(fan_in)
        b = rng.standard_normal(b.shape) * 0.3 / math.sqrt(spec["rank"])
        b = b / scale(spec)
        weights[path] = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return eqx.tree_at(lambda ad: ad.weights, adapter, weights)


def path_of(key_path) -> str:
    """A '/'-joined path from a `jax.tree_util` key path (as the rules see it)."""
    parts = []
    for k in key_path:
        if isinstance(k, jtu.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jtu.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jtu.DictKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def numpy_merged(params, spec: dict, adapter: lx.Adapter):
    """The parameters with `adapter` merged by NumPy in float64, from the spec's
    rank, alpha and rsLoRA: `W += s · A B` at each adapted `(in, out)` kernel;
    independent of `lx.merge`."""
    s = scale(spec)
    factors = {
        p: (np.asarray(a, np.float64), np.asarray(b, np.float64))
        for p, (a, b) in adapter.weights.items()
    }
    leaves, treedef = jtu.tree_flatten_with_path(params)
    merged, done = [], set()
    for key_path, leaf in leaves:
        path = path_of(key_path)
        if path in factors:
            a, b = factors[path]
            leaf = jnp.asarray(np.asarray(leaf, np.float64) + s * (a @ b), leaf.dtype)
            done.add(path)
        merged.append(leaf)
    assert done == set(factors), sorted(set(factors) - done)
    return jtu.tree_unflatten(treedef, merged)


def write_adapters(directory: Path, adapters: dict, specs: dict) -> None:
    """One subdirectory per adapter: lorax_arrays checkpoints, and two PEFT ones."""
    for name, adapter in adapters.items():
        if specs[name]["peft"]:
            lx.save_peft_adapter(directory / name, adapter)
        else:
            lx.save_adapter(directory / name, adapter)


def fill_bank(bank: lx.AdapterBank, directory: Path, params) -> tuple[int, int]:
    """Adds every adapter found in `directory` to the bank, named after its folder."""
    n_lorax = n_peft = 0
    for path in sorted(directory.iterdir()):
        if (path / "adapter_config.json").exists():  # a PEFT directory
            adapter = lx.load_peft_adapter(path, params, orientation="in_out")
            n_peft += 1
        else:
            adapter = lx.load_adapter(path, params)
            n_lorax += 1
        bank.add(path.name, adapter)
    return n_lorax, n_peft


# -- the request stream -------------------------------------------------------------


def request_stream(popularity: dict[str, float], n: int, rng) -> list[str | None]:
    """`n` requests, each naming an adapter with probability proportional to its
    popularity, or the base model (None) about one time in eight."""
    names = list(popularity)
    w = np.array([popularity[nm] for nm in names])
    p = np.append(0.88 * w / w.sum(), 0.12)
    draws = rng.choice(len(names) + 1, size=n, p=p)
    return [None if d == len(names) else names[d] for d in draws]


def schedule(stream: list, start: int, stop: int, batch: int, slots: int):
    """Consecutive requests of `stream[start:stop]`, up to `batch` of them and at
    most `slots` distinct adapters, as a server's batcher would form them (yields
    lists of request numbers)."""
    while start < stop:
        distinct, end = set(), start
        while end < stop and end - start < batch:
            name = stream[end]
            if name is not None and name not in distinct:
                if len(distinct) == slots:
                    break
                distinct.add(name)
            end += 1
        yield list(range(start, end))
        start = end


def describe(events) -> str:
    parts = []
    for e in events:
        if e.kind == "load":
            parts.append(f"load {e.name}→{e.slot}")
        else:
            parts.append(f"{e.kind} {e.name}@{e.slot}")
    return ", ".join(parts) if parts else "(all adapters already loaded)"


# -- serving ------------------------------------------------------------------------


def main(
    n_requests: int = 200,
    batch: int = 10,
    slots: int = 8,
    n_adapters: int = 20,
    seed: int = 0,
    workdir: str | None = None,
) -> dict:
    rng = np.random.default_rng(seed)
    params = init_params(rng)
    specs = {s["name"]: s for s in adapter_specs(n_adapters)}
    names = list(specs)
    adapters = {name: make_adapter(params, spec, rng) for name, spec in specs.items()}

    # 1-2. To disk, and back into a bank, as a server would find them.
    bank_rules = [lx.LoraRule(ATTN, rank=CAPACITY), lx.LoraRule(MLP, rank=CAPACITY)]
    bank = lx.AdapterBank(params, bank_rules, slots=slots)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(workdir or tmp) / "adapters"
        write_adapters(directory, adapters, specs)
        n_lorax, n_peft = fill_bank(bank, directory, params)
    print(
        f"Filled the bank from {n_lorax + n_peft} adapter directories ({n_lorax} "
        f"lorax_arrays checkpoints, {n_peft} PEFT): {len(bank)} adapters, "
        f"{bank.host_nbytes / 1024:.0f} KiB in host memory."
    )
    print(
        f"Device: {bank.slots} slots of rank {CAPACITY} on {len(bank.paths)} leaves, "
        f"{bank.nbytes / 1024:.0f} KiB."
    )
    for name in names[:5]:
        s = specs[name]
        print(
            f"  {name}: rank {s['rank']:>2} on {s['targets']:<4} alpha {s['alpha']:g}"
            f"{' rsLoRA' if s['use_rslora'] else ''}{' (PEFT)' if s['peft'] else ''}"
        )
    print(f"  … and {len(names) - 5} more")

    popularity = {name: 1.0 / (1 + i) ** 1.1 for i, name in enumerate(names)}
    half = n_requests // 2
    stream = request_stream(popularity, half, rng)
    xs = rng.standard_normal((n_requests, SEQ, D_MODEL)).astype(np.float32)
    outputs = np.zeros_like(xs)

    traces = 0

    @jax.jit
    def serve(params, served, x):
        nonlocal traces
        traces += 1  # runs once per trace, never when the compiled code runs
        # The adapters go into the tree inside the trace: no Python per leaf
        # per batch, one dispatch of the plain parameters and the bank's arrays.
        model = lx.loraify(params, served)
        return lx.quaxify(jax.vmap(forward, in_axes=(None, 0)))(model, x)

    n_batches = 0

    def serve_requests(start: int, stop: int) -> None:
        nonlocal n_batches
        for ids in schedule(stream, start, stop, batch, slots):
            # Pad to a fixed batch with base-model rows: one shape, one program.
            names_b = [stream[i] for i in ids] + [None] * (batch - len(ids))
            x = np.zeros((batch, SEQ, D_MODEL), np.float32)
            x[: len(ids)] = xs[ids]
            idx = bank.indices(names_b)  # loads what this batch needs
            out = serve(params, bank.served(idx), x)
            outputs[ids] = np.asarray(out[: len(ids)])
            n_distinct = len({n for n in names_b if n is not None})
            print(
                f"  batch {n_batches:>2}  requests {ids[0]:>3}-{ids[-1]:<3} "
                f"{n_distinct} adapter{'s' * (n_distinct != 1)}  "
                f"{describe(bank.last_events)}"
            )
            n_batches += 1

    # 3-4. The stream, batch by batch; halfway through, an adapter is removed.
    print(
        f"\nServing {n_requests} requests over {n_adapters} adapters in batches of up "
        f"to {batch} (at most {slots} adapters each)."
    )
    print("Compiling the batched forward pass…", flush=True)
    t0 = time.perf_counter()
    serve_requests(0, half)
    # The most requested adapter so far that is on the device: it has a slot to lose.
    retired = max(bank.loaded, key=stream.count)
    bank.remove(retired)
    print(f"  -- bank.remove({retired!r}): {describe(bank.last_events)}")
    try:
        bank.indices([retired, None])
    except KeyError as e:
        print(f"  -- a request for {retired} now: KeyError: {e}")
    del popularity[retired]
    stream += request_stream(popularity, n_requests - half, rng)
    serve_requests(half, n_requests)
    seconds = time.perf_counter() - t0
    kinds = [e.kind for e in bank.events]

    print("\nBad requests are refused before anything changes on the device:")
    before = (bank.loaded, len(bank.events))
    try:
        bank.indices(["tenant1", None])
    except KeyError as e:
        print(f"  unknown name: KeyError: {e}")
    if len(bank) > slots:
        try:
            bank.indices(list(bank.names[: slots + 1]))
        except ValueError as e:
            print(f"  {slots + 1} adapters in one batch: ValueError: {e}")
    unchanged = (bank.loaded, len(bank.events)) == before
    print(f"  slots and events unchanged: {unchanged}")

    # 5. Every output against its adapter merged alone, by NumPy.
    alone = jax.jit(forward)
    merged = {None: params}
    merged.update({n: numpy_merged(params, specs[n], ad) for n, ad in adapters.items()})
    worst, smallest_effect, nearest_other = 0.0, np.inf, np.inf
    for i, name in enumerate(stream):
        ref = np.asarray(alone(merged[name], xs[i]))
        worst = max(worst, float(np.max(np.abs(outputs[i] - ref))))
        if name is not None:
            # How far the output is from what a missing (base) or wrong adapter
            # would give: the check above means something only if these are large.
            base = np.asarray(alone(params, xs[i]))
            smallest_effect = min(smallest_effect, float(np.max(np.abs(ref - base))))
            other = names[(names.index(name) + 1) % len(names)]
            wrong = np.asarray(alone(merged[other], xs[i]))
            nearest_other = min(nearest_other, float(np.max(np.abs(ref - wrong))))
    ok = worst < 1e-4

    print(
        f"\nServed {n_requests} requests in {n_batches} batches in {seconds:.1f} s "
        f"(compilation included): {kinds.count('load')} loads, "
        f"{kinds.count('evict')} evictions, {kinds.count('remove')} removal."
    )
    print(f"Compiled once: {traces == 1} ({traces} trace{'s' * (traces != 1)})")
    print(
        f"All {n_requests} outputs equal their adapter merged alone: {ok} "
        f"(largest deviation {worst:.2e})"
    )
    print(
        f"For scale: an adapter moves its request's output by at least "
        f"{smallest_effect:.2e}; the next adapter's output is at least "
        f"{nearest_other:.2e} away."
    )
    return {
        "ok": ok and unchanged,
        "traces": traces,
        "worst": worst,
        "evictions": kinds.count("evict"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", default=None, help="keep the adapter directories here"
    )
    args = parser.parse_args()
    result = main(
        args.requests, args.batch, args.slots, args.adapters, args.seed, args.workdir
    )
    if not result["ok"] or result["traces"] != 1:
        raise SystemExit(f"serving through the bank went wrong: {result}")
