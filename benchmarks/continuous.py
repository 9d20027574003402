"""Continuous batching: a stream of requests, each with its own adapter from an
`AdapterBank`, served step by step over a fixed number of batch rows, against the
base model under the same scheduler and the same stream.

A server does not run static batches: requests arrive and leave at every step, so
every decode step serves a different assignment of rows to adapters and must be
routed anew on the host. This benchmark measures what that routing costs next to
the device work of a step, the adapted server's tokens/s next to the base model's,
and both against the time a decode step needs just to read its bytes.

Model: the Llama-style decoder of `benchmarks/serving.py` (30.9M parameters,
float32: d_model 512, 8 layers, 8 query / 2 KV heads, d_ff 1408, vocab 8192) and
its adapters (LoRA on q, k, v, o, gate, up and down at rank 16, one adapter in
four at rank 8, zero-padded in the bank), in two layouts with the same weights and
the same adapters:

- `scanned`: the serving model as it is: each projection's layers stacked in one
  leaf and scanned with `lax.scan`, the rules with `stack_axes=0` (7 adapted
  leaves);
- `unscanned`: the layers as a list of per-layer dicts walked by a Python loop,
  each projection of each layer its own leaf (7 x 8 = 56 adapted leaves), as in
  the `transformers` Flax ports and EasyDeL: what the host does per leaf shows.

Stream (fixed seed): 128 requests; the first 32 waiting at step 0 (a server
already busy), the rest arriving as a Poisson process on the step clock, at 1.25 x
rows / mean output length per step (rows stay full, with a queue); prompts of
8-32 tokens and outputs of 8-48 tokens (uniform); each request's adapter one of
64, with Zipf popularity (exponent 1.1; the popularity order shuffled over the
adapters). The step clock, not the wall clock, so every server sees the same
stream.

Scheduler: 32 batch rows, each with its own KV cache row (96 positions) and its own
position. Every step:

1. admits waiting requests into free rows, first come first served; a request
   whose adapter would make the step need more than the bank's 16 slots is skipped
   for now and keeps its place (as vLLM's `max_loras` does), so a step never needs
   more than `slots` distinct adapters;
2. routes the step (adapted servers only): `route(bank, params, names)`, the one
   function below: `bank.indices` for the 32 rows' names (a free row runs the base
   model), loading missing adapters into the bank (LRU), then `lx.loraify`;
3. prefills each newly admitted request on its own (batch 1, its own adapter
   routed the same way, the prompt right-padded to 32 tokens so one program
   serves every length), writing its KV cache row and its first token;
4. runs one jitted decode step for all 32 rows, each at its own position, and
   brings the 32 new tokens to the host (as a server streaming them must).

Output lengths are drawn, not stopped at an end token, so the schedule depends on
the stream alone: it is computed once and every server replays the same steps.

Servers, per layout: `base` (the plain parameters: the same steps, no bank, no
routing) and `adapted` (`idx = bank.indices(names)`, `lx.loraify(params, bank,
idx)` outside the jitted step, `jax.jit(lx.quaxify(step))(served, ...)`). If the
library has `AdapterBank.served`, also `adapted (served)`: `bank.served(idx)`
passed into a jitted step that calls `lx.loraify(params, served)` inside.

Timing: every server is compiled and warmed first (by the correctness pass);
then each of `--passes` passes (1 by default: ~140 steps) replays the whole
schedule with every server run once per step, in a fresh random order
(interleaved), so each server's steps are paired with the others'. Reported per
server:

- tokens/s over the stream (prefills included), and its ratio to `base` of the
  same layout (median of passes; target >= 0.85x);
- per step (median of all timed steps): the step, its host time (routing: the
  calls of `route`; dispatch: the time for the jitted calls to return, before
  the tokens are fetched) as % of the step (target <= 5%), and device time (the
  step minus host time: what the host waits for);
- loads per 1000 generated tokens (`bank.last_events`, kind "load");
- a bound: the bytes a decode step must read (the weights, plus for an adapted
  server the step's distinct adapters at the bank's capacity rank) over a memory
  bandwidth measured in this process (a jitted sum over a 256 MiB buffer),
  against the median step without admissions (decode only).

A second table has the host's part of those decode-only steps (`route`, the
decode step's dispatch, the base model's dispatch) and `route` split into
`bank.indices` and `loraify` (or `served`), timed apart afterwards by replaying
the schedule's names with the device idle; and how many arrays the step is
handed (each is flattened and checked at every call).

Correctness, once, untimed: the timed programs replay the schedule until the
first 4 requests finish; each one's logits at every generated position (its
prefill's and each decode step's) must match the request run alone through
`serving.py`'s own model with its adapter merged (`lx.merge`), fed the same tokens
(teacher-forced), within 1e-3 relative, in every adapted server; and its tokens
must differ from the base server's (else the check proves nothing). The script
exits non-zero if the check fails.

The tables are printed, and written to `--out` if given.

Run: python -m benchmarks.continuous            (full; ~4 minutes on 2 CPU cores)
     python -m benchmarks.continuous --quick    (toy sizes, ~12 s; used by the tests)
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
from benchmarks import serving
from benchmarks.serving import (
    PROJECTIONS,
    Config,
    adapter_rank,
    init_params,
    make_adapter,
    n_params,
    nbytes,
    rms_norm,
    score,
)

UNSCANNED = r"layers/\d+/(wq|wk|wv|wo|w_gate|w_up|w_down)$"


@dataclasses.dataclass(frozen=True)
class Stream:
    requests: int
    rows: int  # batch rows of the decode step
    adapters: int  # registered adapters (the bank has `Config.slots` slots)
    prompt: tuple[int, int]  # prompt tokens, uniform in [lo, hi]; padded to hi
    output: tuple[int, int]  # generated tokens, uniform in [lo, hi]; lo >= 2
    zipf: float = 1.1
    load: float = 1.25  # arrivals per step, in units of rows / mean output
    checked: int = 4  # finished requests compared with their merged model
    bw_mib: int = 256  # the buffer of the bandwidth measurement
    seed: int = 0


# The model's `prompt` is the padded prompt length, `steps` the longest output:
# each KV cache row holds prompt + steps positions.
FULL = (
    dataclasses.replace(serving.FULL, prompt=32, steps=64, slots=16),
    Stream(requests=128, rows=32, adapters=64, prompt=(8, 32), output=(8, 48)),
)
QUICK = (
    dataclasses.replace(serving.QUICK, prompt=8, steps=8, slots=2),
    Stream(
        requests=12,
        rows=4,
        adapters=8,
        prompt=(2, 8),
        output=(2, 8),
        checked=3,
        bw_mib=16,
    ),
)


# -- the model, one position per row -------------------------------------------------


def rope_rows(x, pos, base):
    """`serving.rope` with a position per row: `x: (batch, t, heads, head_dim)` at
    positions `pos: (batch, t)`."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = pos[..., None].astype(jnp.float32) * freq  # (batch, t, half)
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def layer(h, p, kv, pos, cfg: Config):
    """One layer of `serving.forward` with each row at its own positions:
    `h: (batch, t, d_model)`, `pos: (batch, t)`, the layer's cache `kv: (2, batch,
    max_len, kv_heads, head_dim)` written at `pos`; a row sees its cache up to its
    own position (what lies beyond is stale or padding, never read)."""
    b, t, _ = h.shape
    hd, kvh = cfg.head_dim, cfg.kv_heads
    x = rms_norm(h, p["attn_norm"])
    q = rope_rows((x @ p["wq"]).reshape(b, t, cfg.heads, hd), pos, cfg.rope_base)
    k = rope_rows((x @ p["wk"]).reshape(b, t, kvh, hd), pos, cfg.rope_base)
    v = (x @ p["wv"]).reshape(b, t, kvh, hd)
    kv = kv.at[:, jnp.arange(b)[:, None], pos].set(jnp.stack([k, v]))
    visible = jnp.arange(kv.shape[2]) <= pos[..., None]  # (batch, t, max_len)
    q = q.reshape(b, t, kvh, cfg.heads // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, kv[0]) / hd**0.5
    scores = jnp.where(visible[:, None, None], scores, -1e30)
    att = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, axis=-1), kv[1])
    h = h + att.reshape(b, t, cfg.heads * hd) @ p["wo"]
    x = rms_norm(h, p["mlp_norm"])
    return h + (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"], kv


def is_scanned(params) -> bool:
    return not isinstance(params["layers"], list)


def forward(params, tokens, cache, pos, cfg: Config):
    """`tokens: (batch, t)` at positions `pos: (batch, t)`. Scanned: the stacked
    layers and a stacked cache through `lax.scan`; unscanned: a Python loop over
    the list of layers, a cache per layer."""
    h = params["embed"][tokens]
    if is_scanned(params):
        h, cache = lax.scan(
            lambda h, xs: layer(h, *xs, pos, cfg), h, (params["layers"], cache)
        )
    else:
        new = []
        for p, kv in zip(params["layers"], cache):
            h, kv = layer(h, p, kv, pos, cfg)
            new.append(kv)
        cache = new
    return rms_norm(h, params["final_norm"]), cache


def new_cache(cfg: Config, batch: int, scanned: bool):
    shape = (2, batch, cfg.prompt + cfg.steps, cfg.kv_heads, cfg.head_dim)
    if scanned:
        return jnp.zeros((cfg.layers, *shape), jnp.float32)
    return [jnp.zeros(shape, jnp.float32) for _ in range(cfg.layers)]


def prefill(params, prompt, length, cache, tokens, row, cfg: Config):
    """One request's prompt `(1, cfg.prompt)`, right-padded after `length` tokens,
    into batch row `row`: its KV cache row and its first token. (The padding's
    cache entries lie beyond the row's position: each decode step overwrites the
    next one before attending, so none is ever read.) Returns the logits the
    token was picked from, the cache and the tokens."""
    one = new_cache(cfg, 1, is_scanned(params))
    h, one = forward(params, prompt, one, jnp.arange(cfg.prompt)[None], cfg)
    last = lax.dynamic_index_in_dim(h[0], length - 1, keepdims=False)
    logits = last @ params["lm_head"]
    cache = jax.tree.map(
        lambda c, o: lax.dynamic_update_slice_in_dim(c, o, row, c.ndim - 4),
        cache,
        one,
    )
    return logits, cache, tokens.at[row].set(jnp.argmax(logits).astype(jnp.int32))


def decode(params, tokens, cache, pos, cfg: Config):
    """One decode step for every row: `tokens: (rows,)` at `pos: (rows,)`. Returns
    the next tokens, the logits they were picked from and the cache."""
    h, cache = forward(params, tokens[:, None], cache, pos[:, None], cfg)
    logits = h[:, 0] @ params["lm_head"]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache


def unscanned_params(params) -> dict:
    """The same weights as a list of per-layer dicts (sliced on the host)."""
    layers = {k: np.asarray(v) for k, v in params["layers"].items()}
    n = next(iter(layers.values())).shape[0]
    per_layer = [{k: jnp.asarray(v[i]) for k, v in layers.items()} for i in range(n)]
    return {**params, "layers": per_layer}


def unscanned_adapter(adapter, template):
    """`adapter` (stacked layers) for the unscanned layout: each factor sliced per
    layer into `template`'s leaves (an adapter of the same rank and alpha)."""
    weights = {}
    for path, (a, b) in adapter.weights.items():
        a, b, name = np.asarray(a), np.asarray(b), path.rsplit("/", 1)[1]
        for i in range(a.shape[0]):
            weights[f"layers/{i}/{name}"] = (jnp.asarray(a[i]), jnp.asarray(b[i]))
    assert weights.keys() == template.weights.keys()
    return eqx.tree_at(lambda x: x.weights, template, weights)


# -- routing: all the host does for the adapters at a step --------------------------


def route(bank, params, names):
    """The rows' adapter names to the tree the jitted step serves."""
    idx = bank.indices(names)  # loads what the step needs into the bank's slots
    return lx.loraify(params, bank, idx)


def jit_routed(fn, donate):
    """The step for `route`'s tree: `jax.jit(lx.quaxify(fn))(served, ...)`."""
    step = jax.jit(lx.quaxify(fn), donate_argnums=donate)
    return lambda params, served, *args: step(served, *args)


def route_served(bank, params, names):
    """The same with the library's record of the batch's adapters (one pytree of
    few arrays, loraified inside the step)."""
    return bank.served(bank.indices(names))


def jit_served(fn, donate):
    """The step for `route_served`'s record: loraified inside the trace."""

    def step(params, served, *args):
        return lx.quaxify(fn)(lx.loraify(params, served), *args)

    return jax.jit(step, donate_argnums=tuple(d + 1 for d in donate))


def jit_base(fn, donate):
    step = jax.jit(fn, donate_argnums=donate)
    return lambda params, routed, *args: step(params, *args)


PATTERNS = {"adapted": (route, jit_routed)}
if hasattr(lx.AdapterBank, "served"):
    PATTERNS["adapted (served)"] = (route_served, jit_served)


# -- the stream and the schedule ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    id: int
    arrival: int  # the step it arrives at
    prompt: np.ndarray
    output: int  # tokens to generate: the first by the prefill, then one per step
    adapter: str


@dataclasses.dataclass(frozen=True)
class Step:
    names: list  # each row's adapter name (None: a free row)
    admitted: list  # (row, request): prefilled at this step, before the decode
    pos: np.ndarray  # (rows,) int32: each row's position (0 for a free row)
    live: list  # each row's request (None: free)
    distinct: int  # distinct adapters the step needs
    tokens: int  # tokens generated at this step (prefills and decodes)


def make_stream(st: Stream, vocab: int, names: list[str]) -> list[Request]:
    rng = np.random.default_rng(st.seed)
    rate = st.load * st.rows / (sum(st.output) / 2)
    # A server already busy: a full batch waiting at step 0, then Poisson arrivals.
    later = np.cumsum(rng.exponential(1 / rate, max(st.requests - st.rows, 0)))
    arrivals = np.concatenate([np.zeros(st.rows), np.floor(later)])[: st.requests]
    popularity = 1.0 / np.arange(1, st.adapters + 1) ** st.zipf
    adapters = rng.permutation(st.adapters)[
        rng.choice(st.adapters, st.requests, p=popularity / popularity.sum())
    ]
    lengths = rng.integers(st.prompt[0], st.prompt[1] + 1, st.requests)
    outputs = rng.integers(st.output[0], st.output[1] + 1, st.requests)
    return [
        Request(
            i,
            int(arrivals[i]),
            rng.integers(0, vocab, lengths[i]).astype(np.int32),
            int(outputs[i]),
            names[adapters[i]],
        )
        for i in range(st.requests)
    ]


def schedule(requests: list[Request], rows: int, slots: int) -> tuple[list, int]:
    """The steps that serve `requests` (see the docstring), and how many times an
    admission was deferred because the step would have needed more than `slots`
    adapters."""
    running: list[Request | None] = [None] * rows
    made = [0] * rows
    pos = np.zeros(rows, np.int32)
    waiting: list[Request] = []
    steps, deferred, arrived, t = [], 0, 0, 0
    while arrived < len(requests) or waiting or any(running):
        while arrived < len(requests) and requests[arrived].arrival <= t:
            waiting.append(requests[arrived])
            arrived += 1
        if not waiting and not any(running):  # idle until the next arrival
            t = requests[arrived].arrival
            continue
        adapters = {r.adapter for r in running if r is not None}
        free = [k for k in range(rows) if running[k] is None]
        admitted, kept = [], []
        for req in waiting:
            fits = req.adapter in adapters or len(adapters) < slots
            if free and fits:
                k = free.pop(0)
                running[k], made[k], pos[k] = req, 1, len(req.prompt)
                adapters.add(req.adapter)
                admitted.append((k, req))
            else:
                deferred += bool(free)
                kept.append(req)
        waiting = kept
        live = list(running)
        steps.append(
            Step(
                names=[r.adapter if r is not None else None for r in live],
                admitted=admitted,
                pos=pos.copy(),
                live=live,
                distinct=len(adapters),
                tokens=len(admitted) + sum(r is not None for r in live),
            )
        )
        for k, r in enumerate(live):
            if r is not None:
                made[k] += 1
                pos[k] += 1
                if made[k] == r.output:
                    running[k], pos[k] = None, 0
        t += 1
    assert sum(s.tokens for s in steps) == sum(r.output for r in requests)
    assert max(s.distinct for s in steps) <= slots
    return steps, deferred


# -- servers ---------------------------------------------------------------------------


class Server:
    """One server's programs and state (its KV cache and its rows' last tokens);
    `bank` None is the base model."""

    def __init__(self, layout, label, cfg, st, params, prompts, bank=None, jit=None):
        self.layout, self.label, self.cfg, self.st = layout, label, cfg, st
        self.params, self.prompts, self.bank = params, prompts, bank
        self.route = PATTERNS[label][0] if bank is not None else None
        jit = jit_base if bank is None else PATTERNS[label][1]
        self.prefill = jit(functools.partial(prefill, cfg=cfg), donate=(3,))
        self.decode = jit(functools.partial(decode, cfg=cfg), donate=(2,))
        self.reset()

    def reset(self):
        self.cache = new_cache(self.cfg, self.st.rows, is_scanned(self.params))
        self.tokens = jnp.zeros((self.st.rows,), jnp.int32)

    def step(self, plan: Step, record: dict | None = None) -> tuple:
        """One step of the schedule: `(seconds, routing, dispatch, loads, route,
        decode)`: the step, the host's time in `route` and in dispatching the
        jitted calls (prefills included), the adapters loaded, and of those the
        step's own `route` and the decode step's dispatch. With `record`, the
        logits of every generated token, per request id (untimed)."""
        routing = dispatch = 0.0
        loads = 0
        t0 = time.perf_counter()
        routed = None
        if self.bank is not None:
            routed = self.route(self.bank, self.params, plan.names)
            loads = sum(e.kind == "load" for e in self.bank.last_events)
        t1 = time.perf_counter()
        routing = step_route = t1 - t0
        for row, req in plan.admitted:
            t = time.perf_counter()
            one = None
            if self.bank is not None:  # loaded above: no load, `routed` stays valid
                one = self.route(self.bank, self.params, [req.adapter])
            t1 = time.perf_counter()
            logits, self.cache, self.tokens = self.prefill(
                self.params,
                one,
                self.prompts[req.id],
                np.int32(len(req.prompt)),
                self.cache,
                self.tokens,
                np.int32(row),
            )
            dispatch += time.perf_counter() - t1
            routing += t1 - t
            if record is not None:
                record.setdefault(req.id, []).append(np.asarray(logits))
        t = time.perf_counter()
        new, logits, self.cache = self.decode(
            self.params, routed, self.tokens, self.cache, plan.pos
        )
        decode_dispatch = time.perf_counter() - t
        dispatch += decode_dispatch
        np.asarray(new)  # the new tokens on the host, as a server streams them
        seconds = time.perf_counter() - t0
        self.tokens = new
        if record is not None:
            logits = np.asarray(logits)
            for row, req in enumerate(plan.live):
                if req is not None:
                    record.setdefault(req.id, []).append(logits[row])
        return seconds, routing, dispatch, loads, step_route, decode_dispatch


# -- correctness -------------------------------------------------------------------


def check(servers, plans, cfg, st, params, adapters) -> tuple[bool, str]:
    """Replays the schedule until `st.checked` requests have finished, recording
    each server's logits; each finished request's against `serving.py`'s model
    with its adapter merged, fed the same tokens (teacher-forced)."""
    finished, n = [], len(plans)
    for i, plan in enumerate(plans):
        finished += [r for r in plan.live if r is not None and _done(plan, r)]
        if len(finished) >= st.checked:
            n = i + 1
            break
    finished = finished[: st.checked]
    records = {s: {} for s in servers}
    for plan in plans[:n]:
        for s in servers:
            s.step(plan, records[s])
    max_len = cfg.prompt + cfg.steps
    scorer = jax.jit(functools.partial(score, cfg=cfg))
    merge = jax.jit(lx.merge)
    base = next(s for s in servers if s.bank is None)
    worst, agree, differ, total, lines = 0.0, 0, 0, 0, []
    for req in finished:
        model = merge(params, adapters[req.adapter])
        base_tokens = [int(np.argmax(x)) for x in records[base][req.id]]
        for s in servers:
            if s.bank is None:
                continue
            got = np.stack(records[s][req.id])  # (output, vocab)
            assert got.shape[0] == req.output, (got.shape, req.output)
            tokens = np.argmax(got, axis=-1)
            seq = np.zeros((1, max_len), np.int32)  # right-padded: causal
            p = len(req.prompt)
            seq[0, :p] = req.prompt
            seq[0, p : p + req.output - 1] = tokens[:-1]
            ref = np.asarray(scorer(model, jnp.asarray(seq)))[0]
            ref = ref[p - 1 : p - 1 + req.output]
            err = float(np.max(np.abs(ref - got)) / np.max(np.abs(ref)))
            worst = max(worst, err)
            agree += int(np.array_equal(np.argmax(ref, axis=-1), tokens))
            differ += int(np.sum(tokens != np.asarray(base_tokens)))
            total += req.output
            lines.append(
                f"  request {req.id} ({req.adapter}, rank "
                f"{adapters[req.adapter].ranks[0]}, prompt {p}, {req.output} "
                f"tokens), {s.layout} {s.label}: relative logit error {err:.1e}"
            )
    checked = sum(s.bank is not None for s in servers) * len(finished)
    ok = worst < 1e-3 and differ > 0 and checked > 0
    summary = (
        f"Correctness: {'PASS' if ok else 'FAIL'}: worst relative logit error "
        f"{worst:.1e} over {len(finished)} finished requests x "
        f"{checked // max(len(finished), 1)} adapted servers (tolerance 1e-3); "
        f"greedy tokens equal to the merged model's in {agree}/{checked}; "
        f"{differ} of their {total} tokens differ from the base server's."
    )
    return ok, "\n".join([*lines, summary])


def _done(plan: Step, req: Request) -> bool:
    """Whether `req` has all its tokens after `plan`'s decode: it had one after
    its prefill, at position `len(prompt)`, and gains one per step."""
    made = int(plan.pos[plan.live.index(req)]) - len(req.prompt) + 2
    return made == req.output


# -- measurements ----------------------------------------------------------------------


def bandwidth(mib: int, repeats: int = 15) -> float:
    """Bytes/s of a jitted sum over a `mib` MiB float32 buffer (read once)."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(lambda x: x.sum())
    jax.block_until_ready(total(x))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(total(x))
        ts.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(ts)


def timed_passes(servers, plans, passes: int, seed: int = 0) -> dict:
    """Each server's `Server.step` results per step, over
    `passes` replays of the schedule, the servers interleaved at every step in a
    fresh random order; and each pass's total seconds."""
    order = np.random.default_rng(seed)
    steps = {s: [] for s in servers}
    totals = {s: [] for s in servers}
    for _ in range(passes):
        for s in servers:
            s.reset()
        start = {s: len(steps[s]) for s in servers}
        for plan in plans:
            for k in order.permutation(len(servers)):
                s = servers[k]
                steps[s].append(s.step(plan))
        for s in servers:
            totals[s].append(sum(x[0] for x in steps[s][start[s] :]))
    return {"steps": steps, "totals": totals}


def routing_split(server, plans, repeats: int = 1) -> dict:
    """`bank.indices` and `loraify` (or `served`) timed apart over the schedule's
    steps, and the arrays the routed tree hands to the jitted step."""
    bank, params = server.bank, server.params
    parts = {"indices": [], "loraify": []}
    routed = None
    for _ in range(repeats):
        for plan in plans:
            t0 = time.perf_counter()
            idx = bank.indices(plan.names)
            t1 = time.perf_counter()
            if server.label == "adapted":
                routed = lx.loraify(params, bank, idx)
            else:
                routed = bank.served(idx)
            t2 = time.perf_counter()
            parts["indices"].append(t1 - t0)
            parts["loraify"].append(t2 - t1)
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["arrays"] = len(jax.tree.leaves(routed))
    if server.label != "adapted":
        out["arrays"] += len(jax.tree.leaves(params))
    return out


# -- the report ------------------------------------------------------------------------

HEADER = [
    "layout",
    "server",
    "tok/s",
    "vs base",
    "step ms",
    "routing ms",
    "dispatch ms",
    "host % of step",
    "device ms",
    "loads / 1k tokens",
    "decode-only step ms",
    "bound ms",
    "decode / bound",
]


def summarise(servers, plans, timing, passes, weight_bytes, slot_bytes, bw):
    tokens = sum(p.tokens for p in plans)
    decode_only = np.array([not p.admitted for p in plans] * passes)
    distinct = np.array([p.distinct for p in plans] * passes)
    rows = []
    for s in servers:
        steps = np.array(timing["steps"][s])  # (steps, 4)
        secs, routing, dispatch, loads, step_route, decode_dispatch = steps.T
        host = routing + dispatch
        base = next(b for b in servers if b.layout == s.layout and b.bank is None)
        per_pass = [tokens / t for t in timing["totals"][s]]
        vs = [b / t for b, t in zip(timing["totals"][base], timing["totals"][s])]
        adapted = s.bank is not None
        bound = (weight_bytes + adapted * distinct * slot_bytes) / bw
        rows.append(
            {
                "layout": s.layout,
                "server": s.label,
                "tps": statistics.median(per_pass),
                "ratio": statistics.median(vs),
                "step": np.median(secs),
                "routing": np.median(routing),
                "dispatch": np.median(dispatch),
                "host": np.median(host / secs),
                "device": np.median(secs - host),
                "loads": 1000 * loads.sum() / (tokens * passes) if adapted else None,
                "decode": np.median(secs[decode_only]),
                "bound": np.median(bound[decode_only]),
                "step route": np.median(step_route[decode_only]),
                "decode dispatch": np.median(decode_dispatch[decode_only]),
                "adapted": adapted,
            }
        )
    return rows


def fmt_row(r: dict, leaves: dict) -> str:
    ms = lambda x: f"{x * 1e3:.2f}"  # noqa: E731
    cells = [
        f"{r['layout']} ({leaves[r['layout']]} adapted leaves)",
        r["server"],
        f"{r['tps']:.0f}",
        f"{r['ratio']:.2f}x",
        ms(r["step"]),
        ms(r["routing"]) if r["adapted"] else "-",
        ms(r["dispatch"]),
        f"{100 * r['host']:.1f}%",
        ms(r["device"]),
        f"{r['loads']:.1f}" if r["adapted"] else "-",
        ms(r["decode"]),
        ms(r["bound"]),
        f"{r['decode'] / r['bound']:.2f}x",
    ]
    return "| " + " | ".join(cells) + " |"


def table(rows, leaves) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + [fmt_row(r, leaves) for r in rows])


