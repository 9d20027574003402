"""Fused kernels: a stack axis that passes through `dot_general` as a free axis.

Gemma's `qkv_einsum` weight is `(3, N, D, H)`, used as
`einsum("BTD,SNDH->SBTNH", x, w)`: the leading axis is a `stack_axes` entry (0 = q,
1 = k, 2 = v) that the product keeps as an output axis. Each entry is its own
weight with its own adapters: output entry `s` is `x · w[s] + s_i · (x · A[s, i]) ·
B[s, i]`. Checked against the float64 NumPy reference of tests/helpers.py on random
layouts (any position of the free stack axes in W and in the output, with true
batch stack axes, multi-axis groups, every index shape, `batch_axis`, every
strategy, the out-axis reading), gradients against a dense per-example JAX loss,
and a Gemma-style attention block (MHA `qkv_einsum`, GQA `q_einsum` +
`kv_einsum`, a scanned layer stack) against the same block with every adapter
merged in NumPy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from lorax_arrays._rules.strategies import segment_kernel
from tests.fast_init import random_adapters
from tests.helpers import (
    STRATEGY_VARIANTS,
    DotCase,
    check_dot,
    dense_weight_per_example,
    dot_fn,
    draw_axes,
    largest_intermediate,
    make_lora,
    random_indices,
    random_lora,
)
from tests.model_helpers import (
    causal_attention,
    gemma_attention,
    gemma_stack,
    weight_delta,
)


@st.composite
def fused_dot_cases(draw, idx_ndims=(0, 1, 2)):
    """`dot_cases` (tests/helpers.py) with at least one stack axis, each
    stack axis either a batch axis of the product or free (at least one free):
    free stack axes are W free axes, so they land among W's out-axes in the output,
    wherever they sit in W."""
    ndim = draw(st.integers(3, 5))
    extra = draw(
        st.lists(
            st.sampled_from(["in", "out", "stack"]),
            min_size=ndim - 3,
            max_size=ndim - 3,
        )
    )
    roles = draw(st.permutations(["in", "out", "stack", *extra]))
    w_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim)))
    in_axes, out_axes, stack_axes = draw_axes(draw, roles)
    stack = [ax % ndim for ax in stack_axes]
    free = draw(st.lists(st.booleans(), min_size=len(stack), max_size=len(stack)))
    if not any(free):
        free[draw(st.integers(0, len(stack) - 1))] = True
    batch = [ax for ax, f in zip(stack, free) if not f]
    # A free stack axis of size 1 would not show a mix-up of entries.
    w_shape = tuple(
        max(2, size) if ax in stack and ax not in batch else size
        for ax, size in enumerate(w_shape)
    )
    n_adapters = draw(st.integers(1, 4))
    rank = draw(st.integers(1, 4))
    k = draw(st.sampled_from(idx_ndims))
    idx_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=k, max_size=k)))
    x_extra = draw(st.lists(st.integers(1, 3), min_size=0, max_size=1))

    tokens = [("c", ax % ndim) for ax in in_axes]
    tokens += [("b", ax) for ax in batch]
    tokens += [("f", None)] * (k + len(x_extra))
    tokens = draw(st.permutations(tokens))
    free_sizes = iter(idx_shape + tuple(x_extra))
    x_shape, x_pos = [], {}
    for pos, (kind, w_ax) in enumerate(tokens):
        if kind == "f":
            x_shape.append(next(free_sizes))
        else:
            x_shape.append(w_shape[w_ax])
            x_pos[w_ax] = pos
    c_w = draw(st.permutations([ax % ndim for ax in in_axes]))
    b_w = draw(st.permutations(batch))
    c_x = tuple(x_pos[ax] for ax in c_w)
    b_x = tuple(x_pos[ax] for ax in b_w)
    lora_is_lhs = draw(st.booleans())
    if lora_is_lhs:
        dn = ((tuple(c_w), c_x), (tuple(b_w), b_x))
    else:
        dn = ((c_x, tuple(c_w)), (b_x, tuple(b_w)))
    return DotCase(
        w_shape=w_shape,
        in_axes=in_axes,
        out_axes=out_axes,
        stack_axes=stack_axes,
        n_adapters=n_adapters,
        rank=rank,
        idx_shape=idx_shape,
        x_shape=tuple(x_shape),
        dimension_numbers=dn,
        lora_is_lhs=lora_is_lhs,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(fused_dot_cases())
def test_free_stack_axes_match_reference(case: DotCase):
    w, a, b, scale, idx, x = case.arrays()
    lora = case.lora(w, a, b, scale, idx)
    out = jax.jit(lx.quaxify(dot_fn(case)))(lora, x)
    case.check(x, w, a, b, scale, idx, out)


@given(fused_dot_cases(idx_ndims=(1, 2)), st.sampled_from(STRATEGY_VARIANTS))
def test_free_stack_axes_every_strategy(case: DotCase, variant: str):
    w, a, b, scale, idx, x = case.arrays()
    lora = case.lora(w, a, b, scale, idx)
    strategy, _, kernel = variant.partition(":")
    with segment_kernel(kernel or None):
        out = jax.jit(lx.quaxify(dot_fn(case), strategy=strategy))(lora, x)
    case.check(x, w, a, b, scale, idx, out)


@given(fused_dot_cases(idx_ndims=(1, 2)), st.data())
def test_free_stack_axes_with_batch_axis(case: DotCase, data):
    """The indexed axes anywhere among x's free axes, said by `batch_axis` (from
    the front or the back): the free stack axes are W's, so they never move the
    indices."""
    (c_l, c_r), (b_l, b_r) = case.dimension_numbers
    c_x, b_x = (c_r, b_r) if case.lora_is_lhs else (c_l, b_l)
    free = [d for d in range(len(case.x_shape)) if d not in c_x and d not in b_x]
    k = len(case.idx_shape)
    sizes = [case.x_shape[d] for d in free]
    extra = sizes[k:]
    start = data.draw(st.integers(0, len(extra)))
    sizes = extra[:start] + sizes[:k] + extra[start:]
    x_shape = list(case.x_shape)
    for d, size in zip(free, sizes):
        x_shape[d] = size
    batch_axis = data.draw(st.sampled_from([start, start + k - len(free) - 1]))
    case = dataclasses.replace(case, x_shape=tuple(x_shape))
    w, a, b, scale, idx, x = case.arrays()
    lora = case.lora(w, a, b, scale, idx, batch_axis=batch_axis)
    out = jax.jit(lx.quaxify(dot_fn(case)))(lora, x)
    check_dot(
        x,
        w,
        a,
        b,
        scale,
        idx,
        case.in_axes,
        case.out_axes,
        case.stack_axes,
        case.dimension_numbers,
        case.lora_is_lhs,
        out,
        start=start,
    )


@given(fused_dot_cases())
def test_free_stack_axes_out_axis_contraction(case: DotCase):
    """The same products with in and out exchanged: the contraction reads the
    array's out-axes (a tied head, `swap_in_out`), free stack axes and all."""
    rng = np.random.default_rng(case.seed)
    w, a, b, scale = random_lora(
        rng,
        case.w_shape,
        case.out_axes,
        case.in_axes,
        case.stack_axes,
        n_adapters=case.n_adapters,
        rank=case.rank,
    )
    idx = random_indices(rng, case.idx_shape, case.n_adapters)
    x = rng.standard_normal(case.x_shape).astype(np.float32)
    lora = lx.BatchedLoraArray(
        jnp.asarray(w),
        a,
        b,
        scale=scale,
        indices=idx,
        in_axes=case.out_axes,
        out_axes=case.in_axes,
        stack_axes=case.stack_axes,
    )
    out = jax.jit(lx.quaxify(dot_fn(case)))(lora, x)
    check_dot(
        x,
        w,
        a,
        b,
        scale,
        idx,
        case.out_axes,
        case.in_axes,
        case.stack_axes,
        case.dimension_numbers,
        case.lora_is_lhs,
        out,
    )


