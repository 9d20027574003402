"""Activated LoRA (aLoRA, PEFT's `alora_invocation_tokens`): loaded from PEFT,
placed per token from the requests' `input_ids` by a stack and a bank, served in
one batch with a plain LoRA and base rows, equal to PEFT's own mixed batch
(golden fixtures: `tests/fixtures/make_alora_fixtures.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from lorax_arrays._adapters.alora import activation_start

HERE = Path(__file__).parent / "fixtures" / "peft" / "alora"
RTOL = 2e-4
NAMES = ("a1", "a2", "l1")


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def setup():
    from transformers import FlaxLlamaForCausalLM

    model = FlaxLlamaForCausalLM.from_pretrained(HERE / "base")
    adapters = {
        n: lx.load_peft_adapter(HERE / "adapters" / n, model.params) for n in NAMES
    }
    fwd = jax.jit(lx.quaxify(lambda p, ids: model(ids, params=p).logits))
    return model, adapters, fwd, np.load(HERE / "logits.npz")


def _reference_indices(ids, rows, position, tokens):
    """Per-token indices by the definition, written plainly: each aLoRA row is
    -1 before the start of the last full occurrence of its tokens, else -1."""
    out = np.full(ids.shape, -1, np.int32)
    for i, name in enumerate(rows):
        if name == "__base__":
            continue
        t = tokens[name]
        if t is None:
            out[i] = position[name]
            continue
        starts = [
            s
            for s in range(ids.shape[1] - len(t) + 1)
            if list(ids[i, s : s + len(t)]) == list(t)
        ]
        if starts:
            out[i, max(starts) :] = position[name]
    return out


def test_alora_batch_equals_peft(setup):
    model, adapters, fwd, golden = setup
    assert adapters["a1"].invocation_tokens == (11, 12, 13)
    assert adapters["a2"].invocation_tokens == (20,)
    assert adapters["l1"].invocation_tokens is None
    rows = [str(n) for n in golden["names"]]
    ids = np.asarray(golden["input_ids"])
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=list(NAMES))
    idx = stack.indices(rows, input_ids=ids)
    assert idx.shape == ids.shape
    tokens = {n: adapters[n].invocation_tokens for n in NAMES}
    ref_idx = _reference_indices(ids, rows, {n: i for i, n in enumerate(NAMES)}, tokens)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    out = np.asarray(fwd(lx.loraify(model.params, stack, idx), jnp.asarray(ids)))
    assert rel_err(out, golden["mixed"]) < RTOL
    # Before its invocation an aLoRA row is the base model (causal attention:
    # nothing later reaches it), and the cut-off row (2) is the base throughout;
    # from the invocation on the adapter really acts.
    for i in range(len(rows)):
        on = np.asarray(ref_idx[i]) >= 0
        np.testing.assert_allclose(out[i][~on], golden["base"][i][~on], atol=2e-5)
        if on.any():
            assert np.abs(golden["mixed"][i][on] - golden["base"][i][on]).max() > 1e-2
    assert not (ref_idx[2] >= 0).any()
    # The bank places them the same way and serves the same rows.
    bank = lx.AdapterBank(
        model.params, [lx.LoraRule(r"(q|k|v|o|up|down)_proj", rank=4)], slots=3
    )
    for n in NAMES:
        bank.add(n, adapters[n])
    bidx = bank.indices(rows, input_ids=ids)
    assert bidx.shape == ids.shape
    got = np.asarray(fwd(lx.loraify(model.params, bank.served(bidx)), jnp.asarray(ids)))
    np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)


def test_decode_after_the_prompt_uses_the_last_column(setup):
    """Decoding after a prompt: a row is adapted iff its invocation occurred in
    the prompt, which is the last column of the prompt's indices."""
    _, adapters, _, golden = setup
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=list(NAMES))
    rows = [str(n) for n in golden["names"]]
    idx = np.asarray(stack.indices(rows, input_ids=golden["input_ids"]))
    last = idx[:, -1]
    assert last.tolist() == [0, 0, -1, 2, 1, 1, -1]


