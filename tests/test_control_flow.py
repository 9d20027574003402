"""Higher-order primitives keep the low-rank form: jit, scan (closed-over weights and
scanned layer stacks), fori/while loops, cond/switch, checkpoint/remat, custom_jvp
activations, user custom_vjp functions, `jax.nn.dot_product_attention`, and one
layer of a stack picked by a traced index (`W[i]`, `jnp.take`) inside `fori_loop`.

Every case runs an *unmodified* function of raw parameters under `lx.quaxify` with
BatchedLoraArray leaves and per-example indices (base-only rows and repeated
adapters in every batch; random non-zero A and B), and compares

- the output with running each example alone through the plain function with its
  merged weight `W_e` (tests/dense_reference.py; `W_e` agrees with the float64
  NumPy construction of tests/helpers.py), after checking that the adapters change
  the output by far more than the tolerance;
- the gradients w.r.t. every weight's `a` and `b` with `jax.grad` of the plain
  per-example function of `W_e(a, b)` (`jax.jacfwd` for `while_loop`, which has no
  reverse-mode derivative in JAX itself).
"""

from __future__ import annotations

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lorax_arrays as lx
from tests.dense_reference import (
    TOL,
    Adapted,
    Checker,
    check_against_reference,
    per_example,
    random_like,
    vmap_outside,
)
from tests.helpers import largest_intermediate, walk_eqns
from tests.model_helpers import assert_close

B, T, D, H, L = 5, 3, 4, 6, 4
IDX = np.array([2, 0, -1, 1, 2], np.int32)  # base-only row, repeated adapter
IDX_L = np.array([2, 0, -1, 2], np.int32)  # B == L: a sliced index would go unseen
IDX_BT = np.array([[0, 1, -1], [2, 2, 0], [-1, -1, 1], [1, 0, 2], [0, -1, 2]], np.int32)

_rng = np.random.default_rng(0)
W1 = Adapted.random(_rng, (D, H), (0,), (1,))  # used as `x @ W1`
W2 = Adapted.random(_rng, (D, H), (1,), (0,))  # (out, in): used as `h @ W2.T`
WH = Adapted.random(_rng, (H, H), (0,), (1,))
STACK = Adapted.random(_rng, (L, D, D), (1,), (2,), (0,))  # a layer stack
STACK_MIDDLE = Adapted.random(_rng, (D, L, D), (0,), (2,), (1,))  # stack axis 1
WEIGHTS = {"w1": W1, "w2": W2}
X = jnp.asarray(_rng.standard_normal((B, D)), jnp.float32)
XT = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)


def test_dense_references_agree():
    # The references here build W_e in plain JAX (to differentiate it); check it
    # against tests/helpers.py's float64 NumPy construction.
    for wt, idx in [(W2, IDX), (STACK, IDX_BT)]:
        dense = wt.dense_jax(idx, jnp.asarray(wt.a), jnp.asarray(wt.b))
        np.testing.assert_allclose(dense, wt.dense_np(idx), rtol=1e-5, atol=1e-6)
        assert not np.allclose(dense[idx >= 0], wt.w, atol=0.1)


def mlp(p, x, act=jnp.tanh):
    return act(x @ p["w1"]) @ p["w2"].T


# -- jit ----------------------------------------------------------------------------


def _jit_inside(p, x):
    return jax.jit(mlp)(p, x)


def _jit_inside_closure(p, x):
    # The adapted weights are closed over by the inner jit, not passed to it.
    return jax.jit(lambda h: mlp(p, h))(x)


@pytest.mark.parametrize("f", [_jit_inside, _jit_inside_closure])
def test_jit_inside_quaxify(f):
    check_against_reference(f, WEIGHTS, X, IDX)


def test_jit_inside_eager_quaxify_and_jit_of_quaxify():
    lp = {k: wt.lora(IDX) for k, wt in WEIGHTS.items()}
    eager = lx.quaxify(_jit_inside)(lp, X)  # no outer jit: the inner one is all
    compiled = jax.jit(lx.quaxify(mlp))(lp, X)
    ref = check_against_reference(mlp, WEIGHTS, X, IDX)
    assert_close(eager, ref, **TOL)
    assert_close(compiled, ref, **TOL)


