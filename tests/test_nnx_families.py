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
    "moe-gather",  # w[experts]: the entries' factors gathered per adapter
    "moe-take",  # jnp.take(w, experts, axis=0)
    "moe-ragged",  # tokens sorted by expert, lax.ragged_dot: rows carry positions
    "deepseek-mla",  # absorbed wkv_b: an out-axis as a dot_general batch axis
    "nnx-mlp",
    "nnx-lm1b",  # nnx.MultiHeadAttention's own cache, made before the call
    "maxtext",  # the head moved from host memory with jax.device_put at each use
    "nnx-sharded",  # state constrained to its partition specs in the call
    "nnx-cnn",  # nnx.Conv kernels (3, 3, in, out): conv_general_dilated
    "nnx-lm1b-cache-inside",  # caches created in the call: written back by NNX's
    # update context (the modules' structure changes)
]


@pytest.mark.parametrize("name", WORKING)
def test_family_matches_reference(name):
    model, stack = check_against_reference(name)
    every = lx.match_rules(model, nf.FAMILIES[name].rules(nf.RANKS[0]))
    assert set(stack.paths) == {m.path for m in every}  # every rule adapted


# --- what fails today ----------------------------------------------------------

UNSUPPORTED = [
    # (family, the one leaf adapted, the error's words)
    pytest.param(
        "moe-onehot",
        r"moe/gate_proj",
        r"dot_general contracts the stack axes \(0,\) of a BatchedLoraArray with "
        r"weight shape \(4, 16, 32\).*contracting the stack axis mixes the "
        r"entries' adapters.*no low-rank form.*`w\[experts\]`.*"
        r"einsum\('BTD,EDF->BTEF', x, w\)",
        id="moe-onehot-contracts-expert-axis",
    ),
]


@pytest.mark.parametrize("name, leaf, match", UNSUPPORTED)
def test_unsupported_today(name, leaf, match):
    family, _, served, _ = served_family(name, only=leaf)
    trace = lambda m, x: jax.eval_shape(lx.quaxify(family.call), m, x)  # noqa: E731
    with pytest.raises(lx.UnsupportedOperationError, match=match):
        nf.run_served(family, served, run=trace)


def test_cache_made_inside_the_call_is_written_back():
    """`nnx.MultiHeadAttention.init_cache` inside the quaxified call (the module
    held `None` where the cache now is) changes the modules' structure: the new
    caches are written back into the caller's module, as `nnx.jit` does."""
    family, _, served, _ = served_family("nnx-lm1b-cache-inside")
    attention = [
        m for _, m in nnx.iter_graph(served) if isinstance(m, nnx.MultiHeadAttention)
    ]
    assert attention and all(getattr(m, "cached_key", None) is None for m in attention)
    lx.quaxify(family.call)(served, family.inputs())
    assert all(getattr(m, "cached_key", None) is not None for m in attention)


# --- the sweep -----------------------------------------------------------------


def test_sweep_names_primitive_leaf_and_model_code():
    """The sweep drives past the first error (each failing leaf dropped in turn)
    and ties each error to its leaf and to the model code that raised it."""
    out = run_script(
        ["-m", "benchmarks.coverage_sweep", "--quick", "--family", "moe-onehot"]
    )
    assert "| `moe-onehot` | 1 of 4 | traces |" in out
    for name, line in (
        ("gate", 'gate = jnp.einsum("BTD,BTKDF->BTKF", x, select(w1))'),
        ("up", 'up = jnp.einsum("BTD,BTKDF->BTKF", x, select(w3))'),
    ):
        assert (
            f"`dot_general (UnsupportedOperationError)`: `moe/{name}_proj` "
            f"(MoE.__call__: `{line}`)"
        ) in out