def test_alora_needs_the_tokens_and_refuses_bad_ones(setup):
    model, adapters, _, golden = setup
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=list(NAMES))
    with pytest.raises(ValueError, match="'a1' is an activated LoRA.*input_ids="):
        stack.indices(["a1", "l1"])
    assert stack.indices(["l1", None]).tolist() == [2, -1]  # no aLoRA: per row
    with pytest.raises(ValueError, match="one row per request \\(2\\)"):
        stack.indices(["a1", "l1"], input_ids=np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        stack.indices(["a1", "l1"], input_ids=np.zeros((2, 4), np.float32))

    @jax.jit
    def traced(ids):
        return stack.indices(["a1", "l1"], input_ids=ids)

    with pytest.raises(TypeError, match="traced"):
        traced(jnp.zeros((2, 4), jnp.int32))
    bank = lx.AdapterBank(
        model.params, [lx.LoraRule(r"(q|k|v|o|up|down)_proj", rank=4)], slots=2
    )
    bank.add("a1", adapters["a1"])
    with pytest.raises(ValueError, match="'a1' is an activated LoRA"):
        bank.indices(["a1"])
    with pytest.raises(ValueError, match="one name per request"):
        bank.indices([["a1", "a1"]], input_ids=np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="invocation_tokens is"):
        lx.Adapter(
            adapters["l1"].weights,
            adapters["l1"].layouts,
            adapters["l1"].ranks,
            adapters["l1"].alphas,
            adapters["l1"].use_rslora,
            invocation_tokens=[],
        )


def test_invocation_tokens_survive_checkpoints_and_export(setup, tmp_path):
    model, adapters, _, _ = setup
    a1 = adapters["a1"]
    lx.save_adapter(tmp_path / "one", a1)
    back = lx.load_adapter(tmp_path / "one")
    assert back.invocation_tokens == (11, 12, 13)
    assert back.fingerprint() == a1.fingerprint()
    plain = lx.Adapter(a1.weights, a1.layouts, a1.ranks, a1.alphas, a1.use_rslora)
    assert plain.fingerprint() != a1.fingerprint()
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=list(NAMES))
    lx.save_adapter(tmp_path / "stack", stack)
    sback = lx.load_adapter(tmp_path / "stack")
    assert sback.invocation_tokens == ((11, 12, 13), (20,), None)
    assert sback["a2"].invocation_tokens == (20,)
    # PEFT's format: the config carries the tokens and the task PEFT needs.
    lx.save_peft_adapter(tmp_path / "peft", a1)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["alora_invocation_tokens"] == [11, 12, 13]
    assert cfg["task_type"] == "CAUSAL_LM"
    again = lx.load_peft_adapter(tmp_path / "peft", model.params)
    assert again.invocation_tokens == (11, 12, 13)


@pytest.mark.parametrize(
    "tokens, match", [([], "non-empty"), ([1, "x"], "non-empty"), (7, "non-empty")]
)
def test_malformed_invocation_tokens_in_a_peft_config(setup, tmp_path, tokens, match):
    model = setup[0]
    src = HERE / "adapters" / "a1"
    dst = tmp_path / "bad"
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes()
    )
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["alora_invocation_tokens"] = tokens
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lx.PeftFormatError, match=f"alora_invocation_tokens.*{match}"):
        lx.load_peft_adapter(dst, model.params)


@settings(max_examples=60, deadline=None)
@given(
    row=st.lists(st.integers(0, 3), min_size=0, max_size=12),
    tokens=st.lists(st.integers(0, 3), min_size=1, max_size=3),
)
def test_activation_start_is_the_last_full_occurrence(row, tokens):
    """Against PEFT's definition, written plainly: the start of the last complete
    occurrence, else the row's length (nowhere)."""
    arr = np.asarray(row, np.int64)
    k = len(tokens)
    starts = [s for s in range(len(row) - k + 1) if row[s : s + k] == tokens]
    want = max(starts) if starts else len(row)
    assert activation_start(arr, tuple(tokens)) == want
