"""PEFT's LoHa and LoKr through `lx.load_peft_adapter`, as exact plain LoRA
factors: the loaded product against the update computed from the files, one
mixed batch (with a plain LoRA and base rows) against real PEFT's logits
(`tests/fixtures/peft/llama/loha_lokr`, made by
`tests/fixtures/make_loha_lokr_fixtures.py`), layer stacks, and the refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._io.safetensors import write_safetensors
from tests.peft_helpers import (
    PREFIX as P,
    adapter_config,
    adapter_tensors,
    check_batch_equals_peft,
    export_for_peft,
    flax_kernel_path,
    module_names,
    rel_err,
)

HERE = Path(__file__).parent / "fixtures" / "peft" / "llama"
FIX = HERE / "loha_lokr"
LORA = HERE / "variants" / "adapters" / "lora"


@pytest.fixture(scope="module")
def llama():
    return export_for_peft.load_base("llama")


def _tensors(name: str) -> dict[str, np.ndarray]:
    return adapter_tensors(FIX, name)


def _config(name: str) -> dict:
    return adapter_config(FIX, name)


def _pattern(cfg: dict, key: str, module: str, default):
    """PEFT's `get_pattern_key`, written out independently for the fixtures'
    simple patterns."""
    for k, v in (cfg.get(key) or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _delta_loha(t: dict, cfg: dict, m: str) -> np.ndarray:
    """PEFT's `HadaWeight`: (w1_a w1_b) * (w2_a w2_b) * alpha / r, (out, in)."""
    g = {
        k: t[f"{P}{m}.hada_{k}"].astype(np.float64)
        for k in ("w1_a", "w1_b", "w2_a", "w2_b")
    }
    r = _pattern(cfg, "rank_pattern", m, cfg["r"])
    alpha = _pattern(cfg, "alpha_pattern", m, cfg["alpha"])
    return (g["w1_a"] @ g["w1_b"]) * (g["w2_a"] @ g["w2_b"]) * (alpha / r)


def _delta_lokr(t: dict, cfg: dict, m: str) -> np.ndarray:
    """PEFT's LoKr `get_delta_weight`: kron(w1, w2) * alpha / r, (out, in)."""
    ws = []
    for w in ("w1", "w2"):
        key = f"{P}{m}.lokr_{w}"
        if key in t:
            ws.append(t[key].astype(np.float64))
        else:
            ws.append(
                t[f"{key}_a"].astype(np.float64) @ t[f"{key}_b"].astype(np.float64)
            )
    r = _pattern(cfg, "rank_pattern", m, cfg["r"])
    alpha = _pattern(cfg, "alpha_pattern", m, cfg["alpha"])
    return np.kron(*ws) * (alpha / r)


def _product(ad, p: str) -> np.ndarray:
    a, b = (np.asarray(x, np.float64) for x in ad.weights[p])
    return ad.scale(p) * (a @ b)  # (in, out)


# ----------------------------------------------------------------------------
# The loaded factors are the update, exactly (to float32 rounding of factors).


@pytest.mark.parametrize(
    "name, suffix, delta, rank",
    [
        ("loha", ".hada_w1_a", _delta_loha, lambda m: 9 if "down_proj" in m else 16),
        ("lokr", ".lokr_w1", _delta_lokr, lambda m: 8),  # rank(w1) 2 x rank(w2) 4
    ],
)
def test_factors_equal_peft_update(llama, name, suffix, delta, rank):
    t, cfg = _tensors(name), _config(name)
    ad = lx.load_peft_adapter(FIX / "adapters" / name, llama.params)
    modules = module_names(t, suffix)
    assert len(modules) in (4, 6) and sorted(ad.paths) == sorted(
        map(flax_kernel_path, modules)
    )
    for m in modules:
        p = flax_kernel_path(m)
        assert ad.kind(p) == "lora" and ad.scale(p) == 1.0
        assert ad.ranks[ad.paths.index(p)] == rank(m), m
        want = delta(t, cfg, m).T  # Flax (in, out)
        assert rel_err(_product(ad, p), want) < 1e-6, m
    if name == "lokr":  # the fixture has one full and one low-rank factor
        assert any(k.endswith(".lokr_w1") for k in t)
        assert any(k.endswith(".lokr_w2_a") for k in t)
        assert not any(k.endswith((".lokr_w2", ".lokr_w1_a")) for k in t)


# ----------------------------------------------------------------------------
# LoHa, LoKr and a plain LoRA in one jitted batch with base rows, against PEFT's
# logits of each adapter alone.


def test_mixed_batch_equals_peft(llama):
    names = ["loha", "lokr", "lora"]
    adapters = [
        lx.load_peft_adapter(FIX / "adapters" / n, llama.params) for n in names[:2]
    ] + [lx.load_peft_adapter(LORA, llama.params)]
    check_batch_equals_peft(llama, FIX / "logits.npz", adapters, names)


# ----------------------------------------------------------------------------
# Synthetic adapters: layer stacks, full / rank-deficient LoKr factors, the
# rank cap at min(out, in).


def _write(path: Path, peft_type: str, tensors: dict, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": peft_type, "r": 2, "alpha": 3, "target_modules": ["q_proj"]}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    write_safetensors(
        path / "adapter_model.safetensors",
        {f"{P}{k}": v.astype(np.float32) for k, v in tensors.items()},
    )
    return path


