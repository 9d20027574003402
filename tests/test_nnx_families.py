"""The NNX model families of `tests/nnx_families.py`, served with per-row adapters.

What works today is checked against an independent reference: each row run alone
through the plain NNX model with its adapter merged in float64 NumPy
(`einsum_merge`, not `lx.merge`), or through the base model for index -1. Every
batch mixes two adapters of different ranks (random non-zero A and B) with a base
row, and every adapted row must move well beyond the tolerance.

What fails today is written as an expected failure with `pytest.raises` and the
error's own words, adapting only the leaf concerned: when a rule for it lands,
the test fails, and should then move to the reference checks above. The sweep
(`benchmarks/coverage_sweep.py`) found these; see its table.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

import lorax_arrays as lx
from tests import nnx_families as nf
from tests.scripts import run_script

TOL = dict(rtol=2e-4, atol=2e-4)


def served_family(name: str, drop=(), only=None):
    """The family's model, its two adapters (leaves matching a `drop` pattern left
    out, or only those matching `only`), loraified with `nf.IDX`."""
    family = nf.FAMILIES[name]
    model = family.build()
    adapters = nf.adapters_for(family, model)
    paths = [
        p
        for p in adapters[0].paths
        if not any(re.search(d, p) for d in drop)
        and (only is None or re.search(only, p))
    ]
    assert paths, name
    adapters = [nf.keep_paths(a, paths) for a in adapters]
    served, stack = nf.serve(model, adapters)
    return family, model, served, stack


def check_against_reference(name: str, drop=()):
    family, model, served, stack = served_family(name, drop)
    got = np.asarray(nf.run_served(family, served))
    want, base = nf.reference(family, model, stack)
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL)
    # Not vacuous: each adapter moves its rows well beyond the tolerance.
    for e, i in enumerate(nf.IDX):
        moved = np.abs(want[e] - base[e]).max()
        assert (moved > 1e-2) if i >= 0 else (moved < 1e-6), (e, i, moved)
    return model, stack


# --- families that run with every rule -----------------------------------------

WORKING = [
    "llama3",  # prefill + cached decode steps
    "llama3-scan",
    "qwen2",
    "qwen3",
    "qwen3-moe",  # experts (E, D, F) as a free stack axis: 'BTD,EDF->BTEF'
    "gemma2",  # qkv_einsum per part (free stack axis), gating_einsum w[0], w[1]
    "gemma2-whole",
    "gemma3",  # kv_einsum and gating_einsum per part
    "gemma3-whole",
    "gemma4",  # (V, L, P) lookup, w * c (scalar, NumPy in a while_loop)
    "moe-gshard",  # experts a batch axis of dot_general
    "nnx-mlp",
    "nnx-lm1b",  # nnx.MultiHeadAttention's own cache, made before the call
    "maxtext",  # the head moved from host memory with jax.device_put at each use
    "nnx-sharded",  # state constrained to its partition specs in the call
]


@pytest.mark.parametrize("name", WORKING)
def test_family_matches_reference(name):
    model, stack = check_against_reference(name)
    every = lx.match_rules(model, nf.FAMILIES[name].rules(nf.RANKS[0]))
    assert set(stack.paths) == {m.path for m in every}  # every rule adapted


# --- families where some leaves cannot be adapted today ------------------------

# The leaves below fail (see the next section); everything else is checked.
PARTLY = {
    "deepseek-mla": [r"wkv_b"],  # weight absorption: an out-axis as a batch axis
    "nnx-cnn": [r"conv"],  # conv_general_dilated (issue 11)
}


@pytest.mark.parametrize("name", PARTLY)
def test_family_without_the_unsupported_leaves(name):
    check_against_reference(name, drop=PARTLY[name])


# --- what fails today ----------------------------------------------------------

GATHER = (
    r"`gather` on a BatchedLoraArray of shape \(4, 16, 32\) \(in_axes=\(1,\), "
    r"out_axes=\(2,\), stack_axes=\(0,\)\).*only whole-row lookups"
)

UNSUPPORTED = [
    # (family, the one leaf adapted, the error's words)
    pytest.param("moe-gather", r"moe/gate_proj", GATHER, id="moe-gather-w[idx]"),
    pytest.param("moe-take", r"moe/up_proj", GATHER, id="moe-take-jnp.take"),
    pytest.param(
        "moe-onehot",
        r"moe/gate_proj",
        r"dot_general contracts axes \(0,\) \(batch axes \(\)\) of a "
        r"BatchedLoraArray with weight shape \(4, 16, 32\)",
        id="moe-onehot-contracts-expert-axis",
    ),
    pytest.param(
        "moe-ragged",
        r"moe/down_proj",
        r"`ragged_dot_general` has no rule for BatchedLoraArray",
        id="moe-ragged-ragged_dot",
    ),
    pytest.param(
        "nnx-cnn",
        r"conv2/kernel",
        r"`conv_general_dilated` has no rule for BatchedLoraArray \(weight shape "
        r"\(3, 3, 4, 8\)",
        id="nnx-cnn-conv",
    ),
    pytest.param(
        "deepseek-mla",
        r"layers/0/attn/wkv_b",
        r"dot_general contracts axes \(2,\) \(batch axes \(1,\)\) of a "
        r"BatchedLoraArray with weight shape \(8, 4, 4\), but its layout is "
        r"in_axes=\(0,\), out_axes=\(1, 2\)",
        id="deepseek-mla-absorbed-wkv_b",
    ),
]


@pytest.mark.parametrize("name, leaf, match", UNSUPPORTED)
def test_unsupported_today(name, leaf, match):
    family, _, served, _ = served_family(name, only=leaf)
    trace = lambda m, x: jax.eval_shape(lx.quaxify(family.call), m, x)  # noqa: E731
    with pytest.raises(lx.UnsupportedOperationError, match=match):
        nf.run_served(family, served, run=trace)


def test_cache_made_inside_the_call_is_not_written_back():
    """`nnx.MultiHeadAttention.init_cache` inside the quaxified call (the module
    held `None` where the cache now is): plain NNX and `nnx.jit` take it, but
    `lx.quaxify`'s write-back (`nnx.update`, lorax_arrays/_nnx.py) refuses the new
    Variables, with or without adapters. A bug, not a missing rule: when fixed,
    this fails and `nnx-lm1b-cache-inside` joins WORKING."""
    family, model, served, _ = served_family("nnx-lm1b-cache-inside")
    tokens = family.inputs()
    assert jax.eval_shape(nnx.jit(family.call), nnx.clone(model), tokens).shape
    for tree in (nnx.clone(model), served):
        with pytest.raises(ValueError, match="Expected a subgraph for 'cache_index'"):
            jax.eval_shape(lx.quaxify(family.call), tree, tokens)


# --- the sweep -----------------------------------------------------------------


def test_sweep_names_primitive_leaf_and_model_code():
    """The sweep drives past the first error (each failing leaf dropped in turn)
    and ties each error to its leaf and to the model code that raised it."""
    out = run_script(["benchmarks/coverage_sweep.py", "--quick", "--family", "nnx-cnn"])
    assert "| `nnx-cnn` | 2 of 4 | traces |" in out
    for conv in ("conv1", "conv2"):
        assert (
            f"`conv_general_dilated`: `{conv}/kernel` (CNN.__call__: "
            f"`x = self.avg_pool(nnx.relu(self.{conv}(x)))` → flax Conv.__call__)"
        ) in out
