"""End-to-end serving: greedy generation for a batch of requests, each with its own
adapter from an `AdapterBank`, against the base model and the alternatives.

Model: a Llama-style decoder written as plain JAX functions of a parameter dict
(RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU MLP,
untied lm_head; stacked layer weights scanned with `lax.scan`), 30.9M parameters,
float32: d_model 512, 8 layers, 8 query / 2 KV heads, d_ff 1408, vocab 8192. (With
a 32000-token vocabulary the unadapted head would be ~40% of the weights a decode
step reads and would hide the adapters' cost; in a 7B Llama it is ~2%.) LoRA adapts
q, k, v, o, gate, up and down in every layer from a bank of 64 slots at rank 16;
one adapter in four has rank 8 (zero-padded to 16 in the bank). A generation is a
64-token prompt, prefill, then 32 greedy decode steps with a KV cache (33 new
tokens per request), in one jitted call that also returns the logits (for the
check below; both the base model and the variants write them).

Workloads: 16 requests over 1, 8 and 16 distinct adapters, and 64 requests over 1,
8 and 64 (rows spread evenly over the adapters, in a shuffled order).

1. Whole generation, generated tokens/s as a ratio to `base` (the same generate
   function on the plain parameters), against the targets (`auto` at least 0.95x
   with 1-8 adapters, 0.85x when every row has its own adapter):
   - `auto`: `bank.indices(names)`, `lx.loraify(params, bank, idx)` and the whole
     batch in one call (the library's default strategy choice; one program for
     every batch);
   - `compact`: the same with `lx.loraify(params, bank, idx, compact=True)`: only
     the batch's adapters, copied out of the bank into a stack of the next power
     of two (one program per size; one adapter is the plain LoRA product);
   - `merged`: for each distinct adapter, its weights merged (a jitted `lx.merge`,
     timed) and its rows generated with the plain model;
   - `per-adapter`: for each distinct adapter, its rows generated with only that
     adapter (single-adapter LoRA, `lx.loraify(params, adapter)`): PEFT-style
     sub-batching.
   The rows are spread evenly, so all sub-batches of a workload have one size:
   `merged` and `per-adapter` compile one program per size and rank before
   timing, and need no padding (which favours them: a real mix of sizes pads or
   recompiles).
2. By phase: the prefill and one decode step, with `auto`, each strategy
   forced (`lx.quaxify(f, strategy=...)`: gather, segment, dense) and `compact`
   (auto on the compacted stack), as a ratio to the base model's, for the fewest
   and the most adapters of each batch size; and what `auto` picks
   (`lx.explain_strategies`).
3. The bank's own costs: `bank.add` + first use of a new adapter (`indices`
   loading it into a slot, `loraify`, one decode step) against one decode step,
   and whether it recompiled; one slot write against the same write without
   donation (which copies the bank), and whether it was in place (buffer
   addresses unchanged, the old arrays deleted); the bank's device bytes against
   the base model's.

Every variant is compiled and warmed before timing; then each round runs every
variant once, in a fresh random order, and the median of `--repeats` rounds is
reported. Once, untimed, the timed batched program is checked: for a few rows (a
rank-16 adapter, a rank-8 adapter, the base model) its logits at every generated
position must match the row alone with its adapter merged (`lx.merge`) fed the
same tokens (teacher-forced, so a near-tie cannot flip a token and hide or fake a
difference), and its greedy tokens are compared with the merged model's own.

A Markdown table is printed and written to `--out`; a plot to `--plot`.

Run: python -m benchmarks.serving            (full; ~11 minutes on 2 CPU cores)
     python -m benchmarks.serving --quick    (toy sizes, ~20 s; used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax

import lorax_arrays as lx
from benchmarks._common import interleaved as measure

FORCED = ["gather", "segment", "dense"]
STRATEGIES = ["auto", *FORCED]
PROJECTIONS = r"layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    d_ff: int
    prompt: int  # prompt tokens per request
    steps: int  # decode steps (steps + 1 tokens generated per request)
    slots: int  # the bank's slots; as many adapters are registered
    batches: tuple[tuple[int, tuple[int, ...]], ...]  # (batch, distinct adapters)
    rank: int = 16
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


FULL = Config(
    vocab=8192,
    d_model=512,
    layers=8,
    heads=8,
    kv_heads=2,
    d_ff=1408,
    prompt=64,
    steps=32,
    slots=64,
    batches=((16, (1, 8, 16)), (64, (1, 8, 64))),
)
QUICK = Config(
    vocab=256,
    d_model=64,
    layers=2,
    heads=4,
    kv_heads=2,
    d_ff=128,
    prompt=8,
    steps=4,
    slots=8,
    batches=((4, (1, 4)),),
    rank=8,
)


# -- the model ---------------------------------------------------------------------


def init_params(cfg: Config, seed: int = 0) -> dict:
    """Random weights, drawn on the host (eager `jr.normal` would compile a kernel
    per shape)."""
    rng = np.random.default_rng(seed)
    L, d, f, hd = cfg.layers, cfg.d_model, cfg.d_ff, cfg.head_dim

    def w(*shape, fan_in, gain=1.0):
        x = rng.standard_normal(shape, dtype=np.float32)
        return jnp.asarray(x * np.float32(gain / fan_in**0.5))

    def norm(*shape):
        return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32))

    return {
        "embed": w(cfg.vocab, d, fan_in=1),
        "layers": {
            "attn_norm": norm(L, d),
            "wq": w(L, d, cfg.heads * hd, fan_in=d),
            "wk": w(L, d, cfg.kv_heads * hd, fan_in=d),
            "wv": w(L, d, cfg.kv_heads * hd, fan_in=d),
            "wo": w(L, cfg.heads * hd, d, fan_in=d, gain=2.0),
            "mlp_norm": norm(L, d),
            "w_gate": w(L, d, f, fan_in=d),
            "w_up": w(L, d, f, fan_in=d),
            "w_down": w(L, f, d, fan_in=f, gain=2.0),
        },
        "final_norm": norm(d),
        "lm_head": w(d, cfg.vocab, fan_in=d),
    }


def rms_norm(x, weight):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weight


def rope(x, pos, base):
    """Rotary embeddings on `x: (batch, t, heads, head_dim)` at positions `pos`."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = pos[:, None].astype(jnp.float32) * freq[None]  # (t, half)
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def forward(params, tokens, cache, start, cfg: Config):
    """Runs `tokens: (batch, t)` at positions `start ..`, updating the KV cache
    `(layers, 2, batch, max_len, kv_heads, head_dim)`. Returns the final-normed
    hidden states `(batch, t, d_model)` and the new cache."""
    b, t = tokens.shape
    hd, kvh = cfg.head_dim, cfg.kv_heads
    group = cfg.heads // kvh
    max_len = cache.shape[3]
    pos = start + jnp.arange(t)
    visible = jnp.arange(max_len)[None, :] <= pos[:, None]  # (t, max_len)
    h = params["embed"][tokens]

    def layer(h, xs):
        p, kv = xs
        x = rms_norm(h, p["attn_norm"])
        q = rope((x @ p["wq"]).reshape(b, t, cfg.heads, hd), pos, cfg.rope_base)
        k = rope((x @ p["wk"]).reshape(b, t, kvh, hd), pos, cfg.rope_base)
        v = (x @ p["wv"]).reshape(b, t, kvh, hd)
        kv = lax.dynamic_update_slice_in_dim(kv, jnp.stack([k, v]), start, axis=2)
        q = q.reshape(b, t, kvh, group, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, kv[0]) / hd**0.5
        scores = jnp.where(visible, scores, -1e30)
        att = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, axis=-1), kv[1])
        h = h + att.reshape(b, t, cfg.heads * hd) @ p["wo"]
        x = rms_norm(h, p["mlp_norm"])
        h = h + (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]
        return h, kv

    h, cache = lax.scan(layer, h, (params["layers"], cache))
    return rms_norm(h, params["final_norm"]), cache