# -- explicit Gemma shapes -------------------------------------------------------

B, T, D, N, K, H = 2, 3, 8, 4, 2, 3


def _qkv_lora(idx, stack_shape=(3,), seed=0, n=3, rank=2):
    """A `(*stack, N, D, H)` kernel (the last stack axis: q, k, v)."""
    ns = len(stack_shape)
    shape = (*stack_shape, N, D, H)
    in_axes, out_axes = (ns + 1,), (ns, ns + 2)
    stack_axes = tuple(range(ns))
    lora, (w, a, b, scale) = make_lora(
        shape, in_axes, out_axes, stack_axes, n=n, rank=rank, indices=idx, seed=seed
    )
    return lora, (w, a, b, scale, in_axes, out_axes, stack_axes)


@pytest.mark.parametrize(
    "spec, idx_shape",
    [
        ("BTD,SNDH->SBTNH", (B,)),  # Gemma
        ("BTD,SNDH->SBTNH", (B, T)),
        ("BTD,SNDH->BTSNH", (B, T)),
        ("BTD,SNDH->BTNHS", (B,)),
        ("SNDH,BTD->NBSTH", (B, T)),
        ("BTD,SNDH->TSHBN", (B,)),
    ],
)
def test_einsum_free_stack_anywhere_in_the_output(spec, idx_shape):
    rng = np.random.default_rng(1)
    idx = random_indices(rng, idx_shape, 3)
    lora, (w, a, b, scale, ins, outs, stack) = _qkv_lora(idx)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    w_first = spec.startswith("S")
    f = (
        (lambda W, x: jnp.einsum(spec, W, x))
        if w_first
        else (lambda W, x: jnp.einsum(spec, x, W))
    )
    out = jax.jit(lx.quaxify(f))(lora, x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, ins, outs, stack)
    # Per example (or token): einsum with that row's weight.
    lhs, out_spec = spec.split("->")
    ex = "bt"[: len(idx_shape)]
    x_spec, w_spec = lhs.split(",")[::-1] if w_first else lhs.split(",")
    ref = np.einsum(
        f"{x_spec},{ex.upper()}{w_spec}->{out_spec}",
        x.astype(np.float64),
        w_e,
    )
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # Entry s is adapted by A[s], B[s]: permuting the entries changes the output.
    wrong = lora.replace(a=lora.a[::-1], b=lora.b[::-1])
    assert np.abs(lx.quaxify(f)(wrong, x) - ref).max() > 1e-2


