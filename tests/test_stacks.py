"""Scanned layer stacks: `lax.scan` over stacked BatchedLoraArrays, in unmodified
Equinox (scan over `eqx.filter_vmap`-built layers) and Flax linen (`nn.scan`) code.

The scan rule must slice `w`, `a` and `b` along the layer axis and share the
per-example `indices` (and per-adapter `scale`) between all steps. quax's own rule
slices every leaf: with `B == L` that silently gives example `e`'s adapter choice
to layer `e` instead, so every stack test runs with `B == L` as well as `B != L`.

As in tests/test_models.py, every batched result is compared with each row run
ALONE through the plain model with its adapter merged in (`einsum_merge(base,
stack[i])` from model_helpers, not `lx.merge`; the base model for `-1`); A and B are
random and non-zero, ranks differ, and `assert_adapters_matter` checks that adapters
move the output by far more than the tolerance. Tolerances: forward outputs float32
`rtol = atol = 2e-5` (F32_TOL); gradients `rtol = atol = 1e-4` (sums over rows and
layers of O(1) terms).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax import lax

import lorax_arrays as lx
from tests.fast_init import random_adapters
from tests.helpers import largest_intermediate, walk_eqns
from tests.model_helpers import (
    F32_TOL,
    assert_adapters_matter,
    assert_close,
    einsum_merge,
    per_row_reference,
    vmap_styles,
)

L, D, F = 3, 8, 12  # layers, model width, hidden width
# B != L, and B == L (where slicing the indices along the layer axis goes unseen).
IDX_BY_B = {
    5: np.array([2, 0, -1, 1, 2], np.int32),
    L: np.array([1, -1, 2], np.int32),
}
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


# -- (a) Equinox: scan over layers built with eqx.filter_vmap ------------------------


def make_layer(key):
    """One layer: an MLP with two Linears, weights (F, D) and (D, F)."""
    return eqx.nn.MLP(D, D, F, depth=1, activation=jax.nn.gelu, key=key)


def scan_layers(layers, x):
    """The Equinox scan-over-layers idiom, for one example `x: (D,)`."""
    dynamic, static = eqx.partition(layers, eqx.is_array)

    def step(h, d):
        return h + eqx.combine(d, static)(h), None

    return lax.scan(step, x, dynamic)[0]


def scan_layers_batched(layers, xs):
    """The same, but each layer call handles the whole batch `xs: (B, D)`."""
    dynamic, static = eqx.partition(layers, eqx.is_array)

    def step(h, d):
        return h + jax.vmap(eqx.combine(d, static))(h), None

    return lax.scan(step, xs, dynamic)[0]


def scan_layers_remat(layers, x):
    """Scan over a checkpointed step (`jax.checkpoint` inside the scan body)."""
    dynamic, static = eqx.partition(layers, eqx.is_array)

    @jax.checkpoint
    def step(h, d):
        return h + eqx.combine(d, static)(h), None

    return lax.scan(step, x, dynamic)[0]


EQX_RULE_SETS = [
    [lx.LoraRule("layers/0/weight", 2)],
    [lx.LoraRule(r"layers/\d/weight", 4, alpha=2.0)],
    [lx.LoraRule("layers/1/weight", 8, alpha=16.0, use_rslora=True)],
]


@pytest.fixture(scope="module")
def eqx_stack():
    layers = eqx.filter_vmap(make_layer)(jr.split(jr.key(0), L))
    stack = lx.stack_adapters(random_adapters(layers, EQX_RULE_SETS, seed=1, std=0.3))
    return layers, stack


def test_eqx_stacked_linear_layout_is_inferred(eqx_stack):
    layers, stack = eqx_stack
    # A rule that matches everything adapts exactly the two stacked weights: the
    # stacked biases (L, out) are 2-D but are not matrices.
    got = {m.path: m.layout for m in lx.match_rules(layers, lx.LoraRule(".", 2))}
    assert set(got) == {"layers/0/weight", "layers/1/weight"}
    lay = got["layers/0/weight"]
    assert lay.shape == (L, F, D)
    assert (lay.stack_axes, lay.in_axes, lay.out_axes) == ((0,), (2,), (1,))
    assert stack.ranks == ((2, 4, 0), (0, 4, 8))
    a, b = stack.weights["layers/1/weight"]
    assert a.shape == (L, 3, F, 8) and b.shape == (L, 3, 8, D)


def _eqx_forwards():
    """Each batching style as `f(base, stack, xs, idx)`, jit-compiled once."""

    quaxify_outside_vmap, quaxify_inside_vmap = vmap_styles(scan_layers)

    @eqx.filter_jit
    def batched(served, xs):
        return lx.quaxify(scan_layers_batched)(served, xs)

    @eqx.filter_jit
    def remat(served, xs):
        return lx.quaxify(jax.vmap(scan_layers_remat, in_axes=(None, 0)))(served, xs)

    return {
        "quaxify-outside-vmap": lambda base, st, xs, i: quaxify_outside_vmap(
            lx.loraify(base, st, i), xs
        ),
        "quaxify-inside-vmap": lambda base, st, xs, i: quaxify_inside_vmap(
            lx.loraify(base, st), xs, jnp.asarray(i)
        ),
        "batched-forward": lambda base, st, xs, i: batched(lx.loraify(base, st, i), xs),
        "remat-step": lambda base, st, xs, i: remat(lx.loraify(base, st, i), xs),
    }


_EQX_FORWARDS = _eqx_forwards()
_scan_one = eqx.filter_jit(scan_layers)


@pytest.mark.parametrize("style", list(_EQX_FORWARDS))
@pytest.mark.parametrize("batch", sorted(IDX_BY_B), ids=lambda b: f"B={b}")
def test_eqx_scan_over_layers(eqx_stack, style, batch):
    layers, stack = eqx_stack
    idx = IDX_BY_B[batch]
    xs = jr.normal(jr.key(batch), (batch, D))
    ref = per_row_reference(layers, stack, idx, _scan_one, xs)
    base_out = jax.vmap(scan_layers, in_axes=(None, 0))(layers, xs)
    assert_adapters_matter(ref, base_out, idx, atol=F32_TOL["atol"])
    out = _EQX_FORWARDS[style](layers, stack, xs, idx)
    assert_close(out, ref, **F32_TOL)


def test_eqx_scan_gradients_match_merged_reference(eqx_stack):
    layers, stack = eqx_stack
    # Adapter 2 is not used by any row: its gradient must be exactly zero.
    idx = np.array([0, 1, -1, 1, 0], np.int32)
    xs = jr.normal(jr.key(20), (5, D))
    targets = jr.normal(jr.key(21), (5, D))

    @eqx.filter_jit
    def batched_loss(st):
        out = lx.quaxify(scan_layers_batched)(lx.loraify(layers, st, idx), xs)
        return jnp.sum((out - targets) ** 2)

    def reference_loss(st):
        # Each row alone, through the plain model with its adapter merged in.
        total = 0.0
        for e, i in enumerate(idx.tolist()):
            model = layers if i < 0 else einsum_merge(layers, st[i])
            total = total + jnp.sum((scan_layers(model, xs[e]) - targets[e]) ** 2)
        return total

    grads = eqx.filter_grad(batched_loss)(stack)
    ref = eqx.filter_jit(eqx.filter_grad(reference_loss))(stack)
    for path in stack.paths:
        for got, want in zip(grads.weights[path], ref.weights[path]):
            assert_close(got, want, **GRAD_TOL)
            # The adapter axis sits after the layer axis: (L, n, ...).
            got = np.asarray(got)
            assert np.all(got[:, 2] == 0)
    # Adapter 1 adapts both layers, and rows 1 and 3 use it: non-zero everywhere.
    for path in stack.paths:
        for g in grads.weights[path]:
            assert np.all(np.abs(np.asarray(g)[:, 1]).reshape(L, -1).max(-1) > 1e-3)


# -- (b) Flax linen: nn.scan over a block of nn.Dense ----------------------------------


class DenseBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        y = nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(F, name="up")(h)))
        return h + y, None


class ScannedNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (batch, seq, D)
        blocks = nn.scan(
            DenseBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=L,
        )
        return blocks(name="blocks")(x, None)[0]


def _flax_rules(rank, **kw):
    return [lx.LoraRule("(up|down)/kernel", rank, stack_axes=(0,), **kw)]


FLAX_RULE_SETS = [
    _flax_rules(2),
    [lx.LoraRule("up/kernel", 4, alpha=8.0, stack_axes=(0,))],
    _flax_rules(8, use_rslora=True),
]
T = 4


@pytest.fixture(scope="module")
def flax_stack():
    model = ScannedNet()
    params = model.init(jr.key(0), jnp.ones((1, T, D)))
    stack = lx.stack_adapters(random_adapters(params, FLAX_RULE_SETS, seed=2, std=0.3))
    return model, params, stack


def test_flax_scan_kernels_need_stack_axes(flax_stack):
    _, params, _ = flax_stack
    kernel = params["params"]["blocks"]["up"]["kernel"]
    assert kernel.shape == (L, D, F)
    # Without stack_axes the (L, D, F) kernel has no default layout; the error says
    # what to add.
    with pytest.raises(ValueError) as info:
        lx.match_rules(params, lx.LoraRule("(up|down)/kernel", 2))
    msg = str(info.value)
    assert "params/blocks/down/kernel" in msg or "params/blocks/up/kernel" in msg
    assert "stack_axes=(0,)" in msg and "nn.scan" in msg
    # With it, each layer's (D, F) kernel gets the default (in, out) layout.
    got = {m.path: m.layout for m in lx.match_rules(params, _flax_rules(2))}
    assert set(got) == {"params/blocks/up/kernel", "params/blocks/down/kernel"}
    up = got["params/blocks/up/kernel"]
    assert (up.stack_axes, up.in_axes, up.out_axes) == ((0,), (1,), (2,))
    # A broad pattern with stack_axes trips over the stacked (L, F) bias, and the
    # error names it.
    with pytest.raises(ValueError, match="params/blocks/down/bias"):
        lx.match_rules(params, lx.LoraRule("down", 2, stack_axes=(0,)))


def test_flax_scan_without_stack_axes_fails_at_the_scan(flax_stack):
    # in_axes alone leaves the layer axis among the out axes: a valid layout for a
    # single weight, but lax.scan slices axis 0, and the error says what to fix.
    model, params, _ = flax_stack
    rule = lx.LoraRule("up/kernel", 2, in_axes=(1,))
    (m,) = lx.match_rules(params, rule)
    assert m.layout.out_axes == (0, 2) and m.layout.stack_axes == ()
    served = lx.loraify(
        params,
        random_adapters(params, [rule], seed=3, std=0.3),
        jnp.zeros((2,), jnp.int32),
    )
    with pytest.raises(lx.UnsupportedOperationError, match=r"stack_axes=\(0,\)"):
        lx.quaxify(model.apply)(served, jnp.ones((2, T, D)))


_flax_one = {}


@pytest.mark.parametrize(
    "batch, strategy",
    [(5, "auto"), (L, "auto"), (L, "gather"), (L, "dense"), (L, "segment")],
    ids=lambda v: f"B={v}" if isinstance(v, int) else v,
)
def test_flax_nn_scan(flax_stack, batch, strategy):
    model, params, stack = flax_stack
    idx = IDX_BY_B[batch]
    xs = jr.normal(jr.key(30 + batch), (batch, T, D))
    one = _flax_one.setdefault("one", jax.jit(lambda p, x: model.apply(p, x[None])[0]))
    ref = per_row_reference(params, stack, idx, one, xs)
    assert_adapters_matter(ref, model.apply(params, xs), idx, atol=F32_TOL["atol"])
    forward = jax.jit(lx.quaxify(model.apply, strategy=strategy))
    out = forward(lx.loraify(params, stack, idx), xs)
    assert_close(out, ref, **F32_TOL)


# -- (c) the scanned forward never builds a dense weight per example or adapter -------

# Wider layers, so that one layer's weight (D_J * F_J = 2048; n * 2048 = 6144 is the
# limit below) is well above every legitimate intermediate: activations
# (B * T * F_J = 1280), each layer's gathered factors (B * F_J * R = 1024), the
# stacked factors (L * n * F_J * R = 1536), and the `segment` strategy's token
# buffer padded to whole tiles per adapter ((B * T + n * tile) * F_J <= 3072).
L_J, D_J, F_J, B_J, T_J, N_J, R_J = 2, 32, 64, 4, 5, 3, 4


def _jaxpr_setup():
    layers = eqx.filter_vmap(
        lambda k: eqx.nn.MLP(D_J, D_J, F_J, depth=1, activation=jax.nn.gelu, key=k)
    )(jr.split(jr.key(0), L_J))
    rule_sets = [[lx.LoraRule(r"layers/\d/weight", r)] for r in (2, R_J, R_J)]
    stack = lx.stack_adapters(random_adapters(layers, rule_sets, seed=4))
    assert stack.n_adapters == N_J
    return layers, stack, jnp.array([0, 2, -1, 1], jnp.int32)


def _limit(stack_size: int) -> int:
    """Smallest size that a per-example or per-adapter dense copy would have.

    Stated in the issue as `n_adapters * |W|` or `B * |W|` with |W| the full
    stacked weight; we check the stricter per-layer bound (`|W| / L`), which a
    dense weight built inside the scan body (one layer at a time) also reaches.
    """
    return min(N_J, B_J) * stack_size // L_J


def _biggest(jaxpr):
    sizes = [
        (int(np.prod(v.aval.shape, dtype=np.int64)), e.primitive.name)
        for e in walk_eqns(jaxpr)
        for v in e.outvars
        if hasattr(v.aval, "shape")
    ]
    return max(sizes)


def _outer_scans(jaxpr):
    """The scans of a jaxpr that are not inside another scan (through pjit etc.)."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        else:
            for sub in jex_core.jaxprs_in_params(eqn.params):
                yield from _outer_scans(sub)


