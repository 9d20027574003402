"""The base weight is frozen by the type: no rule lets a gradient reach `w`.

For every rule family that reads the base weight (`dot_general` through `@` and
`einsum`, embedding lookups `E[tokens]` / `jnp.take` / `E[3]`, one layer taken from a
stack by a traced index, static slices and splits of a fused kernel, `lax.scan` over
a layer stack, `jax.checkpoint`, `lax.cond`, a quax-valued base weight), the gradient
of a scalar loss w.r.t. the whole loraified tree (`eqx.filter_grad`) is

- exactly zero for the base `w` (every element, every leaf of a quax-valued `w`);
- for `a` and `b`, equal to `jax.grad` of the plain function run per example with
  its dense merged weight `W_e = w + s_i A_i B_i` written out in plain JAX
  (tests/dense_reference.py), and non-zero.

Random non-zero A and B; base-only rows (-1) and repeated adapters in every batch.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax
from jax import lax

import lorax_arrays as lx
from tests.dense_reference import (
    TOL,
    Adapted,
    Checker,
    assert_grads_close,
    vmap_outside,
)
from tests.fast_init import random_adapters
from tests.model_helpers import assert_close

B, T, D, H, L, V = 4, 3, 5, 6, 3, 11
IDX = np.array([2, 0, -1, 2], np.int32)  # base-only row, repeated adapter
IDX_BT = np.array([[0, 1, -1], [2, 2, 0], [-1, -1, 1], [1, 0, 2]], np.int32)

_rng = np.random.default_rng(7)
W1 = Adapted.random(_rng, (D, H), (0,), (1,))  # `x @ W1`
W2 = Adapted.random(_rng, (D, H), (1,), (0,))  # (out, in): `h @ W2.T`
EMB = Adapted.random(_rng, (V, D), (0,), (1,))  # an embedding table
STACK = Adapted.random(_rng, (L, D, D), (1,), (2,), (0,))  # a layer stack
QKV = Adapted.random(_rng, (D, 3 * H), (0,), (1,))  # a fused kernel
X = jnp.asarray(_rng.standard_normal((B, D)), jnp.float32)
XT = jnp.asarray(_rng.standard_normal((B, T, D)), jnp.float32)
TOKENS = jnp.asarray([[0, 4, 4], [V - 1, 7, 0], [3, 3, 3], [9, V - 1, 2]], jnp.int32)
TOKEN = jnp.asarray([4, V - 1, 0, 4], jnp.int32)  # one token per example


def _lora_tree(weights: dict[str, Adapted], idx: Any) -> dict:
    return {k: wt.lora(jnp.asarray(idx)) for k, wt in weights.items()}


def check_frozen(f, weights, x, idx, *rest, transform=lx.quaxify, tree=None):
    """`eqx.filter_grad` of `sum(transform(f)(tree, x, *rest) * ct)` w.r.t. the whole
    loraified tree: zero for every base weight, the plain dense reference's
    gradients for the factors. `tree` defaults to `weights` loraified."""
    checker = Checker(f, weights)
    (ref_out, ref_grads), ct = checker.reference(x, idx, *rest)
    tree = _lora_tree(weights, idx) if tree is None else tree

    @eqx.filter_jit
    @eqx.filter_value_and_grad(has_aux=True)
    def loss(tree, x, *rest):
        out = transform(f)(tree, x, *rest)
        return jnp.sum(out * ct), out

    (_, out), grads = loss(tree, x, *rest)
    assert_close(out, ref_out, **TOL)
    for k in weights:
        g = grads[k]
        assert isinstance(g, lx.BatchedLoraArray), type(g)
        w_leaves = jax.tree.leaves(g.w)
        assert w_leaves, f"no gradient leaves for {k}.w"
        for leaf in w_leaves:
            np.testing.assert_array_equal(
                np.asarray(leaf), 0, err_msg=f"base weight {k!r} got a gradient"
            )
    assert_grads_close({k: (grads[k].a, grads[k].b) for k in weights}, ref_grads)
    return grads


# -- dot_general --------------------------------------------------------------------


def _matmul(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"].T


def _einsum(p, x):
    h = jnp.einsum("btd,dh->bth", x, p["w1"])
    return jnp.einsum("bth,eh->bte", jnp.tanh(h), p["w2"])


def test_matmul():
    check_frozen(_matmul, {"w1": W1, "w2": W2}, X, IDX)


def test_einsum_per_token():
    check_frozen(_einsum, {"w1": W1, "w2": W2}, XT, IDX_BT)


# -- embedding lookups --------------------------------------------------------------


def _getitem(p, tok):
    return jnp.tanh(p["emb"][tok])


def _take(p, tok):
    return jnp.tanh(jnp.take(p["emb"], tok, axis=0))


def _static_row(p, x):
    # `E[3]`: a slice and a squeeze, one row for the whole call (scalar indices).
    return x * p["emb"][3]


def test_lookup_getitem_per_token():
    check_frozen(_getitem, {"emb": EMB}, TOKENS, IDX_BT)


def test_lookup_take_per_example():
    check_frozen(_take, {"emb": EMB}, TOKENS, IDX)


def test_lookup_static_row():
    check_frozen(_static_row, {"emb": EMB}, X, IDX, transform=vmap_outside)


def test_lookup_single_token_dynamic_slice():
    # One traced token per example, looked up with `dynamic_index_in_dim`: the
    # dynamic_slice row rule (scalar indices, under vmap). `(1, D)`: a batch of one.
    def f(p, tok):
        return jnp.tanh(lax.dynamic_index_in_dim(p["emb"], tok[0], keepdims=True))

    check_frozen(f, {"emb": EMB}, TOKEN, IDX, transform=vmap_outside)


def test_equinox_embedding_model():
    """End to end: an adapted `eqx.nn.Embedding` + `eqx.nn.Linear`, trained with
    `eqx.filter_grad`: the base table and kernel get exactly zero gradient, every
    used adapter's factors a non-zero one."""
    k1, k2 = jr.split(jr.key(0))
    model = [eqx.nn.Embedding(V, D, key=k1), eqx.nn.Linear(D, H, key=k2)]
    rules = [lx.LoraRule("weight", 2)]
    stack = lx.stack_adapters(random_adapters(model, [rules] * 3, seed=3))
    lm = lx.loraify(model, stack, IDX)

    @eqx.filter_jit
    @eqx.filter_grad
    def grads(m, tokens):
        def one(m, tok):
            return jax.vmap(lambda t: m[1](m[0](t)))(tok)

        return jnp.sum(lx.quaxify(jax.vmap(one, in_axes=(None, 0)))(m, tokens) ** 2)

    g = grads(lm, TOKENS)
    for layer in g:
        np.testing.assert_array_equal(np.asarray(layer.weight.w), 0)
        for factor in (layer.weight.a, layer.weight.b):
            used = np.asarray(factor)[np.unique(IDX[IDX >= 0])]
            assert np.all(np.abs(used).reshape(len(used), -1).max(-1) > 0)