# -- scan ---------------------------------------------------------------------------


def _rnn(p, x):
    """An RNN over time: every weight closed over by the scan body."""

    def step(h, xt):
        h = jnp.tanh(xt @ p["w1"] + h @ p["wh"])
        return h, h @ p["w2"].T

    h0 = jnp.zeros((x.shape[0], H), x.dtype)
    _, ys = lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


def test_scan_closed_over_weights():
    weights = {"w1": W1, "wh": WH, "w2": W2}
    check_against_reference(_rnn, weights, XT, IDX)


def _layers(p, x, reverse=False, unroll=1):
    """A layer stack scanned over: the stacked weight is the scan's `xs`, next to a
    plain stacked array; each layer's output is also returned as `ys`."""
    bias = jnp.linspace(-0.5, 0.5, L * D).reshape(L, D)

    def layer(h, xs):
        w, b_l = xs
        h = jnp.tanh(h @ w + b_l)
        return h, h.sum(-1)

    h, ys = lax.scan(layer, x, (p["stack"], bias), reverse=reverse, unroll=unroll)
    return jnp.concatenate([h, jnp.moveaxis(ys, 0, -1)], axis=-1)


@pytest.mark.parametrize(
    "idx",
    [IDX, IDX_L, IDX_BT],
    ids=["B!=L", "B==L", "per-token"],
)
def test_scan_over_layer_stack(idx):
    # B == L: slicing the indices along the scanned axis would not fail on shapes,
    # but would give every example the adapter of the current layer's number.
    x = jnp.asarray(np.random.default_rng(1).standard_normal((*idx.shape, D)))
    check_against_reference(_layers, {"stack": STACK}, x.astype(jnp.float32), idx)


def _layers_per_example(p, x):
    """An Equinox-style model written for one example (`h: (D,)`), batched by
    `jax.vmap`."""

    def one(h):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"])[0]

    return jax.vmap(one)(x)


@pytest.mark.parametrize(
    "transform",
    [lx.quaxify, vmap_outside],
    ids=["quaxify(vmap)", "vmap(quaxify) with_indices"],
)
def test_scan_over_layer_stack_under_vmap(transform):
    check_against_reference(
        _layers_per_example, {"stack": STACK}, X, IDX, transform=transform
    )


def test_scan_over_layer_stack_reversed_and_unrolled():
    f = ft.partial(_layers, reverse=True, unroll=2)
    check_against_reference(f, {"stack": STACK}, X, IDX)


def test_scan_over_unstacked_weight_is_an_error():
    def f(p, x):
        return lax.scan(lambda h, row: (h * row.sum(), None), x, p["w1"])[0]

    with pytest.raises(lx.UnsupportedOperationError, match="stack_axes"):
        lx.quaxify(f)({"w1": W1.lora(IDX)}, X)


# -- loops --------------------------------------------------------------------------


def _fori_static(p, x):
    return lax.fori_loop(
        0, 3, lambda i, h: jnp.tanh(h @ p["wh"]) + x @ p["w1"], x @ p["w1"]
    )


def test_fori_loop_static_bounds():
    # Static bounds: fori_loop lowers to scan, so reverse mode works.
    check_against_reference(_fori_static, {"w1": W1, "wh": WH}, X, IDX)


def _fori_over_layers(p, x):
    # One layer per step, picked with a traced index: a dynamic slice of the stack
    # axis, then a squeeze.
    return lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ p["stack"][i]), x)


def _fori_over_layers_middle_axis(p, x):
    def body(i, h):
        return jnp.tanh(h @ lax.dynamic_index_in_dim(p["stack"], i, 1, False))

    return lax.fori_loop(0, L, body, x)


def _fori_over_layers_take(p, x):
    # `jnp.take` with a scalar index is a gather, not a dynamic slice.
    return lax.fori_loop(0, L, lambda i, h: jnp.tanh(h @ jnp.take(p["stack"], i, 0)), x)


@pytest.mark.parametrize(
    "f, weights",
    [
        (_fori_over_layers, {"stack": STACK}),
        (_fori_over_layers_middle_axis, {"stack": STACK_MIDDLE}),
        (_fori_over_layers_take, {"stack": STACK}),
    ],
    ids=["stack[i]", "dynamic_index_in_dim(stack, i, axis=1)", "take(stack, i)"],
)
def test_fori_loop_over_layer_stack(f, weights):
    check_against_reference(f, weights, X, IDX)