def _check_low_rank(jaxpr, weight_size):
    prims = [e.primitive.name for e in walk_eqns(jaxpr)]
    # Scanned over the layers, not unrolled, and the low-rank products happen inside
    # that scan (the `segment` strategy has scans of its own, inside it).
    (scan,) = _outer_scans(jaxpr)
    assert scan.params["length"] == L_J
    in_body = [e.primitive.name for e in walk_eqns(scan.params["jaxpr"])]
    # Every product is inside the scan: at least the base product and the low-rank
    # term for each of the two Linears.
    assert in_body.count("dot_general") == prims.count("dot_general") >= 4
    size, prim = _biggest(jaxpr)
    assert largest_intermediate(jaxpr) == size
    assert size < _limit(weight_size), (size, prim, _limit(weight_size))


@pytest.mark.parametrize("strategy", ["auto", "gather", "dense", "segment"])
def test_jaxpr_eqx_scan_stays_low_rank(strategy):
    layers, stack, idx = _jaxpr_setup()
    served = lx.loraify(layers, stack, idx)
    weight_size = L_J * D_J * F_J  # each stacked Linear weight
    assert layers.layers[0].weight.size == weight_size
    xs = jnp.ones((B_J, T_J, D_J))

    def per_example(m, x):  # x: (T, D); the layer is vmapped over tokens
        dynamic, static = eqx.partition(m, eqx.is_array)

        def step(h, d):
            return jax.vmap(eqx.combine(d, static))(h), None

        return lax.scan(step, x, dynamic)[0]

    fwd = lx.quaxify(jax.vmap(per_example, in_axes=(None, 0)), strategy=strategy)
    _check_low_rank(eqx.filter_make_jaxpr(fwd)(served, xs)[0], weight_size)
    # Training: the gradient w.r.t. the adapters stays low rank as well. The forward
    # scan now also returns its residuals stacked over the layers, so the bound is
    # the issue's own, over the whole stack: below min(n, B) * |W|.
    trainable, frozen = eqx.partition(served, lx.adapter_mask(served))

    def loss(t):
        return jnp.sum(fwd(eqx.combine(t, frozen), xs) ** 2)

    grad_jaxpr = eqx.filter_make_jaxpr(eqx.filter_grad(loss))(trainable)[0]
    size, prim = _biggest(grad_jaxpr)
    assert size < min(N_J, B_J) * weight_size, (size, prim)


class WideBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.Dense(D_J)(jax.nn.gelu(nn.Dense(F_J)(h))), None


class WideScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            WideBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=L_J,
        )
        return blocks()(x, None)[0]


def test_jaxpr_flax_scan_stays_low_rank():
    model = WideScanned()
    xs = jnp.ones((B_J, T_J, D_J))
    params = model.init(jr.key(0), xs)
    rule_sets = [[lx.LoraRule("kernel", r, stack_axes=(0,))] for r in (2, R_J, R_J)]
    stack = lx.stack_adapters(random_adapters(params, rule_sets, seed=5))
    served = lx.loraify(params, stack, jnp.array([0, 2, -1, 1], jnp.int32))
    weight_size = L_J * D_J * F_J
    jaxpr = jax.make_jaxpr(lx.quaxify(model.apply))(served, xs)
    _check_low_rank(jaxpr, weight_size)


def test_jaxpr_check_flags_a_dense_weight_per_example():
    # The same scan with the per-example weight built explicitly inside the body
    # (what a missing rule would do): the walker finds it inside the scan.
    layers, stack, idx = _jaxpr_setup()
    weight_size = L_J * D_J * F_J
    a, b = stack.weights["layers/0/weight"]  # (L, n, D, r), (L, n, r, F)
    scale = stack.scales["layers/0/weight"]
    w = layers.layers[0].weight  # (L, F, D)

    def dense_forward(xs):
        def step(h, layer):
            w_l, a_l, b_l = layer
            delta = jnp.einsum("bdr,brf->bfd", a_l[idx], b_l[idx])  # (B, F, D)
            w_e = w_l + scale[idx][:, None, None] * delta
            return jnp.einsum("btd,bfd->btf", h, w_e)[..., :D_J], None

        return lax.scan(step, xs, (w, a, b))[0]

    jaxpr = jax.make_jaxpr(dense_forward)(jnp.ones((B_J, T_J, D_J)))
    top_level = max(
        int(np.prod(v.aval.shape)) for e in jaxpr.jaxpr.eqns for v in e.outvars
    )
    assert top_level < _limit(weight_size)  # nothing big outside the scan ...
    size, _ = _biggest(jaxpr)
    assert size == B_J * weight_size // L_J >= _limit(weight_size)  # ... but inside
    with pytest.raises(AssertionError):
        _check_low_rank(jaxpr, weight_size)
