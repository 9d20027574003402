"""PEFT's trainable tokens (`trainable_token_indices`): an adapter's own rows of
the embedding table for a few tokens, loaded as the exact rank-n update of the
table and served per row, on lookups and (GPT-2) on the head tied to the table,
next to the adapter's LoRA, other adapters and base rows; against PEFT's logits
(golden fixtures: `tests/fixtures/make_trainable_tokens_fixtures.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx

HERE = Path(__file__).parent / "fixtures" / "peft" / "trainable_tokens"
RTOL = 2e-4
ADAPTERS = {"gpt2": ["t1", "t2"], "llama": ["t1"]}


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _model(name):
    from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM

    cls = {"gpt2": FlaxGPT2LMHeadModel, "llama": FlaxLlamaForCausalLM}[name]
    return cls.from_pretrained(HERE / name / "base")


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_trainable_tokens_batch_equals_peft(model_name):
    model = _model(model_name)
    golden = np.load(HERE / model_name / "logits.npz")
    names = ADAPTERS[model_name]
    adapters = [
        lx.load_peft_adapter(HERE / model_name / "adapters" / n, model.params)
        for n in names
    ]
    table = next(p for p in adapters[0].paths if "embed" in p or "wte" in p)
    config = json.loads(
        (HERE / model_name / "adapters" / "t1" / "adapter_config.json").read_text()
    )
    ids = config["trainable_token_indices"]
    # Read by lookups and by a tied head alike: not lookup-only, not head-only.
    j = adapters[0].paths.index(table)
    assert adapters[0].ranks[j] == len(ids)
    assert not adapters[0].lookup_only[j] and not adapters[0].head_only[j]
    stack = lx.stack_adapters(adapters, names=names)
    rows = [*names, None, *names, *names][:4]
    tokens = jnp.asarray(golden["input_ids"], jnp.int32)
    fwd = jax.jit(lx.quaxify(lambda p, t: model(t, params=p).logits))
    out = np.asarray(fwd(lx.loraify(model.params, stack, stack.indices(rows)), tokens))
    for i, row in enumerate(rows):
        want = golden["base"][i] if row is None else golden[row][i]
        assert rel_err(out[i], want) < RTOL, (model_name, i, row)
        if row is not None:
            assert rel_err(golden[row][i], golden["base"][i]) > 1e-2
    # The table's update is exactly "these rows replaced": merged in NumPy.
    e = np.asarray(
        model.params[table.split("/")[0]][table.split("/")[1]]["embedding"]
        if model_name == "gpt2"
        else model.params["model"]["embed_tokens"]["embedding"],
        np.float64,
    )
    a, b = (np.asarray(x, np.float64) for x in adapters[0].weights[table])
    merged = e + adapters[0].scale(table) * (a @ b)
    changed = np.flatnonzero(np.abs(merged - e).max(1) > 0)
    assert sorted(changed.tolist()) == sorted(ids)


def test_trainable_tokens_round_trip_and_refusals(tmp_path):
    model = _model("llama")
    src = HERE / "llama" / "adapters" / "t1"
    ad = lx.load_peft_adapter(src, model.params)
    lx.save_adapter(tmp_path / "ck", ad)
    assert lx.load_adapter(tmp_path / "ck").fingerprint() == ad.fingerprint()

    def copy(name, cfg_edit=None, drop_rows=False, rows_edit=None):
        from lorax_arrays._io.safetensors import read_safetensors, write_safetensors

        dst = tmp_path / name
        dst.mkdir()
        tensors, meta = read_safetensors(src / "adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("trainable_tokens_delta"))
        if drop_rows:
            tensors.pop(key)
        if rows_edit is not None:
            tensors[key] = rows_edit(tensors[key])
        write_safetensors(dst / "adapter_model.safetensors", tensors, meta)
        cfg = json.loads((src / "adapter_config.json").read_text())
        if cfg_edit is not None:
            cfg_edit(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
        return dst

    cases = [
        (dict(drop_rows=True), "no rows in the file"),
        (
            dict(cfg_edit=lambda c: c.update(trainable_token_indices=[3, 3, 7, 9])),
            "distinct",
        ),
        (
            dict(cfg_edit=lambda c: c.update(trainable_token_indices="3")),
            "expected a list",
        ),
        (
            dict(cfg_edit=lambda c: c.update(trainable_token_indices=[3, 7, 11, 99])),
            "beyond",
        ),
        (
            dict(cfg_edit=lambda c: c.update(trainable_token_indices=[3, 7])),
            "rows of shape",
        ),
        (
            dict(cfg_edit=lambda c: c.update(trainable_token_indices={"lm_head": [3]})),
            "no rows in the file .* for 'lm_head'",
        ),
        (dict(rows_edit=lambda r: np.asarray(r, np.int32)), "floating point"),
    ]
    for i, (kw, match) in enumerate(cases):
        with pytest.raises(lx.PeftFormatError, match=match):
            lx.load_peft_adapter(copy(f"c{i}", **kw), model.params)


def test_export_of_an_every_read_table_update_needs_untied(tmp_path):
    """PEFT's embedding LoRA changes lookups only: an update of every read of a
    table (trainable tokens, tied into GPT-2's head) is refused, and written
    only when the caller says no head reads the table."""
    gpt2 = _model("gpt2")
    tied = lx.load_peft_adapter(HERE / "gpt2" / "adapters" / "t1", gpt2.params)
    with pytest.raises(ValueError, match="untied_embeddings=True"):
        lx.save_peft_adapter(tmp_path / "g", tied)
    llama = _model("llama")
    ad = lx.load_peft_adapter(HERE / "llama" / "adapters" / "t1", llama.params)
    lx.save_peft_adapter(tmp_path / "l", ad, untied_embeddings=True)
    back = lx.load_peft_adapter(tmp_path / "l", llama.params)
    table = "model/embed_tokens/embedding"
    for x, y in zip(back.weights[table], ad.weights[table]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y))
