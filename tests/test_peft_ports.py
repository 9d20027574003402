"""PEFT adapters as users have them, on every `transformers` Flax port with a torch
twin.

Golden fixtures (`tests/fixtures/peft_ports/<arch>/`, made by real PEFT with
`make_peft_port_fixtures.py`): per architecture a tiny base model converted to
Flax, an adapter made with PEFT's default `LoraConfig()` (the architecture's own
`target_modules`), one with a config from PEFT's guides (`all-linear`, or the
attention and MLP names, rsLoRA), and PEFT's mixed batch of them with base rows.
Each adapter loads in one line, with no `key_map` and no `orientation`, and our
mixed batch on the Flax port equals PEFT's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import lorax_arrays as lx

PORTS = Path(__file__).parent / "fixtures" / "peft_ports"
RTOL = 2e-4
# GPT-Neo ties lm_head to the embedding table: its Flax tree has no head weight.
HEAD_KEY_MAP = {"lm_head": "transformer/wte/embedding"}


def _clip_compat(clip=jnp.clip):
    """`jnp.clip` that also takes the `a_min` / `a_max` keywords JAX removed, which
    the Flax T5 port's `_relative_position_bucket` still passes (patched in for
    every test here: it computes what `jnp.clip` does)."""

    def compat(x, min=None, max=None, *, a_min=None, a_max=None):  # noqa: A002
        return clip(x, a_min if min is None else min, a_max if max is None else max)

    return compat


# arch -> (Flax class, its keyword arguments, what the forward returns)
FLAX = {
    "gpt2": (tf.FlaxGPT2LMHeadModel, {}, "logits"),
    "gpt_neo": (tf.FlaxGPTNeoForCausalLM, {}, "logits"),
    "gptj": (tf.FlaxGPTJForCausalLM, {}, "logits"),
    "opt": (tf.FlaxOPTForCausalLM, {}, "logits"),
    "bart": (tf.FlaxBartForConditionalGeneration, {}, "logits"),
    "t5": (tf.FlaxT5ForConditionalGeneration, {}, "logits"),
    "mt5": (tf.FlaxMT5ForConditionalGeneration, {}, "logits"),
    "llama": (tf.FlaxLlamaForCausalLM, {}, "logits"),
    "mistral": (tf.FlaxMistralForCausalLM, {}, "logits"),
    "gemma": (tf.FlaxGemmaForCausalLM, {}, "logits"),
    "bloom": (tf.FlaxBloomForCausalLM, {}, "logits"),
    "bert": (tf.FlaxBertForMaskedLM, {}, "logits"),
    "roberta": (tf.FlaxRobertaForMaskedLM, {}, "logits"),
    "distilbert": (tf.FlaxDistilBertForMaskedLM, {}, "logits"),
    "electra": (tf.FlaxElectraForMaskedLM, {}, "logits"),
    "whisper": (tf.FlaxWhisperForConditionalGeneration, {}, "logits"),
    "vit": (tf.FlaxViTModel, {"add_pooling_layer": False}, "last_hidden_state"),
    "albert": (tf.FlaxAlbertForMaskedLM, {}, "logits"),
    "resnet": (tf.FlaxResNetModel, {}, "last_hidden_state"),
}
INPUTS = ("input_ids", "decoder_input_ids", "input_features", "pixel_values")


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(autouse=True)
def _t5_clip(monkeypatch):
    monkeypatch.setattr(jnp, "clip", _clip_compat())


@functools.cache
def _load(arch: str):
    cls, kw, out = FLAX[arch]
    model, params = cls.from_pretrained(PORTS / arch / "base", _do_init=False, **kw)
    golden = np.load(PORTS / arch / "logits.npz")
    inputs = {
        k: jnp.asarray(golden[k], jnp.int32 if k.endswith("ids") else jnp.float32)
        for k in INPUTS
        if k in golden
    }
    if arch == "electra":
        # The Flax Electra port defaults token_type_ids to ones, torch to zeros.
        inputs["token_type_ids"] = jnp.zeros_like(inputs["input_ids"])
    return model, params, golden, inputs, out


def _adapter_names(golden) -> list[str]:
    return [
        n for n in dict.fromkeys(str(r) for r in golden["names"]) if n != "__base__"
    ]


def _kernels(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): x.shape
        for path, x in flat
        if getattr(path[-1], "key", None) == "kernel" and x.ndim == 2
    }


@pytest.mark.parametrize("arch", list(FLAX))
def test_mixed_batch_equals_peft(arch):
    """PEFT's default config and a guide's, each loaded in one line, with base rows
    in one jitted call of the Flax port, equal PEFT's mixed batch; and every 2-D
    kernel they adapt is read `(in, out)` (GPT-2's `Conv1D` `(out, in)`)."""
    model, params, golden, inputs, out_key = _load(arch)
    names = _adapter_names(golden)
    adapters = [
        lx.load_peft_adapter(
            PORTS / arch / "adapters" / n,
            params,
            key_map=HEAD_KEY_MAP if n == "head" else None,
        )
        for n in names
    ]
    stack = lx.stack_adapters(adapters, names=names)
    rows = [str(r) for r in golden["names"]]
    indices = stack.indices(rows)
    if arch == "opt":
        # OPT flattens (batch * seq, hidden) into fc1 / fc2: per-token indices.
        indices = jnp.broadcast_to(indices[:, None], inputs["input_ids"].shape)
    forward = jax.jit(lx.quaxify(lambda p, x: getattr(model(**x, params=p), out_key)))
    out = forward(lx.loraify(params, stack, indices), inputs)
    err = rel_err(out, golden["mixed"])
    print(f"{arch}: max rel err {err:.1e}")
    assert err < RTOL, (arch, err)
    for i, row in enumerate(rows):
        if row == "__base__":
            assert rel_err(out[i], golden["base"][i]) < RTOL
        else:  # the adapter really changes the model
            assert rel_err(golden["mixed"][i], golden["base"][i]) > 1e-2

    conv1d = arch == "gpt2"  # PEFT's `fan_in_fan_out`: Flax GPT-2 keeps (out, in)
    kernels = _kernels(params)
    for ad in adapters:
        for lay in ad.layouts:
            if lay.path in kernels:
                assert lay.in_axes == ((1,) if conv1d else (0,)), (arch, lay)
            elif lay.path.endswith("/kernel") and len(lay.shape) == 4:
                assert lay.out_axes == (3,), (arch, lay)  # Flax Conv: (*k, in, out)


@pytest.mark.parametrize("arch", [a for a in FLAX if a not in ("gpt2", "resnet")])
def test_transposed_kernels_are_refused(arch):
    """The wrong orientation cannot come by default: on a tree whose kernels are
    transposed (a model with the other convention), an adapter with a non-square
    target is refused, never read the other way round. A square-only adapter
    (PEFT's default q/v) loads by the convention, `(in, out)`, as before."""
    _, params, golden, _, _ = _load(arch)
    kernels = _kernels(params)
    flipped = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x.T if getattr(path[-1], "key", None) == "kernel" and x.ndim == 2 else x
        ),
        params,
    )
    for name in _adapter_names(golden):
        if name == "head":
            continue
        path = PORTS / arch / "adapters" / name
        ad = lx.load_peft_adapter(path, params)
        shapes = [lay.shape for lay in ad.layouts if lay.path in kernels]
        if any(s[0] != s[1] for s in shapes):
            with pytest.raises(lx.PeftFormatError, match="Flax kernel"):
                lx.load_peft_adapter(path, flipped)
        else:
            again = lx.load_peft_adapter(path, flipped)
            assert [lay.in_axes for lay in again.layouts] == [
                lay.in_axes for lay in ad.layouts
            ]


