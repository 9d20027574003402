"""How the low-rank term `s · (x · A[i]) · B[i]` is computed.

Every rewrite is first brought to one canonical problem:

    x:   (S, G, R, d_in)   S = stack (dot_general batch) groups, G = indexed rows
                           (examples, or tokens with per-token indices), R = tokens
                           that share a row's adapter
    a:   (S, n, d_in, r)   every adapter's A, in-axes flattened
    b:   (S, n, r, d_out)  every adapter's B, out-axes flattened
    ids: (G,)              adapter per row, clipped to [0, n)
    s:   (G,)              that adapter's scale, 0 for base-only rows (-1)

and every strategy returns `(S, G, R, d_out)`. They agree to float tolerance; they
differ in cost:

- `gather`: gathers `A[i]`, `B[i]` once per row. For one adapter per sequence.
- `dense`: `x · A` for every adapter, masked by a one-hot. For few adapters,
  per-token indices and decode.
- `segment`: sorts tokens by adapter, grouped matmul, unsorts (Punica's SGMV).
  For per-token indices and many adapters.

`auto` picks one from the shapes and the backend (`choose`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp

STRATEGIES = ("auto", "gather", "segment", "dense")

_call_strategy: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lorax_arrays_strategy", default=None
)
# Which grouped-matmul kernel `segment` uses: "tiled" (sort, pad each adapter's
# tokens to whole tiles, one small matmul per tile) or "ragged"
# (`jax.lax.ragged_dot`). None = by backend: ragged_dot is slow on CPU.
_segment_kernel: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lorax_arrays_segment_kernel", default=None
)


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}."
        )
    return strategy


@contextlib.contextmanager
def call_strategy(strategy: str | None):
    """Forces `strategy` for every BatchedLoraArray traced inside the block."""
    token = _call_strategy.set(strategy)
    try:
        yield
    finally:
        _call_strategy.reset(token)


@contextlib.contextmanager
def segment_kernel(kernel: str | None):
    if kernel not in (None, "tiled", "ragged"):
        raise ValueError(f"segment kernel must be 'tiled' or 'ragged', got {kernel!r}")
    token = _segment_kernel.set(kernel)
    try:
        yield
    finally:
        _segment_kernel.reset(token)


def resolve(array_strategy: str, shapes: tuple[int, ...]) -> str:
    """The strategy to use: a per-call override, else the array's, else `auto`."""
    strategy = _call_strategy.get() or array_strategy
    return choose(*shapes) if strategy == "auto" else strategy


def choose(s: int, g: int, r_tok: int, d_in: int, d_out: int, n: int, rank: int):
    """`auto`: the cheapest strategy by a rough cost model (flops, plus bytes moved
    weighted by the backend's flops-per-byte)."""
    if g <= 1:
        return "gather"
    per_byte = 4.0 if jax.default_backend() == "cpu" else 64.0
    m = g * r_tok
    width = rank * (d_in + d_out)
    tile = _tile_size(m, n)
    cost = {
        "gather": 2 * m * width + per_byte * 4 * 2 * g * width,
        "dense": 2 * m * n * width + per_byte * 4 * n * width,
        "segment": 2 * (m + n * tile) * width
        + per_byte * 4 * (n * width + 3 * m * (d_in + d_out)),
    }
    return min(cost, key=cost.get)


def low_rank(strategy, x, a, b, ids, s, *, precision=None, pref=None):
    """`s[g] · (x[:, g] · a[:, ids[g]]) · b[:, ids[g]]` for the canonical problem."""
    fn = {"gather": _gather, "dense": _dense, "segment": _segment}[strategy]
    return fn(x, a, b, ids, s, precision, pref)


def _einsum(spec, *ops, precision, pref):
    return jnp.einsum(spec, *ops, precision=precision, preferred_element_type=pref)