def empty_cache(cfg: Config, batch: int, dtype=jnp.float32):
    shape = (cfg.layers, 2, batch, cfg.prompt + cfg.steps, cfg.kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype)


def prefill(params, prompts, cfg: Config):
    """The prompts `(batch, prompt)` through the model: the last position's logits
    and a KV cache with room for the decode steps."""
    cache = empty_cache(cfg, prompts.shape[0], params["embed"].dtype)
    h, cache = forward(params, prompts, cache, 0, cfg)
    return h[:, -1] @ params["lm_head"], cache


def decode_step(params, token, cache, pos, cfg: Config):
    """One decode step for a batch: `token: (batch,)` at position `pos`."""
    h, cache = forward(params, token[:, None], cache, pos, cfg)
    return h[:, 0] @ params["lm_head"], cache


def generate(params, prompts, cfg: Config):
    """Greedy decoding: prefill, then `cfg.steps` single-token steps. Returns the
    `steps + 1` new tokens `(batch, steps + 1)` and the logits each was picked
    from `(batch, steps + 1, vocab)` (for the correctness check, which thus checks
    the very program that is timed; writing them costs well under 1%)."""
    logits, cache = prefill(params, prompts, cfg)

    def step(carry, i):
        logits, cache = carry
        token = jnp.argmax(logits, axis=-1)
        new, cache = decode_step(params, token, cache, cfg.prompt + i, cfg)
        return (new, cache), (token, logits)

    (last, _), (tokens, seen) = lax.scan(step, (logits, cache), jnp.arange(cfg.steps))
    tokens = jnp.concatenate([tokens.T, jnp.argmax(last, axis=-1)[:, None]], axis=1)
    return tokens, jnp.concatenate([seen.transpose(1, 0, 2), last[:, None]], axis=1)