def test_dynamic_slice_of_a_weight_block():
    # `(W + AB)[:, i:i+3]` at a traced offset, clamped like lax.dynamic_slice.
    def f(p, x, i):
        return jnp.tanh(x @ lax.dynamic_slice(p["w1"], (0, i), (D, 3)))

    check = Checker(f, {"w1": W1})
    outs = [check(X, IDX, jnp.int32(i)) for i in (1, H)]  # H: clamped to H - 3
    assert not np.allclose(outs[0], outs[1])


def _fori_traced(p, x, n):
    return lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ p["wh"]), x @ p["w1"])


def _while(p, x):
    def body(carry):
        i, h = carry
        return i + 1, jnp.tanh(h @ p["wh"]) * (1.0 + 0.1 * i)

    return lax.while_loop(lambda c: c[0] < 3, body, (0, x @ p["w1"]))[1]


@pytest.mark.parametrize(
    "f, rest",
    [(_fori_traced, (jnp.int32(3),)), (_while, ())],
    ids=["fori_loop(traced bounds)", "while_loop"],
)
def test_while_loops(f, rest):
    # Reverse mode is undefined for while_loop (in JAX itself): gradients by jacfwd.
    check_against_reference(f, {"w1": W1, "wh": WH}, X, IDX, *rest, forward_mode=True)


# -- cond / switch ------------------------------------------------------------------


def _cond_closure(p, x, pred):
    return lax.cond(
        pred,
        lambda h: jnp.tanh(h @ p["w1"]) @ p["w2"].T,
        lambda h: jax.nn.sigmoid(h @ p["w1"]) @ p["w2"].T * 2.0,
        x,
    )


def _cond_operand(p, x, pred):
    # The adapted weights are operands of the cond, not closed over.
    return lax.cond(pred, mlp, ft.partial(mlp, act=jnp.sin), p, x)


@pytest.mark.parametrize("f", [_cond_closure, _cond_operand])
def test_cond(f):
    check = Checker(f, WEIGHTS)  # compiled once, the predicate is traced
    outs = [check(X, IDX, jnp.asarray(pred)) for pred in (True, False)]
    assert not np.allclose(outs[0], outs[1])  # both branches were exercised


def _switch(p, x, i):
    branches = [
        lambda q, h: mlp(q, h),
        lambda q, h: jnp.sin(h @ q["w1"]) @ q["w2"].T,
        lambda q, h: (h @ q["w1"]) @ q["w2"].T,
    ]
    return lax.switch(i, branches, p, x)


def test_switch():
    check = Checker(_switch, WEIGHTS)
    outs = [check(X, IDX, jnp.int32(i)) for i in range(3)]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


# -- checkpoint / remat -------------------------------------------------------------