def test_gpt2_fan_in_fan_out_goes_by_the_shapes():
    """GPT-2's `Conv1D` (`fan_in_fan_out`) has no fixed convention: a tree with
    the kernels transposed to `(in, out)` loads, read `(in, out)` throughout (the
    square `c_proj` too, as the others show)."""
    _, params, golden, _, _ = _load("gpt2")
    flipped = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x.T if getattr(path[-1], "key", None) == "kernel" and x.ndim == 2 else x
        ),
        params,
    )
    for name in _adapter_names(golden):
        ad = lx.load_peft_adapter(PORTS / "gpt2" / "adapters" / name, flipped)
        assert {lay.in_axes for lay in ad.layouts} == {(0,)}


def test_tied_head_needs_key_map():
    """GPT-Neo's lm_head is tied: an adapter on it names the table and the fix,
    and with that key_map it changes the head only (checked against PEFT in the
    mixed batch above)."""
    _, params, _, _, _ = _load("gpt_neo")
    path = PORTS / "gpt_neo" / "adapters" / "head"
    with pytest.raises(
        lx.PeftFormatError,
        match=r"no leaf for it.*'transformer/wte/embedding'.*"
        r"key_map=\{'lm_head': 'transformer/wte/embedding'\}",
    ):
        lx.load_peft_adapter(path, params)
    ad = lx.load_peft_adapter(path, params, key_map=HEAD_KEY_MAP)
    flags = dict(zip(ad.paths, ad.head_only))
    assert flags.pop("transformer/wte/embedding") and not any(flags.values())
