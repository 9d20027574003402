"""End to end: a batch where every row uses its own adapter, in unmodified models.

Every batched result is compared against running each row ALONE through the plain
model with that row's adapter merged in (`einsum_merge(base, stack[i])` from
model_helpers, not `lx.merge`; the base model for `i == -1`). Adapters always have
random non-zero A and B, ranks differ (2, 4, 8), and every batch holds base-only rows
and adapters used more than once.

Tolerances (see tests/model_helpers.py): float32 `rtol = atol = 2e-5`; the bf16
case `rtol = atol = 5e-2` against a float32 reference on the same bf16 values.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from tests.fast_init import random_adapters
from tests.model_helpers import (
    BF16_REL_TO_MAX,
    BF16_TOL,
    F32_TOL,
    assert_adapters_matter,
    assert_close,
    cast_floats,
    per_row_reference,
    vmap_styles,
)

D, T, B = 8, 4, 6
# Base rows (-1) and repeated adapters in every fixed pattern.
IDX_B = np.array([2, 0, -1, 1, 2, 0], np.int32)
IDX_BT = np.array(
    [
        [0, 1, 2, -1],
        [2, 2, -1, 0],
        [-1, -1, 1, 1],
        [1, 0, 0, 2],
        [0, -1, 2, 1],
        [2, 1, -1, 0],
    ],
    np.int32,
)
index_lists = st.lists(st.integers(-1, 2), min_size=B, max_size=B)


def _check_both_styles(base, stack, call, xs, idx, runners, reference_call=None):
    outside, inside = runners
    idx = jnp.asarray(idx)
    ref = per_row_reference(base, stack, idx, reference_call or call, xs)
    base_out = per_row_reference(base, stack, -np.ones(idx.shape), call, xs)
    assert_adapters_matter(ref, base_out, idx, atol=F32_TOL["atol"])
    out1 = outside(lx.loraify(base, stack, idx), xs)
    assert_close(out1, ref, **F32_TOL)
    out2 = inside(lx.loraify(base, stack), xs, idx)
    assert_close(out2, ref, **F32_TOL)


# -- (a) eqx.nn.Linear and eqx.nn.MLP -------------------------------------------

_call = eqx.filter_jit(lambda m, x: m(x))
_eqx_runners = vmap_styles(lambda m, x: m(x))


@pytest.fixture(scope="module")
def linear_setup():
    lin = eqx.nn.Linear(D, 5, key=jr.key(0))
    rule_sets = [
        lx.LoraRule("weight", 2),
        lx.LoraRule("weight", 4, alpha=2.0),
        lx.LoraRule("weight", 8, alpha=16.0, use_rslora=True),
    ]
    stack = lx.stack_adapters(random_adapters(lin, rule_sets, seed=1, std=0.3))
    return lin, stack


@pytest.fixture(scope="module")
def mlp_setup():
    mlp = eqx.nn.MLP(D, 5, 12, 2, activation=jax.nn.gelu, key=jr.key(0))
    rule_sets = [
        [lx.LoraRule("layers/0", 2, alpha=4.0)],
        [lx.LoraRule("weight", 4)],
        [lx.LoraRule("layers/[12]", 8, alpha=4.0)],
    ]
    stack = lx.stack_adapters(random_adapters(mlp, rule_sets, seed=2, std=0.3))
    return mlp, stack


def test_linear_both_styles(linear_setup):
    lin, stack = linear_setup
    xs = jr.normal(jr.key(3), (B, D))
    _check_both_styles(lin, stack, _call, xs, IDX_B, _eqx_runners)


def test_mlp_both_styles(mlp_setup):
    mlp, stack = mlp_setup
    assert stack.ranks == ((2, 4, 0), (0, 4, 8), (0, 4, 8))
    xs = jr.normal(jr.key(4), (B, D))
    _check_both_styles(mlp, stack, _call, xs, IDX_B, _eqx_runners)


@settings(max_examples=6, deadline=None)
@given(idx=index_lists)
def test_mlp_any_index_pattern(mlp_setup, idx):
    mlp, stack = mlp_setup
    xs = jr.normal(jr.key(5), (B, D))
    idx = np.asarray(idx, np.int32)
    ref = per_row_reference(mlp, stack, idx, _call, xs)
    outside, inside = _eqx_runners
    assert_close(outside(lx.loraify(mlp, stack, idx), xs), ref, **F32_TOL)
    assert_close(inside(lx.loraify(mlp, stack), xs, jnp.asarray(idx)), ref, **F32_TOL)


# -- (b) eqx.nn.MultiheadAttention ------------------------------------------------


def _self_attention(m, x):
    # MultiheadAttention vmaps its Linear layers over the sequence internally.
    return m(x, x, x)


_mha_call = eqx.filter_jit(_self_attention)
_mha_runners = vmap_styles(_self_attention)


def test_multihead_attention_both_styles():
    mha = eqx.nn.MultiheadAttention(
        num_heads=2, query_size=D, use_output_bias=True, key=jr.key(0)
    )
    rule_sets = [
        [lx.LoraRule("query_proj|value_proj", 2)],
        [lx.LoraRule("proj", 4, alpha=8.0)],
        [lx.LoraRule("key_proj", 8), lx.LoraRule("output_proj", 2)],
    ]
    adapters = random_adapters(mha, rule_sets, seed=3, std=0.3)
    assert {p for ad in adapters for p in ad.paths} == {
        "query_proj/weight",
        "key_proj/weight",
        "value_proj/weight",
        "output_proj/weight",
    }
    stack = lx.stack_adapters(adapters)
    xs = jr.normal(jr.key(6), (B, T, D))
    _check_both_styles(mha, stack, _mha_call, xs, IDX_B, _mha_runners)


# -- (c) Flax linen ----------------------------------------------------------------


class TokenwiseNet(nn.Module):
    """Dense, DenseGeneral (kernel (D, H, K)) and Einsum; no mixing of tokens."""

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(12)(x))
        q = nn.DenseGeneral(features=(2, 4))(h)  # (B, T, 2, 4)
        e = nn.Einsum((2, 12, 4), "btd,ndh->btnh")(h)  # kernel (2, 12, 4)
        y = (q + jnp.tanh(e)).reshape(*q.shape[:-2], 8)
        return nn.Dense(5)(y)


FLAX_RULE_SETS = [
    [
        lx.LoraRule(r"Dense_\d/kernel", 2),
        lx.LoraRule("DenseGeneral_0/kernel", 2, in_axes=(0,), out_axes=(1, 2)),
    ],
    [
        lx.LoraRule(
            "DenseGeneral_0/kernel", 4, alpha=8.0, in_axes=(0,), out_axes=(1, 2)
        ),
        lx.LoraRule("Einsum_0/kernel", 4, in_axes=(1,), out_axes=(0, 2)),
    ],
    [
        lx.LoraRule(r"Dense_\d/kernel|Einsum_0/kernel", 8, in_axes=(-2,)),
    ],
]


@pytest.fixture(scope="module")
def flax_setup():
    model = TokenwiseNet()
    params = model.init(jr.key(0), jnp.ones((1, T, D)))
    stack = lx.stack_adapters(random_adapters(params, FLAX_RULE_SETS, seed=4, std=0.3))
    return model, params, stack


def test_flax_rule_layouts(flax_setup):
    _, params, stack = flax_setup
    layouts = {lay.path: lay for lay in stack.layouts}
    assert layouts["params/DenseGeneral_0/kernel"].out_axes == (1, 2)
    assert layouts["params/Einsum_0/kernel"].in_axes == (1,)
    assert layouts["params/Einsum_0/kernel"].out_axes == (0, 2)
    assert layouts["params/Dense_0/kernel"].in_axes == (0,)


def test_flax_per_example_indices(flax_setup):
    model, params, stack = flax_setup
    xs = jr.normal(jr.key(7), (B, T, D))
    apply_one = jax.jit(lambda p, x: model.apply(p, x[None])[0])
    ref = per_row_reference(params, stack, IDX_B, apply_one, xs)
    base_out = model.apply(params, xs)
    assert_adapters_matter(ref, base_out, IDX_B, atol=F32_TOL["atol"])
    out = jax.jit(lx.quaxify(model.apply))(lx.loraify(params, stack, IDX_B), xs)
    assert_close(out, ref, **F32_TOL)


def test_flax_per_token_indices(flax_setup):
    model, params, stack = flax_setup
    xs = jr.normal(jr.key(8), (B, T, D))
    apply_one = jax.jit(lambda p, x: model.apply(p, x[None, None])[0, 0])
    ref = per_row_reference(params, stack, IDX_BT, apply_one, xs)
    base_out = model.apply(params, xs)
    assert_adapters_matter(ref, base_out, IDX_BT, atol=F32_TOL["atol"])
    out = jax.jit(lx.quaxify(model.apply))(lx.loraify(params, stack, IDX_BT), xs)
    assert_close(out, ref, **F32_TOL)


class FlaxAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D)(x, x)


def test_flax_attention_per_example_indices():
    model = FlaxAttention()
    params = model.init(jr.key(0), jnp.ones((1, T, D)))
    rule_sets = [
        [lx.LoraRule("(query|value)/kernel", 2, in_axes=(0,), out_axes=(1, 2))],
        [lx.LoraRule("(query|key|value)/kernel", 4, in_axes=(0,), out_axes=(1, 2))],
        [lx.LoraRule("out/kernel", 8, in_axes=(0, 1), out_axes=(2,))],
    ]
    stack = lx.stack_adapters(random_adapters(params, rule_sets, seed=5, std=0.3))
    xs = jr.normal(jr.key(9), (B, T, D))
    apply_one = jax.jit(lambda p, x: model.apply(p, x[None])[0])
    ref = per_row_reference(params, stack, IDX_B, apply_one, xs)
    assert_adapters_matter(ref, model.apply(params, xs), IDX_B, atol=F32_TOL["atol"])
    out = jax.jit(lx.quaxify(model.apply))(lx.loraify(params, stack, IDX_B), xs)
    assert_close(out, ref, **F32_TOL)


# -- (d) a raw-parameter function ---------------------------------------------------


def raw_forward(p, x):
    """`x @ w`, an einsum against a (H, N, K) weight, and `@ w.T` of an (out, in)."""
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    q = jnp.einsum("btd,dnk->btnk", h, p["wq"])
    q = q.reshape(*q.shape[:-2], -1)
    return q @ p["w_out"].T


RAW_RULE_SETS = [
    [lx.LoraRule("w1", 2), lx.LoraRule("wq", 2, in_axes=(0,))],
    [lx.LoraRule("wq", 4, in_axes=(0,)), lx.LoraRule("w_out", 4, in_axes=(1,))],
    [
        lx.LoraRule("w1", 8, alpha=4.0),
        lx.LoraRule("w_out", 8, alpha=32.0, use_rslora=True, in_axes=(1,)),
    ],
]


def _raw_params():
    k1, k2, k3 = jr.split(jr.key(11), 3)
    return {
        "w1": jr.normal(k1, (D, 12)) / np.sqrt(D),
        "b1": jnp.full((12,), 0.1),
        "wq": jr.normal(k2, (12, 2, 4)) / np.sqrt(12),
        "w_out": jr.normal(k3, (5, 8)) / np.sqrt(8),  # (out, in)
    }


_raw_one_example = jax.jit(lambda p, x: raw_forward(p, x[None])[0])
_raw_one_token = jax.jit(lambda p, x: raw_forward(p, x[None, None])[0, 0])
_raw_batched = jax.jit(lx.quaxify(raw_forward))


@pytest.mark.parametrize("idx", [IDX_B, IDX_BT], ids=["per-example", "per-token"])
def test_raw_function(idx):
    params = _raw_params()
    stack = lx.stack_adapters(random_adapters(params, RAW_RULE_SETS, seed=6, std=0.3))
    xs = jr.normal(jr.key(12), (B, T, D))
    one = _raw_one_example if idx.ndim == 1 else _raw_one_token
    ref = per_row_reference(params, stack, idx, one, xs)
    assert_adapters_matter(ref, raw_forward(params, xs), idx, atol=F32_TOL["atol"])
    out = _raw_batched(lx.loraify(params, stack, idx), xs)
    assert_close(out, ref, **F32_TOL)


def test_raw_function_bf16():
    params = cast_floats(_raw_params(), jnp.bfloat16)
    adapters = random_adapters(params, RAW_RULE_SETS, seed=7, std=0.5)
    assert all(x.dtype == jnp.bfloat16 for ad in adapters for x in jax.tree.leaves(ad))
    stack = lx.stack_adapters(adapters)
    xs = jr.normal(jr.key(13), (B, T, D)).astype(jnp.bfloat16)
    out = _raw_batched(lx.loraify(params, stack, IDX_B), xs)
    assert out.dtype == jnp.bfloat16
    # Reference: the same bf16 values, upcast, merged and run in float32.
    params32 = cast_floats(params, jnp.float32)
    stack32 = cast_floats(stack, jnp.float32)
    xs32 = xs.astype(jnp.float32)
    ref = per_row_reference(params32, stack32, IDX_B, _raw_one_example, xs32)
    base_out = raw_forward(params32, xs32)
    atol = BF16_REL_TO_MAX * float(jnp.max(jnp.abs(ref)))
    assert_adapters_matter(ref, base_out, IDX_B, atol=atol, factor=3)
    assert_close(out, ref, rtol=BF16_TOL["rtol"], atol=atol)
