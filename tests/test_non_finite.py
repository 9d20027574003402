"""A non-finite adapter is refused wherever adapters enter the library.

NaN or Inf in a factor, a variant's vector (DoRA's magnitude, IA3's vectors,
VeRA's vectors) or an alpha is refused by `stack_adapters`, `load_adapter`,
`load_peft_adapter` and `AdapterBank.add` with `lx.NonFiniteAdapterError`,
naming the adapter, the leaf and the field. (Served anyway, as one that turns
non-finite during training would be, it stays in its own rows:
tests/test_isolation.py.)
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._io.safetensors import read_safetensors, write_safetensors
from tests.fast_init import random_adapters

TREE = {
    "embed": jnp.asarray(np.random.default_rng(0).standard_normal((7, 4)), jnp.float32),
    "head": jnp.asarray(np.random.default_rng(1).standard_normal((4, 5)), jnp.float32),
}
RULES = [
    lx.LoraRule("^embed$", rank=2, in_axes=0, out_axes=1),
    lx.LoraRule("^head$", rank=2, alpha=4.0),
]
POISONS = [np.nan, np.inf, -np.inf]


def _adapter(seed=0, rules=RULES):
    return random_adapters(TREE, [rules], seed=seed)[0]


def _poison_factor(ad: lx.Adapter, path: str, role: int, value) -> lx.Adapter:
    a, b = ad.weights[path]
    f = [a, b]
    f[role] = f[role].at[(0,) * f[role].ndim].set(value)
    return lx.Adapter(
        {**ad.weights, path: tuple(f)},
        ad.layouts,
        ad.ranks,
        ad.alphas,
        ad.use_rslora,
        ad.lookup_only,
    )


@pytest.mark.parametrize("value", POISONS)
@pytest.mark.parametrize("role", [0, 1], ids=["a", "b"])
def test_stack_adapters_refuses_a_non_finite_factor(value, role):
    bad = _poison_factor(_adapter(1), "head", role, value)
    with pytest.raises(lx.NonFiniteAdapterError) as info:
        lx.stack_adapters([_adapter(0), bad], names=["fine", "broken"])
    msg = str(info.value)
    assert "'broken'" in msg and "'head'" in msg and f"`{'ab'[role]}`" in msg


@pytest.mark.parametrize("value", POISONS)
def test_a_non_finite_alpha_is_refused(value):
    ad = _adapter()
    bad = lx.Adapter(ad.weights, ad.layouts, ad.ranks, (2.0, value), ad.use_rslora)
    with pytest.raises(lx.NonFiniteAdapterError, match="alpha at 'head'"):
        lx.stack_adapters([bad])
    bank = lx.AdapterBank(TREE, RULES, slots=2)
    with pytest.raises(lx.NonFiniteAdapterError, match="alpha at 'head'"):
        bank.add("bad", bad)


@pytest.mark.parametrize("kind", ["dora", "ia3", "vera"])
def test_non_finite_variant_vectors_are_refused(kind):
    rules = [lx.LoraRule("^head$", rank=0 if kind == "ia3" else 2, variant=kind)]
    ad = lx.init_adapter(TREE, rules, key=jax.random.key(0))
    field = {"dora": "magnitudes", "ia3": "out_scales", "vera": "vera"}[kind]
    vec = getattr(ad, field)["head"]
    if kind == "vera":
        vec = (vec[0].at[0].set(jnp.nan), vec[1])
    else:
        vec = vec.at[0].set(jnp.inf)
    bad = eqx.tree_at(lambda x: getattr(x, field), ad, {"head": vec})
    with pytest.raises(lx.NonFiniteAdapterError, match="at 'head'"):
        lx.stack_adapters([bad])


def test_bank_add_refuses_non_finite_factors():
    bank = lx.AdapterBank(TREE, RULES, slots=2)
    with pytest.raises(lx.NonFiniteAdapterError, match="`b` at 'embed'"):
        bank.add("x", _poison_factor(_adapter(), "embed", 1, np.nan))


@pytest.mark.parametrize("stack", [False, True])
def test_load_adapter_refuses_a_saved_non_finite_adapter(tmp_path, stack):
    """A diverged adapter can be saved (to look at it), not loaded to serve."""
    bad = _poison_factor(_adapter(1), "embed", 0, np.inf)
    if stack:
        # Built around the stack's own check, as a checkpoint written by an
        # older version (or a buggy writer) could hold it.
        good = lx.stack_adapters([_adapter(0), _adapter(1)], names=["ok", "bad"])
        a = good.weights["embed"][0]
        poisoned = eqx.tree_at(
            lambda s: s.weights["embed"][0], good, a.at[1, 0, 0].set(jnp.inf)
        )
        lx.save_adapter(tmp_path / "ck", poisoned)
        match = r"adapter 1 \('bad'\).*`a` at 'embed'"
    else:
        lx.save_adapter(tmp_path / "ck", bad)
        match = "`a` at 'embed'"
    with pytest.raises(lx.NonFiniteAdapterError, match=match):
        lx.load_adapter(tmp_path / "ck", TREE)


def test_load_peft_adapter_refuses_non_finite_weights_and_alpha(tmp_path):
    lx.save_peft_adapter(tmp_path / "ok", _adapter())
    assert lx.load_peft_adapter(tmp_path / "ok", TREE).paths
    # A NaN in one tensor.
    tensors, meta = read_safetensors(tmp_path / "ok" / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_B" in k or "lora_embedding_B" in k)[0]
    bad = dict(tensors)
    bad[key] = bad[key].copy()
    bad[key].flat[0] = np.nan
    (tmp_path / "w").mkdir()
    write_safetensors(tmp_path / "w" / "adapter_model.safetensors", bad, meta)
    cfg = (tmp_path / "ok" / "adapter_config.json").read_text()
    (tmp_path / "w" / "adapter_config.json").write_text(cfg)
    with pytest.raises(lx.NonFiniteAdapterError, match="`b` at"):
        lx.load_peft_adapter(tmp_path / "w", TREE)
    # A NaN `lora_alpha` (JSON allows the token NaN).
    (tmp_path / "alpha").mkdir()
    write_safetensors(tmp_path / "alpha" / "adapter_model.safetensors", tensors, meta)
    config = json.loads(cfg)
    config["lora_alpha"] = float("nan")
    config.pop("alpha_pattern", None)
    (tmp_path / "alpha" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lx.NonFiniteAdapterError, match="alpha"):
        lx.load_peft_adapter(tmp_path / "alpha", TREE)