# -- one layer of a stack -----------------------------------------------------------


def _stack_by(pick):
    def f(p, x):
        def body(i, h):
            return jnp.tanh(h @ pick(p["stack"], i))

        return lax.fori_loop(0, L, body, x)

    return f


@pytest.mark.parametrize(
    "pick",
    [
        lambda w, i: lax.dynamic_index_in_dim(w, i, keepdims=False),
        lambda w, i: lax.dynamic_slice(w, (i, 0, 0), (1, D, D))[0],
        lambda w, i: w[i],
        lambda w, i: jnp.take(w, i, axis=0),
    ],
    ids=["dynamic_index_in_dim", "dynamic_slice", "W[i]", "take"],
)
def test_layer_from_stack_by_traced_index(pick):
    check_frozen(_stack_by(pick), {"stack": STACK}, X, IDX)


def test_layer_from_stack_by_static_index():
    def f(p, x):
        return jnp.tanh(jnp.tanh(x @ p["stack"][0]) @ p["stack"][2])

    check_frozen(f, {"stack": STACK}, X, IDX)


# -- slices and splits of a fused kernel --------------------------------------------


def _qkv_split(p, x):
    q, k, v = jnp.split(p["qkv"], 3, axis=1)
    return jnp.tanh(x @ q) * (x @ k) + x @ v