def split_table(rows: list, splits: dict) -> str:
    """The host's part of a decode-only step, and `route` split in two."""
    base = {r["layout"]: r for r in rows if not r["adapted"]}
    lines = [
        "| layout | server | `route` ms | decode dispatch ms | base's decode "
        "dispatch ms | `bank.indices` ms (apart) | `loraify` / `served` ms (apart) "
        "| arrays into the step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["adapted"]:
            continue
        sp = splits[(r["layout"], r["server"])]
        cells = [
            r["step route"],
            r["decode dispatch"],
            base[r["layout"]]["decode dispatch"],
            sp["indices"],
            sp["loraify"],
        ]
        lines.append(
            f"| {r['layout']} | {r['server']} | "
            + " | ".join(f"{c * 1e3:.2f}" for c in cells)
            + f" | {sp['arrays']} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--passes", type=int, default=None)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg, st = QUICK if args.quick else FULL
    if args.requests:
        st = dataclasses.replace(st, requests=args.requests)
    passes = args.passes or 1
    if args.quick:
        # Only the script's plumbing is under test (toy sizes, meaningless
        # timings): compile faster with XLA's optimisations off.
        jax.config.update("jax_disable_most_optimizations", True)
    t_start = time.perf_counter()

    params = init_params(cfg)
    names = [f"adapter{i:02d}" for i in range(st.adapters)]
    adapters = {
        n: make_adapter(params, adapter_rank(i, cfg), i) for i, n in enumerate(names)
    }
    flat = unscanned_params(params)
    templates = {
        r: lx.init_adapter(
            flat, lx.LoraRule(UNSCANNED, rank=r, alpha=2 * r), key=jr.PRNGKey(0)
        )
        for r in {a.ranks[0] for a in adapters.values()}
    }
    layouts = {
        "scanned": (params, lx.LoraRule(PROJECTIONS, rank=cfg.rank, stack_axes=0)),
        "unscanned": (flat, lx.LoraRule(UNSCANNED, rank=cfg.rank)),
    }
    requests = make_stream(st, cfg.vocab, names)
    plans, deferred = schedule(requests, st.rows, cfg.slots)
    prompts = {}
    for r in requests:
        padded = np.zeros((1, cfg.prompt), np.int32)
        padded[0, : len(r.prompt)] = r.prompt
        prompts[r.id] = jnp.asarray(padded)

    servers, leaves = [], {}
    for layout, (tree, rules) in layouts.items():
        servers.append(Server(layout, "base", cfg, st, tree, prompts))
        for label in PATTERNS:
            bank = lx.AdapterBank(tree, rules, slots=cfg.slots)
            for n, ad in adapters.items():
                if layout == "unscanned":
                    ad = unscanned_adapter(ad, templates[ad.ranks[0]])
                bank.add(n, ad)
            leaves[layout] = len(bank.paths)
            servers.append(Server(layout, label, cfg, st, tree, prompts, bank))
    slot_bytes = servers[1].bank.nbytes / cfg.slots
    embed = params["embed"]
    weight_bytes = nbytes(params) - embed.nbytes + st.rows * embed[0].nbytes
    kv_bytes = nbytes(servers[0].cache)

    tokens = sum(p.tokens for p in plans)
    model = (
        f"Model: {n_params(params) / 1e6:.1f}M parameters (d_model {cfg.d_model}, "
        f"{cfg.layers} layers, {cfg.heads} query / {cfg.kv_heads} KV heads, d_ff "
        f"{cfg.d_ff}, vocab {cfg.vocab}, float32). LoRA on q, k, v, o, gate, up, down "
        f"at rank {cfg.rank} (one adapter in four at rank {cfg.rank // 2}); "
        f"{st.adapters} adapters, a bank of {cfg.slots} slots per adapted server."
    )
    stream = (
        f"Stream: {st.requests} requests (seed {st.seed}), prompts of "
        f"{st.prompt[0]}-{st.prompt[1]} tokens (prefilled one at a time, padded to "
        f"{cfg.prompt}), outputs of {st.output[0]}-{st.output[1]} tokens, Zipf "
        f"{st.zipf} adapter popularity; {st.rows} batch rows. Schedule: "
        f"{len(plans)} steps, {tokens} generated tokens, median "
        f"{statistics.median(p.distinct for p in plans):.0f} distinct adapters per "
        f"step (max {max(p.distinct for p in plans)}), "
        f"{sum(p.distinct == cfg.slots for p in plans)} steps at the slot limit, "
        f"{deferred} admissions deferred by it, "
        f"{sum(not p.admitted for p in plans)} steps without admissions."
    )
    print(model, stream, sep="\n", flush=True)

    # Untimed: the correctness check, which also compiles and warms every program.
    ok, report = check(servers, plans, cfg, st, params, adapters)
    print(report, flush=True)
    bw = bandwidth(st.bw_mib)
    timing = timed_passes(servers, plans, passes)
    rows = summarise(servers, plans, timing, passes, weight_bytes, slot_bytes, bw)
    splits = {
        (s.layout, s.label): routing_split(s, plans)
        for s in servers
        if s.bank is not None
    }
    text_table = table(rows, leaves)
    text_split = split_table(rows, splits)
    notes = [
        f"Memory bandwidth: {bw / 1e9:.1f} GB/s (a jitted sum over {st.bw_mib} "
        f"MiB, median of 15). A decode step must read {weight_bytes / 2**20:.1f} MiB "
        f"of weights (all but the embedding table, and {st.rows} rows of it), plus "
        f"{slot_bytes / 2**20:.2f} MiB per distinct adapter of the step (at the "
        f"bank's capacity rank {cfg.rank}) when adapted; the bound is those bytes / "
        f"the bandwidth. Left out, as base and adapted read it alike: the KV cache "
        f"({kv_bytes / 2**20:.1f} MiB at full length).",
    ]
    for r in rows:
        if r["adapted"]:
            notes.append(
                f"Targets, {r['layout']} {r['server']}: tokens/s {r['ratio']:.2f}x "
                f"base (>= 0.85x): {'met' if r['ratio'] >= 0.85 else 'MISSED'}; "
                f"host {100 * r['host']:.1f}% of the step (<= 5%): "
                f"{'met' if r['host'] <= 0.05 else 'MISSED'}"
            )
    dev = jax.devices()[0]
    head = (
        f"Device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}; "
        f"{passes} timed pass{'es' if passes > 1 else ''} over the schedule, every "
        f"server once per step in a "
        f"fresh random order; tokens/s and `vs base` are medians over passes, per "
        f"step times medians over all timed steps."
    )
    print("\n" + text_table + "\n\n" + text_split + "\n\n" + "\n".join(notes))
    text = [head, "", model, "", stream, "", text_table, "", text_split, ""]
    elapsed = time.perf_counter() - t_start
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join([*text, *notes, "", report]) + "\n")
        print(f"\nwrote {out}")
    print(f"done in {elapsed:.0f} s")
    if not ok:
        raise SystemExit("the continuous-batching server differs from the merged model")


if __name__ == "__main__":
    main()