def test_layer_stack_scanned_with_entries_passing_through():
    """`(L, 3, N, D, H)`: scanned over L (a stack axis consumed by the scan), the
    entry axis a free axis of each step's einsum; per-token indices."""
    rng = np.random.default_rng(2)
    n_layers = 2
    idx = random_indices(rng, (B, T), 3)
    lora, (w, a, b, scale, ins, outs, stack) = _qkv_lora(idx, (n_layers, 3))
    x = rng.standard_normal((B, T, D)).astype(np.float32)

    def f(W, x):
        step = lambda c, wl: (c, jnp.einsum("BTD,SNDH->SBTNH", x, wl))  # noqa: E731
        return jax.lax.scan(step, 0.0, W)[1]

    out = jax.jit(lx.quaxify(f))(lora, x)
    w_e = dense_weight_per_example(w, a, b, scale, idx, ins, outs, stack)
    ref = np.einsum("BTD,BTLSNDH->LSBTNH", x.astype(np.float64), w_e)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # Without the scan: the layer axis free as well (two free stack axes), or a
    # batch axis of the product (x broadcast over the layers).
    both_free = lambda W, x: jnp.einsum("BTD,LSNDH->LSBTNH", x, W)  # noqa: E731
    out2 = jax.jit(lx.quaxify(both_free))(lora, x)
    np.testing.assert_allclose(out2, ref, rtol=1e-4, atol=1e-4)
    x_l = np.broadcast_to(x, (n_layers, *x.shape))
    batched = lambda W, x: jnp.einsum("LBTD,LSNDH->SLBTNH", x, W)  # noqa: E731
    out3 = jax.jit(lx.quaxify(batched))(lora, x_l)
    np.testing.assert_allclose(out3, np.swapaxes(ref, 0, 1), rtol=1e-4, atol=1e-4)


def test_no_per_example_weight_is_built():
    rng = np.random.default_rng(3)
    idx = random_indices(rng, (B,), 3)
    lora, _ = _qkv_lora(idx)
    x = jnp.ones((B, T, D))
    f = lambda W, x: jnp.einsum("BTD,SNDH->SBTNH", x, W)  # noqa: E731
    jaxpr = jax.make_jaxpr(lx.quaxify(f))(lora, x)
    # The largest values are the output (3·B·T·N·H) and the base weight.
    assert largest_intermediate(jaxpr) <= max(lora.w.size, 3 * B * T * N * H)


