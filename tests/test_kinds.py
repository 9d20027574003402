"""The adapter kinds' one home (`_adapters/kinds.py`): every variant a `LoraRule`
accepts has a record, the records agree with what `init_adapter` makes, and the
vector fields are the `Adapter`'s."""

from __future__ import annotations

import math

import jax.random as jr
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._adapters.kinds import KIND_OF_VECTOR, KINDS, VECTOR_FIELDS
from lorax_arrays._adapters.targeting import VARIANTS

RNG = np.random.default_rng(0)
# A stacked leaf (2 layers) with two in-axes, so every count has all its factors.
TREE = {"w": np.asarray(RNG.standard_normal((2, 3, 4, 5)), np.float32)}
RULE = dict(in_axes=(1, 2), out_axes=3, stack_axes=0)


def _rule(variant: str) -> lx.LoraRule:
    rank = 0 if variant.startswith("ia3") else 3
    return lx.LoraRule("w", rank, alpha=6.0, variant=variant, **RULE)


def test_every_variant_has_one_record():
    assert tuple(KINDS) == VARIANTS
    assert set(KIND_OF_VECTOR) == set(VECTOR_FIELDS)
    for field, group in VECTOR_FIELDS.items():
        assert KIND_OF_VECTOR[field].group == group


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_record_says_what_init_adapter_makes(variant):
    adapter = lx.init_adapter(TREE, _rule(variant), key=jr.key(0))
    kind, rank = KINDS[variant], _rule(variant).rank
    # Trainable parameters, counted from the adapter's arrays: the factors (a
    # VeRA leaf's are frozen projections; its `d`, `b` train), then the vectors.
    counted = sum(
        np.size(getattr(adapter, f)["w"])
        for f in VECTOR_FIELDS
        if "w" in getattr(adapter, f)
    )
    if variant == "vera":
        counted += sum(np.size(x) for x in adapter.vera["w"])
    elif kind.low_rank:
        counted += sum(np.size(x) for x in adapter.weights["w"])
    assert counted == 2 * kind.trainable(rank, 3 * 4, 5)
    summary = str(lx.match_rules(TREE, _rule(variant)))
    assert f"{counted:,} adapter parameters" in summary
    # Its vector field is the only one set, and starts where the model is unchanged.
    for field in VECTOR_FIELDS:
        assert ("w" in getattr(adapter, field)) == (field == kind.vector)
    w = TREE["w"].astype(np.float64)
    if variant == "dora":
        expect = np.sqrt((w**2).sum(axis=(1, 2)))  # (stack, out)
        np.testing.assert_allclose(adapter.magnitudes["w"], expect, rtol=1e-6)
    elif kind.vector is not None:
        np.testing.assert_array_equal(getattr(adapter, kind.vector)["w"], 1.0)
    np.testing.assert_allclose(np.asarray(lx.merge(TREE, adapter)["w"]), w, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rslora", [False, True])
def test_the_scale(variant, rslora):
    rule = lx.LoraRule("w", 0 if variant.startswith("ia3") else 4, alpha=6.0,
                       use_rslora=rslora, variant=variant, **RULE)  # fmt: skip
    adapter = lx.init_adapter(TREE, rule, key=jr.key(1))
    if variant.startswith("ia3"):
        expect = 0.0  # no low-rank term
    elif variant == "vera":
        expect = 1.0  # its vectors carry the scale
    else:
        expect = 6.0 / (math.sqrt(4) if rslora else 4)
    assert rule.scale == pytest.approx(expect)
    assert adapter.scale("w") == pytest.approx(expect)