def _qkv_slice(p, x):
    w = p["qkv"]
    return jnp.tanh(x @ w[:, :H]) * (x @ w[:, H : 2 * H]) + x @ w[:, 2 * H :]


@pytest.mark.parametrize("f", [_qkv_split, _qkv_slice], ids=["split", "slice"])
def test_fused_qkv(f):
    check_frozen(f, {"qkv": QKV}, XT, IDX_BT)


# -- control flow -------------------------------------------------------------------


def _scan(p, x):
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])[0]


def _scan_lookup(p, tok):
    # A lookup inside a scan over a stack: both the scan and the gather rule.
    def step(h, w):
        return jnp.tanh(h @ w), None

    return lax.scan(step, jnp.tanh(p["emb"][tok]), p["stack"])[0]


def test_scan_over_stack():
    check_frozen(_scan, {"stack": STACK}, XT, IDX_BT)


def test_scan_with_lookup():
    check_frozen(_scan_lookup, {"emb": EMB, "stack": STACK}, TOKENS, IDX_BT)


def test_checkpoint():
    def f(p, tok):
        return jax.checkpoint(lambda p, t: _matmul(p, jnp.tanh(p["emb"][t])))(p, tok)

    check_frozen(f, {"emb": EMB, "w1": W1, "w2": W2}, TOKENS, IDX_BT)


@pytest.mark.parametrize("pred", [True, False])
def test_cond(pred):
    def f(p, tok, pred):
        def yes(p, t):
            return _matmul(p, jnp.tanh(p["emb"][t]))

        def no(p, t):
            return -_matmul(p, jnp.take(p["emb"], t, axis=0))

        return lax.cond(pred, yes, no, p, tok)

    weights = {"emb": EMB, "w1": W1, "w2": W2}
    check_frozen(f, weights, TOKENS, IDX_BT, jnp.asarray(pred))


# -- a quax-valued base weight ------------------------------------------------------


class ScaledWeight(quax.ArrayValue):
    """`q * col_scale`: a base weight that is itself a quax value (two float leaves,
    as a dequantised weight would have), materialised by quax's default rule."""

    q: jax.Array
    col_scale: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.q.shape, self.q.dtype)

    def materialise(self):
        return self.q * self.col_scale


def _scaled(wt: Adapted) -> tuple[Adapted, ScaledWeight]:
    """The same adapted weight with its base split as `q * col_scale`."""
    col_scale = np.linspace(0.5, 1.5, wt.w.shape[-1]).astype(np.float32)
    q = (wt.w / col_scale).astype(np.float32)
    merged = Adapted(
        q * col_scale, wt.a, wt.b, wt.scale, wt.in_axes, wt.out_axes, wt.stack_axes
    )
    return merged, ScaledWeight(jnp.asarray(q), jnp.asarray(col_scale))


@pytest.mark.parametrize(
    "f, names, x, idx",
    [
        (_matmul, ("w1", "w2"), X, IDX),
        (lambda p, t: _matmul(p, _getitem(p, t)), ("emb", "w1", "w2"), TOKENS, IDX_BT),
    ],
    ids=["dot", "lookup"],
)
def test_quax_valued_base(f, names, x, idx):
    weights, tree = {}, {}
    for k in names:
        merged, w = _scaled({"emb": EMB, "w1": W1, "w2": W2}[k])
        weights[k] = merged
        tree[k] = merged.lora(jnp.asarray(idx)).replace(w=w)
    grads = check_frozen(f, weights, x, idx, tree=tree)
    for k in weights:
        assert isinstance(grads[k].w, ScaledWeight)