def test_stacked_loha(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8, 6)).astype(np.float32)  # (layer, in, out)
    tree = {"layers": {"q_proj": {"kernel": jnp.asarray(w)}}}
    f = {
        k: rng.standard_normal(s)
        for k, s in (
            ("w1_a", (6, 2)),
            ("w1_b", (2, 8)),
            ("w2_a", (6, 2)),
            ("w2_b", (2, 8)),
        )
    }
    t = {f"layers.1.q_proj.hada_{k}": v for k, v in f.items()}
    ad = lx.load_peft_adapter(_write(tmp_path, "LOHA", t), tree)
    p = "layers/q_proj/kernel"
    assert ad.layouts[0].stack_axes == (0,) and ad.ranks == (4,)
    a, b = (np.asarray(x, np.float64) for x in ad.weights[p])
    prod = ad.scale(p) * np.einsum("lir,lro->lio", a, b)
    f64 = {k: v.astype(np.float32).astype(np.float64) for k, v in f.items()}
    want = (f64["w1_a"] @ f64["w1_b"]) * (f64["w2_a"] @ f64["w2_b"]) * 1.5
    assert rel_err(prod[1], want.T) < 1e-6
    assert not prod[0].any() and not prod[2].any()


def test_lokr_full_factors_and_rank_cap(tmp_path):
    rng = np.random.default_rng(1)
    tree = {"q_proj": {"kernel": jnp.zeros((12, 6))}}  # in 12 = 3 * 4, out 6 = 2 * 3
    w1 = rng.standard_normal((2, 3))  # full rank 2
    # Rank 1 of (3, 4), exactly in float32 (rows x, 2x, -x): the thin SVD.
    x = rng.standard_normal(4).astype(np.float32)
    w2 = np.stack([x, 2 * x, -x])
    ad = lx.load_peft_adapter(
        _write(tmp_path / "a", "LOKR", {"q_proj.lokr_w1": w1, "q_proj.lokr_w2": w2}),
        tree,
    )
    want = np.kron(w1.astype(np.float32), w2.astype(np.float32)) * 1.5
    assert ad.ranks == (2,)  # rank(w1) 2 x rank(w2) 1
    assert rel_err(_product(ad, "q_proj/kernel"), want.T) < 1e-6
    # Two full-rank factors: rank 2 x 3 = 6 = min(out, in), kept.
    w2 = rng.standard_normal((3, 4))
    ad = lx.load_peft_adapter(
        _write(tmp_path / "b", "LOKR", {"q_proj.lokr_w1": w1, "q_proj.lokr_w2": w2}),
        tree,
    )
    want = np.kron(w1.astype(np.float32), w2.astype(np.float32)) * 1.5
    assert ad.ranks == (6,)
    assert rel_err(_product(ad, "q_proj/kernel"), want.T) < 1e-6
    # LoHa with r² = 16 > min(out, in) = 6: the update itself, rank 6.
    f = {
        k: rng.standard_normal(s)
        for k, s in (
            ("w1_a", (6, 4)),
            ("w1_b", (4, 12)),
            ("w2_a", (6, 4)),
            ("w2_b", (4, 12)),
        )
    }
    ad = lx.load_peft_adapter(
        _write(
            tmp_path / "c", "LOHA", {f"q_proj.hada_{k}": v for k, v in f.items()}, r=4
        ),
        tree,
    )
    f = {k: v.astype(np.float32).astype(np.float64) for k, v in f.items()}
    want = (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"]) * 0.75
    assert ad.ranks == (6,)
    assert rel_err(_product(ad, "q_proj/kernel"), want.T) < 1e-6


# ----------------------------------------------------------------------------
# Refusals.


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIX / "adapters" / name, dst)
    return dst


@pytest.mark.parametrize(
    "name, extra, config, match",
    [
        ("loha", {"q_proj.hada_t1": (4, 4, 3, 3)}, None, "convolution's LoHa"),
        ("lokr", {"k_proj.lokr_t2": (4, 4, 3, 3)}, None, "convolution's LoKr"),
        ("loha", None, {"peft_type": "OFT"}, "peft_type is 'OFT'"),
        ("loha", {"q_proj.lokr_w1": (2, 2)}, None, "another PEFT method"),
        ("lokr", {"k_proj.lokr_w1_a": (2, 2)}, None, "expected lokr_w1, or"),
        ("loha", None, {"r": 5}, "LoHa rank 4 / 4 in the file but 5"),
        ("loha", None, {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_refusals(llama, tmp_path, name, extra, config, match):
    path = _copy(name, tmp_path)
    if extra is not None:
        t = _tensors(name)
        for k, shape in extra.items():
            t[f"{P}model.layers.0.self_attn.{k}"] = np.ones(shape, np.float32)
        write_safetensors(path / "adapter_model.safetensors", t)
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(config)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lx.PeftFormatError, match=match):
        lx.load_peft_adapter(path, llama.params)


def test_lokr_on_a_conv_kernel_is_refused(tmp_path):
    # A non-effective conv LoKr has 2-D factors over in * kh * kw: the 4-D leaf
    # says it is not a linear weight.
    tree = {"q_proj": {"kernel": jnp.zeros((3, 3, 4, 6))}}
    rng = np.random.default_rng(2)
    t = {
        "q_proj.lokr_w1": rng.standard_normal((2, 2)),
        "q_proj.lokr_w2": rng.standard_normal((3, 18)),
    }
    with pytest.raises(lx.PeftFormatError, match="2-D linear weights"):
        lx.load_peft_adapter(_write(tmp_path, "LOKR", t), tree)