def test_strategies_report_the_entries_as_stack_groups():
    """`explain_strategies` shows S = 3 (the entries) for the fused product."""
    idx = np.array([0, 2], np.int32)
    lora, _ = _qkv_lora(idx)
    f = lambda W, x: jnp.einsum("BTD,SNDH->SBTNH", x, W)  # noqa: E731
    (choice,) = lx.explain_strategies(f, lora, jnp.ones((B, T, D)))
    assert choice.shapes["S"] == 3 and choice.shapes["G"] == B


def test_gradients_wrt_a_and_b():
    """Gradients through the fused product equal those of a dense per-example
    JAX loss; the base weight gets none."""
    rng = np.random.default_rng(4)
    idx = np.array([[0, 2, -1], [1, 1, 0]], np.int32)
    lora, (w, a, b, scale, ins, outs, stack) = _qkv_lora(idx)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    spec = "BTD,SNDH->SBTNH"

    def loss(w, a, b):
        arr = lora.replace(w=w, a=a, b=b)
        return jnp.sum(jnp.sin(lx.quaxify(lambda W: jnp.einsum(spec, x, W))(arr)))

    def ref_loss(a, b):
        safe = jnp.maximum(idx, 0)
        s = jnp.where(idx >= 0, jnp.asarray(scale)[safe], 0.0)
        a_t = a[:, safe]  # (3, B, T, D, r)
        b_t = b[:, safe]  # (3, B, T, r, N, H)
        delta = jnp.einsum("sbtdr,sbtrnh->btsndh", a_t, b_t)
        w_e = jnp.asarray(w) + s[..., None, None, None, None] * delta
        return jnp.sum(jnp.sin(jnp.einsum("btd,btsndh->sbtnh", x, w_e)))

    args = tuple(jnp.asarray(v) for v in (w, a, b))
    g_w, g_a, g_b = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    r_a, r_b = jax.grad(ref_loss, argnums=(0, 1))(*args[1:])
    np.testing.assert_array_equal(np.asarray(g_w), 0)
    for got, ref in [(g_a, r_a), (g_b, r_b)]:
        ref = np.asarray(ref)
        assert np.abs(ref).max() > 0
        np.testing.assert_allclose(
            np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()
        )


# -- a Gemma-style attention block -------------------------------------------------


def _numpy_attention(p, x, per_token):
    """float64 NumPy; `per_token(name)` gives each token's weight `(B, T, *w)`."""
    x = np.asarray(x, np.float64)
    if "qkv_einsum" in p:
        q, k, v = np.einsum("BTD,BTSNDH->SBTNH", x, per_token("qkv_einsum"))
    else:
        q = np.einsum("BTD,BTNDH->BTNH", x, per_token("q_einsum"))
        k, v = np.einsum("BTD,BTCKDH->CBTKH", x, per_token("kv_einsum"))
    enc = causal_attention(q, k, v, np)
    return x + np.einsum("BTNH,BTNHD->BTD", enc, per_token("attn_vec_einsum"))


LAYOUTS = {  # (in_axes, out_axes, stack_axes) of one layer's weight
    "qkv_einsum": ((2,), (1, 3), (0,)),
    "q_einsum": ((1,), (0, 2), ()),
    "kv_einsum": ((2,), (1, 3), (0,)),
    "attn_vec_einsum": ((0, 1), (2,), ()),
}
SHAPES = {
    "qkv_einsum": (3, N, D, H),
    "q_einsum": (N, D, H),
    "kv_einsum": (2, K, D, H),
    "attn_vec_einsum": (N, H, D),
}


def _rules(names, rank, alpha, n_layers):
    shift = 0 if n_layers is None else 1
    up = lambda axes: tuple(ax + shift for ax in axes)  # noqa: E731
    rules = []
    for name in names:
        ins, outs, stack = LAYOUTS[name]
        stack = ((0,) if shift else ()) + up(stack)
        rules.append(
            lx.LoraRule(
                name, rank, alpha, in_axes=up(ins), out_axes=up(outs), stack_axes=stack
            )
        )
    return rules