def _gather(x, a, b, ids, s, precision, pref):
    a_g = jnp.take(a, ids, axis=1)  # (S, G, d_in, r)
    b_g = jnp.take(b, ids, axis=1)  # (S, G, r, d_out)
    t = _einsum("sgti,sgir->sgtr", x, a_g, precision=precision, pref=pref)
    t = t.astype(x.dtype)
    u = _einsum("sgtr,sgro->sgto", t, b_g, precision=precision, pref=pref)
    return u * s[None, :, None, None].astype(u.dtype)


def _dense(x, a, b, ids, s, precision, pref):
    n = a.shape[1]
    mask = jax.nn.one_hot(ids, n, dtype=x.dtype) * s[:, None].astype(x.dtype)
    t = _einsum("sgti,snir->sgtnr", x, a, precision=precision, pref=pref)
    t = (t * mask[None, :, None, :, None].astype(t.dtype)).astype(x.dtype)
    return _einsum("sgtnr,snro->sgto", t, b, precision=precision, pref=pref)


def _tile_size(m: int, n: int) -> int:
    """Tokens per tile: large enough to be a real matmul, small enough that padding
    each adapter's group to whole tiles (at most n tiles of padding) stays cheap."""
    target = max(1, m // (4 * n))
    return int(min(128, max(8, 2 ** math.floor(math.log2(target)))))


def _segment(x, a, b, ids, s, precision, pref):
    s_, g, r_tok, d_in = x.shape
    n = a.shape[1]
    m = g * r_tok
    tok_ids = jnp.repeat(ids, r_tok, total_repeat_length=m)
    xt = x.reshape(s_, m, d_in)
    order = jnp.argsort(tok_ids, stable=True)
    inverse = jnp.argsort(order)
    counts = jnp.bincount(tok_ids, length=n)
    kernel = _segment_kernel.get()
    if kernel is None:
        kernel = "tiled" if jax.default_backend() == "cpu" else "ragged"
    if kernel == "ragged":
        # ragged_dot has no batching rule over its group axis: loop over the
        # (static, usually single) stack groups instead.
        x_sorted = xt[:, order]
        u = jnp.stack(
            [
                _ragged(x_sorted[j], a[j], b[j], counts, precision, pref)
                for j in range(s_)
            ]
        )
    else:
        u = _tiled(xt, a, b, tok_ids, order, counts, precision, pref)
    u = u[:, inverse]  # back to token order
    u = u.reshape(s_, g, r_tok, -1)
    return u * s[None, :, None, None].astype(u.dtype)


def _ragged(x_sorted, a, b, counts, precision, pref):
    t = jax.lax.ragged_dot(
        x_sorted, a, counts, precision=precision, preferred_element_type=pref
    ).astype(x_sorted.dtype)
    return jax.lax.ragged_dot(
        t, b, counts, precision=precision, preferred_element_type=pref
    )


def _tiled(xt, a, b, tok_ids, order, counts, precision, pref):
    """Grouped matmul without ragged_dot: each adapter's (sorted) tokens are padded
    to whole tiles, each tile gathers its adapter's factors once."""
    s_, m, d_in = xt.shape
    n = a.shape[1]
    tile = _tile_size(m, n)
    n_tiles = -(-m // tile) + n  # every group adds at most one partial tile
    padded = (counts + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(counts) - counts
    sorted_ids = tok_ids[order]
    pos = padded_start[sorted_ids] + jnp.arange(m) - start[sorted_ids]
    tile_ids = jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right")
    tile_ids = jnp.clip(tile_ids, 0, n - 1)
    x_pad = jnp.zeros((s_, n_tiles * tile, d_in), xt.dtype).at[:, pos].set(xt[:, order])
    x_pad = x_pad.reshape(s_, n_tiles, tile, d_in)
    a_t = jnp.take(a, tile_ids, axis=1)  # (S, tiles, d_in, r)
    b_t = jnp.take(b, tile_ids, axis=1)  # (S, tiles, r, d_out)
    t = _einsum("stki,stir->stkr", x_pad, a_t, precision=precision, pref=pref)
    u = _einsum(
        "stkr,stro->stko", t.astype(xt.dtype), b_t, precision=precision, pref=pref
    )
    return u.reshape(s_, n_tiles * tile, -1)[:, pos]  # (S, M, d_out), sorted order