def score(params, sequence, cfg: Config):
    """The logits at every position of `sequence: (batch, t)`, in one pass."""
    b, t = sequence.shape
    cache = jnp.zeros((cfg.layers, 2, b, t, cfg.kv_heads, cfg.head_dim))
    h, _ = forward(params, sequence, cache, 0, cfg)
    return h @ params["lm_head"]


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


# -- adapters ----------------------------------------------------------------------


def make_adapter(params, rank, seed):
    """An adapter of `rank` on every projection, with a random (non-zero) B drawn on
    the host, as if it had been trained."""
    rules = lx.LoraRule(PROJECTIONS, rank=rank, alpha=2 * rank, stack_axes=0)
    ad = lx.init_adapter(params, rules, key=jr.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    std = np.float32(0.25 / rank**0.5)  # the update is ~1/4 of the weight's output
    weights = {
        path: (a, jnp.asarray(std * rng.standard_normal(b.shape, dtype=np.float32)))
        for path, (a, b) in ad.weights.items()
    }
    return eqx.tree_at(lambda x: x.weights, ad, weights)


def adapter_rank(i: int, cfg: Config) -> int:
    """One adapter in four has half the bank's rank."""
    return cfg.rank // 2 if i % 4 == 3 else cfg.rank


# -- timing ------------------------------------------------------------------------


def timed(fn, repeats):
    """Median seconds of `fn()` (already warm)."""
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def lora_jit(fn, cfg, strategy="auto"):
    fn = functools.partial(fn, cfg=cfg)
    if strategy == "base":
        return jax.jit(fn)
    return jax.jit(lx.quaxify(fn, strategy=None if strategy == "auto" else strategy))


class Server:
    """The model, the bank, the registered adapters and the jitted programs."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.params = init_params(cfg)
        rules = lx.LoraRule(PROJECTIONS, rank=cfg.rank, stack_axes=0)
        self.bank = lx.AdapterBank(self.params, rules, slots=cfg.slots)
        self.names = [f"adapter{i:02d}" for i in range(cfg.slots)]
        self.adapters = {}
        for i, name in enumerate(self.names):
            self.adapters[name] = make_adapter(self.params, adapter_rank(i, cfg), i)
            self.bank.add(name, self.adapters[name])
        # Single-adapter stacks for the per-adapter loop, built once (a server would
        # keep them on the device).
        self.single = {n: lx.stack_adapters([a]) for n, a in self.adapters.items()}
        self.gen_base = lora_jit(generate, cfg, "base")
        self.gen = lora_jit(generate, cfg)
        self.merge = jax.jit(lx.merge)
        self.score = lora_jit(score, cfg, "base")
        self.prefill = {s: lora_jit(prefill, cfg, s) for s in ["base", *STRATEGIES]}
        self.decode = {s: lora_jit(decode_step, cfg, s) for s in ["base", *STRATEGIES]}
        rng = np.random.default_rng(1)
        self.prompt_pool = rng.integers(0, cfg.vocab, (256, cfg.prompt), np.int32)

    def requests(self, batch: int, distinct: int):
        """`batch` adapter names spread evenly over `distinct` adapters (rows in a
        shuffled order; every fourth adapter has half the rank), and the prompts."""
        assert batch % distinct == 0, "sub-batches of one size (see the docstring)"
        rng = np.random.default_rng(1000 * batch + distinct)
        rows = rng.permutation(batch)
        names = [self.names[rows[i] % distinct] for i in range(batch)]
        return names, jnp.asarray(self.prompt_pool[:batch])

    def generation(self, names, prompts) -> dict:
        """The whole generation for a batch, each way."""
        bank, params = self.bank, self.params

        def ours():
            served = lx.loraify(params, bank, bank.indices(names))
            jax.block_until_ready(self.gen(served, prompts))

        def compact():
            idx = bank.indices(names)
            served = lx.loraify(params, bank, idx, compact=True)
            jax.block_until_ready(self.gen(served, prompts))

        groups = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        subs = {n: prompts[np.asarray(rows)] for n, rows in groups.items()}
        zeros = {n: jnp.zeros((len(rows),), jnp.int32) for n, rows in groups.items()}
        # The groups are the same size, so one group per rank compiles everything.
        one_per_rank = list({self.adapters[n].ranks[0]: n for n in groups}.values())

        def in_turn(run_group, which):
            """One group after another, the next dispatched while the last runs
            (at most two in flight: 64 merged models at once would not fit)."""
            out = []
            for n in which:
                out.append(run_group(n))
                if len(out) > 1:
                    jax.block_until_ready(out[-2])
            jax.block_until_ready(out)

        def merged(which=tuple(groups)):
            in_turn(
                lambda n: self.gen_base(self.merge(params, self.adapters[n]), subs[n]),
                which,
            )

        def per_adapter(which=tuple(groups)):
            in_turn(
                lambda n: self.gen(
                    lx.loraify(params, self.single[n], zeros[n]), subs[n]
                ),
                which,
            )

        return {
            "base": lambda: jax.block_until_ready(self.gen_base(params, prompts)),
            "auto": ours,
            "compact": compact,
            "merged": (merged, lambda: merged(one_per_rank)),
            "per-adapter": (per_adapter, lambda: per_adapter(one_per_rank)),
        }

    def phases(self, names, prompts) -> dict:
        """Prefill and one decode step for a batch, each strategy forced."""
        cfg, params = self.cfg, self.params
        idx = self.bank.indices(names)
        served = lx.loraify(params, self.bank, idx)
        small = lx.loraify(params, self.bank, idx, compact=True)
        cache = empty_cache(cfg, len(names))
        token = jnp.zeros((len(names),), jnp.int32)
        v = {}
        for s in ["base", *STRATEGIES, "compact"]:
            model = {"base": params, "compact": small}.get(s, served)
            fn = "auto" if s == "compact" else s
            v[f"prefill {s}"] = functools.partial(
                lambda f, m: jax.block_until_ready(f(m, prompts)),
                self.prefill[fn],
                model,
            )
            v[f"decode {s}"] = functools.partial(
                lambda f, m: jax.block_until_ready(f(m, token, cache, cfg.prompt)),
                self.decode[fn],
                model,
            )
        return v

    @functools.cache  # noqa: B019 (one server per process)
    def auto_picks(self, batch: int) -> str:
        """What `auto` chooses for the adapted products of prefill and decode (it
        sees shapes only: the same for any adapters in a batch of that size)."""
        cfg = self.cfg
        names, prompts = self.requests(batch, 1)
        served = lx.loraify(self.params, self.bank, self.bank.indices(names))
        cache = empty_cache(cfg, len(names))
        token = jnp.zeros((len(names),), jnp.int32)
        picks = []
        for fn, args in [
            (prefill, (served, prompts)),
            (decode_step, (served, token, cache, cfg.prompt)),
        ]:
            choices = lx.explain_strategies(functools.partial(fn, cfg=cfg), *args)
            picks.append("+".join(sorted({c.strategy for c in choices})))
        return " / ".join(picks)


def target(distinct: int) -> float:
    """At least 0.95x with 1-8 adapters; 0.85x when every row has its own."""
    return 0.95 if distinct <= 8 else 0.85


def workloads(cfg: Config, extremes: bool = False):
    """(label, batch, distinct adapters); with `extremes`, only the fewest and the
    most adapters of each batch size."""
    for batch, counts in cfg.batches:
        for distinct in (min(counts), max(counts)) if extremes else counts:
            label = f"batch {batch}, {distinct} adapter{'s' * (distinct > 1)}"
            yield label, batch, distinct


GEN_VARIANTS = ["auto", "compact", "merged", "per-adapter"]
GEN_HEADER = (
    "| workload | base ms | base tok/s | "
    + " | ".join(GEN_VARIANTS)
    + " | target | met (auto / compact) |\n|"
    + "---|" * (len(GEN_VARIANTS) + 5)
)
PHASE_VARIANTS = [
    f"{p} {s}" for p in ("prefill", "decode") for s in [*STRATEGIES, "compact"]
]
PHASE_HEADER = (
    "| workload | base prefill ms | base decode step ms | "
    + " | ".join(PHASE_VARIANTS)
    + " | auto picks (prefill / decode) |\n|"
    + "---|" * (len(PHASE_VARIANTS) + 4)
)


class Table(list):
    """Rows, each printed as soon as it is measured (long runs show progress)."""

    def __init__(self, header, fmt):
        super().__init__()
        self.header, self.fmt = header, fmt

    def append(self, row):
        if not self:
            print("\n" + self.header, flush=True)
        print(self.fmt(row), flush=True)
        super().append(row)

    def __str__(self):
        return "\n".join([self.header, *map(self.fmt, self)])


def fmt_gen(r) -> str:
    cells = " | ".join(f"{r['ratio'][k]:.2f}x" for k in GEN_VARIANTS)
    met = " / ".join("yes" if m else "**no**" for m in r["met"])
    return (
        f"| {r['label']} | {r['base_s'] * 1e3:.0f} | {r['base_tps']:.0f} | {cells} "
        f"| >= {r['target']:.2f} | {met} |"
    )


def fmt_phase(r) -> str:
    cells = " | ".join(f"{r['ratio'][k]:.2f}x" for k in PHASE_VARIANTS)
    return (
        f"| {r['label']} | {r['prefill_s'] * 1e3:.0f} | {r['decode_s'] * 1e3:.1f} "
        f"| {cells} | {r['picks']} |"
    )


def throughput(server: Server, repeats: int) -> Table:
    """Tokens per second of the whole generation, relative to the base model."""
    cfg, table = server.cfg, Table(GEN_HEADER, fmt_gen)
    for label, batch, distinct in workloads(cfg):
        names, prompts = server.requests(batch, distinct)
        med = measure(server.generation(names, prompts), repeats)
        ratio = {k: med["base"] / med[k] for k in GEN_VARIANTS}
        t = target(distinct)
        table.append(
            {
                "label": label,
                "distinct": distinct,
                "base_s": med["base"],
                "base_tps": batch * (cfg.steps + 1) / med["base"],
                "ratio": ratio,
                "target": t,
                "met": (ratio["auto"] >= t, ratio["compact"] >= t),
            }
        )
    return table


def by_phase(server: Server, repeats: int, only_last: bool = False) -> Table:
    """Prefill and one decode step, each strategy forced, relative to the base
    model (base time / time: higher is better); with `only_last`, for the last
    workload only (quick mode)."""
    table = Table(PHASE_HEADER, fmt_phase)
    # What each strategy computes is fixed by the shapes; only the memory traffic of
    # the factors depends on how many distinct adapters there are: the extremes.
    chosen = list(workloads(server.cfg, extremes=True))
    for label, batch, distinct in chosen[-1:] if only_last else chosen:
        names, prompts = server.requests(batch, distinct)
        med = measure(server.phases(names, prompts), repeats)
        ratio = {k: med[f"{k.split()[0]} base"] / med[k] for k in PHASE_VARIANTS}
        table.append(
            {
                "label": label,
                "prefill_s": med["prefill base"],
                "decode_s": med["decode base"],
                "ratio": ratio,
                "picks": server.auto_picks(batch),
            }
        )
    return table


# -- the bank's own costs ----------------------------------------------------------


def bank_costs(server: Server, repeats: int) -> dict:
    """`bank.add` + first use against a decode step; one slot write against the
    same write without donation; the bank's bytes against the model's."""
    cfg, bank, params = server.cfg, server.bank, server.params
    batch = max(b for b, _ in cfg.batches)
    names, _ = server.requests(batch, min(8, cfg.slots // 2))
    cache = empty_cache(cfg, batch)
    token = jnp.zeros((batch,), jnp.int32)
    step_fn = server.decode["auto"]

    def step(names):
        served = lx.loraify(params, bank, bank.indices(names))
        jax.block_until_ready(step_fn(served, token, cache, cfg.prompt))

    step(names)
    compiled = step_fn._cache_size()
    step_s = timed(lambda: step(names), repeats)

    # A new adapter replaces row 0's; the bank is full, so loading it evicts the
    # least recently used adapter that this batch does not need.
    new = [
        make_adapter(params, adapter_rank(k, cfg), 10_000 + k) for k in range(repeats)
    ]
    parts = {"add": [], "load": [], "loraify": [], "step": [], "total": []}
    for k, ad in enumerate(new):
        name = f"new{k:02d}"
        t0 = time.perf_counter()
        bank.add(name, ad)
        t1 = time.perf_counter()
        idx = bank.indices([name, *names[1:]])
        t2 = time.perf_counter()
        served = lx.loraify(params, bank, idx)
        t3 = time.perf_counter()
        jax.block_until_ready(step_fn(served, token, cache, cfg.prompt))
        t4 = time.perf_counter()
        for key, dt in zip(parts, [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0]):
            parts[key].append(dt)
    first_use = {k: statistics.median(v) for k, v in parts.items()}
    recompiled = step_fn._cache_size() != compiled

    def factors(idx):  # (slot axis, array) for every a and b of the bank
        served = bank.served(idx)
        return [
            (len(lay.stack_axes), x)
            for lay in served.layouts
            for x in served.factors[lay.path]
        ]

    # One slot write: an adapter that is not on the device, loaded alone.
    idx = bank.indices([bank.names[0]])
    before = [x for _, x in factors(idx)]
    pointers = [x.unsafe_buffer_pointer() for x in before]
    writes = []
    for _ in range(repeats):
        missing = next(n for n in bank.names if n not in bank.loaded)
        t = time.perf_counter()
        idx = bank.indices([missing])
        jax.block_until_ready([x for _, x in factors(idx)])
        writes.append(time.perf_counter() - t)
    after = [x for _, x in factors(idx)]
    same_address = all(x.unsafe_buffer_pointer() == p for x, p in zip(after, pointers))
    old_deleted = all(x.is_deleted() for x in before)

    # The same write without donation: XLA must copy every slot to write one.
    axes = [ax for ax, _ in factors(idx)]
    zeros = [jnp.zeros(np.delete(x.shape, ax), x.dtype) for ax, x in factors(idx)]

    @jax.jit
    def copy_write(xs, parts):
        return [
            lax.dynamic_update_index_in_dim(x, part, 0, ax)
            for x, part, ax in zip(xs, parts, axes)
        ]

    def copied():
        jax.block_until_ready(copy_write([x for _, x in factors(idx)], zeros))

    copied()
    return {
        "batch": batch,
        "step_s": step_s,
        "first_use": first_use,
        "recompiled": recompiled,
        "write_s": statistics.median(writes),
        "copy_s": timed(copied, repeats),
        "same_address": same_address,
        "old_deleted": old_deleted,
        "bank_bytes": bank.nbytes,
        "base_bytes": nbytes(params),
        "slot_bytes": bank.nbytes // cfg.slots,
    }


def fmt_bank(c: dict, cfg: Config) -> str:
    fu, step, copy = c["first_use"], c["step_s"], c["copy_s"]

    def row(what, seconds, ref):
        return f"| {what} | {seconds * 1e3:.2f} ms | {seconds / ref:.2f}x |"

    def mem(what, n):
        return f"| {what} | {n / 2**20:.1f} MiB | {n / c['base_bytes']:.3f}x |"

    return "\n".join(
        [
            "| bank operation | cost | ratio |",
            "|---|---|---|",
            row(f"one decode step, batch {c['batch']} (reference)", step, step),
            row("`bank.add` of a new adapter (host)", fu["add"], step),
            row("its first `indices` (loads it into a slot)", fu["load"], step),
            row("`loraify`", fu["loraify"], step),
            row("the decode step", fu["step"], step),
            row("add + first use, in all", fu["total"], step),
            row(
                "the same slot write without donation (copies the bank; reference)",
                copy,
                copy,
            ),
            row(
                "one slot write (donated, in place; includes the host transfer)",
                c["write_s"],
                copy,
            ),
            mem("base model (reference)", c["base_bytes"]),
            mem(
                f"bank on the device ({cfg.slots} slots at rank {cfg.rank})",
                c["bank_bytes"],
            ),
            mem("one slot", c["slot_bytes"]),
        ]
    )


# -- correctness -------------------------------------------------------------------


def check(server: Server) -> tuple[bool, str]:
    """The timed batched program against each row alone with its adapter merged
    (`lx.merge`). Logits are compared at every generated position on the batched
    run's own tokens (teacher-forced), so a near-tie that flips a greedy token can
    neither hide nor fake a difference; whether the greedy tokens agree with the
    merged model generating alone is reported too."""
    cfg, bank, params = server.cfg, server.bank, server.params
    batch, counts = cfg.batches[0]
    names, prompts = server.requests(batch, max(c for c in counts if c <= 8))
    names[1] = None  # one row on the base model
    rank8 = next(i for i, n in enumerate(names) if n == server.names[3])
    rows = sorted({0, 1, 2, rank8})
    served = lx.loraify(params, bank, bank.indices(names))
    tokens, logits = server.gen(served, prompts)
    worst, same_tokens, lines = 0.0, 0, []
    for r in rows:
        name = names[r]
        model = params if name is None else lx.merge(params, server.adapters[name])
        seq = jnp.concatenate([prompts[r], tokens[r, :-1]])[None]
        ref = server.score(model, seq)[0, cfg.prompt - 1 :]
        err = float(jnp.max(jnp.abs(ref - logits[r])) / jnp.max(jnp.abs(ref)))
        worst = max(worst, err)
        alone = server.gen_base(model, prompts[r : r + 1])[0][0]
        same = bool(jnp.array_equal(alone, tokens[r]))
        same_tokens += same
        rank = server.adapters[name].ranks[0] if name else "-"
        lines.append(
            f"  row {r} ({name or 'base model'}, rank {rank}): relative logit "
            f"error {err:.1e}; greedy tokens identical to the merged model's: {same}"
        )
    base_tokens = server.gen_base(params, prompts)[0]
    adapted = np.asarray([r for r in rows if names[r] is not None])
    differ = int(jnp.sum(base_tokens[adapted] != tokens[adapted]))
    # The adapters must change the output, or the comparison proves nothing.
    ok = worst < 1e-3 and differ > 0
    summary = (
        f"Correctness: {'PASS' if ok else 'FAIL'}: worst relative logit error "
        f"{worst:.1e} over {len(rows)} rows (tolerance 1e-3); greedy tokens "
        f"identical in {same_tokens}/{len(rows)} rows; {differ} of the adapted "
        f"rows' {adapted.size * (cfg.steps + 1)} tokens differ from the base model's."
    )
    return ok, "\n".join([*lines, summary])


# -- output ------------------------------------------------------------------------


def plot(gen: Table, phases: Table, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    low = min(r["ratio"][k] for t in (gen, phases) for r in t for k in r["ratio"])
    for ax, table, keys, title in [
        (axes[0], gen, GEN_VARIANTS, "whole generation: tokens/s vs the base model"),
        (
            axes[1],
            phases,
            PHASE_VARIANTS,
            "by phase (auto, compact, each strategy forced)",
        ),
    ]:
        width = 0.8 / len(keys)
        x = np.arange(len(table))
        for j, k in enumerate(keys):
            offset = (j - len(keys) / 2 + 0.5) * width
            ax.bar(x + offset, [r["ratio"][k] for r in table], width, label=k)
        ax.axhline(1.0, color="black", lw=0.8)
        for t in (0.95, 0.85):
            ax.axhline(t, color="grey", lw=0.6, ls="--")
            va = "bottom" if t > 0.9 else "top"
            ax.text(len(table) - 0.5, t, f"{t} ", ha="right", va=va, fontsize=7)
        ax.set_xticks(x, [r["label"].replace(", ", "\n") for r in table], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(low * 0.8, 2.2)
        ax.yaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.3, 0.5, 0.7, 1.0]))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    axes[0].set_ylabel("base time / time (higher is better)")
    fig.suptitle("Serving from an AdapterBank: prefill + greedy decode", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/serving.md")
    p.add_argument("--plot", default="docs/serving.png")
    args = p.parse_args()
    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 3)
    if args.quick:
        # Only the script's plumbing is under test (toy sizes, meaningless
        # timings): compile ~30% faster with XLA's optimisations off.
        jax.config.update("jax_disable_most_optimizations", True)
    t_start = time.perf_counter()
    server = Server(cfg)
    model = (
        f"Model: {n_params(server.params) / 1e6:.1f}M parameters (d_model "
        f"{cfg.d_model}, {cfg.layers} layers, {cfg.heads} query / {cfg.kv_heads} KV "
        f"heads, d_ff {cfg.d_ff}, vocab {cfg.vocab}, float32). LoRA on q, k, v, o, "
        f"gate, up, down at rank {cfg.rank} (one adapter in four at rank "
        f"{cfg.rank // 2}), from a bank of {cfg.slots} slots. Prompt {cfg.prompt} "
        f"tokens, {cfg.steps} decode steps ({cfg.steps + 1} new tokens per request)."
    )
    print(model, flush=True)
    ok, report = check(server)
    print(report, flush=True)
    server.bank.indices(server.names)  # every adapter in its slot: timing loads none
    last, loaded = server.bank.events[-1], server.bank.loaded
    gen = throughput(server, repeats)
    phases = by_phase(server, repeats, only_last=args.quick)
    unchanged = server.bank.events[-1] is last and server.bank.loaded == loaded
    assert unchanged, "a timed call loaded an adapter"
    costs = bank_costs(server, repeats)
    bank_table = fmt_bank(costs, cfg)
    print("\n" + bank_table)
    notes = [
        f"First use of a new adapter recompiled: {costs['recompiled']}. "
        f"Slot write in place: buffer addresses unchanged: {costs['same_address']}, "
        f"old arrays deleted: {costs['old_deleted']}.",
        *(
            f"Target, {r['label']}: auto {r['ratio']['auto']:.2f}x, compact "
            f"{r['ratio']['compact']:.2f}x >= {r['target']:.2f}: "
            + " / ".join("met" if m else "MISSED" for m in r["met"])
            for r in gen
        ),
        *(
            f"Fastest forced strategy, {r['label']}: prefill "
            + max(FORCED, key=lambda s, r=r: r["ratio"][f"prefill {s}"])
            + ", decode "
            + max(FORCED, key=lambda s, r=r: r["ratio"][f"decode {s}"])
            for r in phases
        ),
    ]
    print("\n" + "\n".join(notes))
    dev = jax.devices()[0]
    head = (
        f"Device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}; ratios "
        f"to the base model (base time / time: higher is better), medians of "
        f"{repeats} interleaved rounds."
    )
    text = [head, "", model, "", str(gen), "", str(phases), "", bank_table, ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*text, *notes, "", report]) + "\n")
    plot(gen, phases, Path(args.plot))
    print(f"\nwrote {out} and {args.plot} in {time.perf_counter() - t_start:.0f} s")
    if not ok:
        raise SystemExit("the batched generation differs from the merged models")


if __name__ == "__main__":
    main()