def _merged_per_token(params, adapters, idx, n_layers):
    """`name -> (per layer) (B, T, *w)`: each token's weight with its adapter
    merged in float64 NumPy (`w + alpha / r · a ⊗ b`, by one einsum per leaf)."""
    merged = []  # per adapter: name -> merged weight
    for ad in adapters:
        m = {}
        for lay, r, alpha in zip(ad.layouts, ad.ranks, ad.alphas):
            name = lay.path.split("/")[0]
            a, b = (np.asarray(v, np.float64) for v in ad.weights[lay.path])
            w = np.asarray(params[name]["w"], np.float64)
            m[name] = w + alpha / r * weight_delta(a, b, lay)
        merged.append(m)

    def per_token(name, layer):
        out = np.empty((*idx.shape, *SHAPES[name]))
        for e in np.ndindex(*idx.shape):
            i = int(idx[e])
            w = params[name]["w"] if i < 0 or name not in merged[i] else merged[i][name]
            w = np.asarray(w, np.float64)
            out[e] = w if layer is None else w[layer]
        return out

    return per_token


def _reference(params, adapters, idx, x, n_layers):
    idx = np.broadcast_to(np.asarray(idx)[:, None] if idx.ndim == 1 else idx, (B, T))
    per_token = _merged_per_token(params, adapters, idx, n_layers)
    if n_layers is None:
        return _numpy_attention(params, x, lambda n: per_token(n, None))
    h = np.asarray(x, np.float64)
    for layer in range(n_layers):
        h = _numpy_attention(params, h, lambda n, j=layer: per_token(n, j))
    return h


@pytest.mark.parametrize(
    "kind, n_layers, idx_shape, strategy",
    [
        ("mha", None, (B,), "auto"),
        ("gqa", None, (B, T), "segment"),
        ("mha", 2, (B, T), "dense"),
        ("gqa", 2, (B,), "gather"),
    ],
)
def test_gemma_attention_with_per_projection_adapters(
    kind, n_layers, idx_shape, strategy
):
    """Three adapters with their own ranks and alphas; one adapts only the fused
    kernel (so the output projection sees base rows), one everything."""
    rng = np.random.default_rng(5)
    fused = ["qkv_einsum"] if kind == "mha" else ["q_einsum", "kv_einsum"]
    names = [*fused, "attn_vec_einsum"]
    lead = () if n_layers is None else (n_layers,)
    params = {
        n: {"w": jnp.asarray(rng.standard_normal((*lead, *SHAPES[n])) * 0.4)}
        for n in names
    }
    params = jax.tree.map(lambda v: v.astype(jnp.float32), params)
    rule_sets = [
        _rules(names, 2, 4.0, n_layers),
        _rules(fused, 3, 1.5, n_layers),
        _rules(names, 1, 1.0, n_layers),
    ]
    adapters = random_adapters(params, rule_sets, seed=6, std=0.4)
    stack = lx.stack_adapters(adapters)
    idx = random_indices(rng, idx_shape, 3)
    idx.flat[:3] = [0, 1, 2]  # every adapter is used
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    model = gemma_attention if n_layers is None else gemma_stack
    served = lx.loraify(params, stack, jnp.asarray(idx))
    out = jax.jit(lx.quaxify(model, strategy=strategy))(served, x)
    ref = _reference(params, adapters, idx, x, n_layers)
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)
    base = _reference(params, adapters, np.full_like(idx, -1), x, n_layers)
    assert np.abs(ref - base).max() > 1e-2  # the adapters matter
    # Every entry of the fused kernel carries its own adapter: reversing the
    # entries changes the output.
    for name in ("qkv_einsum", "kv_einsum"):
        if name not in served:
            continue
        arr = served[name]["w"]
        e = 0 if n_layers is None else 1  # the entry axis of the factors
        flipped = arr.replace(a=jnp.flip(arr.a, e), b=jnp.flip(arr.b, e))
        changed = jax.jit(lx.quaxify(model))({**served, name: {"w": flipped}}, x)
        assert np.abs(np.asarray(changed) - ref).max() > 1e-3, name