POLICIES = {
    "no-policy": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


@pytest.mark.parametrize(
    "policy, closed_over",
    [("no-policy", False), ("nothing_saveable", True)],
)
def test_checkpoint(policy, closed_over):
    def f(p, x):
        if closed_over:
            return jax.checkpoint(lambda h: mlp(p, h), policy=POLICIES[policy])(x)
        # `jax.remat` is `jax.checkpoint`; without CSE prevention, as inside scan.
        return jax.remat(mlp, policy=POLICIES[policy], prevent_cse=False)(p, x)

    check_against_reference(f, WEIGHTS, X, IDX)


def test_remat_inside_scan_over_layer_stack():
    def f(p, x):
        @ft.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
        def layer(h, w):
            return jnp.tanh(h @ w), None

        return lax.scan(layer, x, p["stack"])[0]

    check_against_reference(f, {"stack": STACK}, X, IDX)


def test_checkpoint_keeps_low_rank_form():
    # A remat rule that materialised W + AB per example (B * D * H values) would
    # show up in the jaxpr of the gradient.
    def loss(fac):
        lp = {k: wt.lora(IDX, *fac[k]) for k, wt in WEIGHTS.items()}
        return lx.quaxify(jax.checkpoint(mlp))(lp, X).sum()

    factors = {k: (jnp.asarray(wt.a), jnp.asarray(wt.b)) for k, wt in WEIGHTS.items()}
    jaxpr = jax.make_jaxpr(jax.grad(loss))(factors)
    assert any("remat" in e.primitive.name for e in walk_eqns(jaxpr))
    assert largest_intermediate(jaxpr) < B * D * H


# -- custom_jvp activations ---------------------------------------------------------


def _custom_jvp_activations(h):
    return jax.nn.relu(h) - jax.nn.gelu(h) * jax.nn.softplus(h)


def test_custom_jvp_activations():
    # relu, gelu and softplus are `jax.custom_jvp` functions (of activations).
    check_against_reference(
        ft.partial(mlp, act=_custom_jvp_activations), WEIGHTS, X, IDX
    )


# -- custom_vjp ---------------------------------------------------------------------

CLIP = 0.05


@ft.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_gradient(x, c):
    """Identity forward; the backward pass clips the cotangent to [-c, c]."""
    return x


clip_gradient.defvjp(lambda x, c: (x, None), lambda c, _, g: (jnp.clip(g, -c, c),))


def _clipped_mlp(p, x, c=CLIP):
    return clip_gradient(jnp.tanh(x @ p["w1"]), c) @ p["w2"].T


def _clipped_scan(p, x, c=CLIP):
    def layer(h, w):
        return clip_gradient(jnp.tanh(h @ w), c), None

    return lax.scan(layer, x, p["stack"])[0]


@pytest.mark.parametrize(
    "f, weights",
    [
        (_clipped_mlp, WEIGHTS),
        (_clipped_scan, {"stack": STACK}),
    ],
    ids=["mlp", "in-scan"],
)
def test_custom_vjp_on_activations(f, weights):
    check_against_reference(f, weights, X, IDX)


def test_custom_vjp_backward_pass_matters():
    # Guard for the test above: the clip changes the reference gradients, so a
    # quaxify that ignored the custom backward pass would have failed it.
    def plain_grads(c):
        def loss(fac):
            dense = {k: wt.dense_jax(IDX, *fac[k]) for k, wt in WEIGHTS.items()}
            out = per_example(ft.partial(_clipped_mlp, c=c))(dense, X)
            return jnp.sum(out * random_like(0, out.shape))

        factors = {k: (jnp.asarray(w.a), jnp.asarray(w.b)) for k, w in WEIGHTS.items()}
        return jax.tree.leaves(jax.jit(jax.grad(loss))(factors))

    clipped, unclipped = plain_grads(CLIP), plain_grads(np.inf)
    diffs = [np.max(np.abs(g1 - g2)) for g1, g2 in zip(clipped, unclipped)]
    assert max(diffs) > 0.1 * max(np.max(np.abs(g)) for g in unclipped), diffs


def test_custom_vjp_given_an_adapted_weight_is_an_error():
    @jax.custom_vjp
    def scaled(w):
        return 2.0 * w

    scaled.defvjp(lambda w: (2.0 * w, None), lambda _, g: (2.0 * g,))

    def f(p, x):
        return x @ scaled(p["w1"])

    with pytest.raises(lx.UnsupportedOperationError, match="custom_vjp") as info:
        lx.quaxify(f)({"w1": W1.lora(IDX)}, X)
    assert "BatchedLoraArray" in str(info.value)
    assert "activations" in str(info.value)


# -- attention ----------------------------------------------------------------------

N_HEADS, HEAD = 2, 2


def _attention(p, x, causal):
    b, t, _ = x.shape
    q, k, v = (
        (x @ p[name]).reshape(b, t, N_HEADS, HEAD) for name in ("wq", "wk", "wv")
    )
    o = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    return o.reshape(b, t, N_HEADS * HEAD) @ p["wo"].T


def test_dot_product_attention():
    rng = np.random.default_rng(3)
    weights = {
        name: Adapted.random(rng, (D, N_HEADS * HEAD), (0,), (1,))
        for name in ("wq", "wk", "wv")
    }
    weights["wo"] = Adapted.random(rng, (D, N_HEADS * HEAD), (1,), (0,))
    f = ft.partial(_attention, causal=True)
    check_against_reference(f, weights, XT, IDX)
