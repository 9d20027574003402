"""PEFT's `modules_to_save` (a classification head trained in full) served per
row: each saved Linear's weight as an exact full-rank LoRA, its bias as a
`RowBias` update. Against PEFT 0.21.2's own logits (golden fixtures:
`tests/fixtures/make_seq_cls_fixtures.py`: a tiny BERT, whose saved `classifier`
is one Linear, against PEFT's own mixed batch, and a tiny RoBERTa, whose saved
`classifier` is two Linears, against PEFT's rows per adapter), and the bias rule
against NumPy in float64."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from lorax_arrays._adapters.targeting import LeafLayout
from lorax_arrays._io.safetensors import read_safetensors, write_safetensors

ROOT = Path(__file__).parent / "fixtures" / "peft" / "seq_cls"
HERE = ROOT / "roberta"
RTOL = 2e-4
NAMES = ("c1", "c2")
# Each model's saved head: its kernels and biases in the Flax tree.
HEADS = {
    "bert": (["classifier/kernel"], ["classifier/bias"]),
    "roberta": (
        ["classifier/dense/kernel", "classifier/out_proj/kernel"],
        ["classifier/dense/bias", "classifier/out_proj/bias"],
    ),
}


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _load(kind: str):
    import transformers

    cls = {
        "bert": transformers.FlaxBertForSequenceClassification,
        "roberta": transformers.FlaxRobertaForSequenceClassification,
    }[kind]
    here = ROOT / kind
    model = cls.from_pretrained(here / "base")
    adapters = {
        n: lx.load_peft_adapter(here / "adapters" / n, model.params) for n in NAMES
    }
    fwd = jax.jit(lx.quaxify(lambda p, ids: model(ids, params=p).logits))
    return model, adapters, fwd, np.load(here / "logits.npz")


@pytest.fixture(scope="module", params=sorted(HEADS))
def kind_setup(request):
    return request.param, _load(request.param)


@pytest.fixture(scope="module")
def setup():
    return _load("roberta")


def test_loaded_as_lora_leaves_and_bias_updates(kind_setup):
    kind, (_, adapters, _, _) = kind_setup
    kernels, biases = HEADS[kind]
    for c in adapters.values():
        assert set(kernels) <= set(c.paths)
        for path in kernels:
            assert c.scale(path) == 1.0
        # the out_proj / classifier: (16, 3), rank 3; RoBERTa's dense: rank 16
        assert c.ranks[c.paths.index(kernels[-1])] == 3
        assert sorted(c.bias_deltas) == biases
        assert all(np.abs(np.asarray(d)).max() > 0.1 for d in c.bias_deltas.values())


def test_mixed_batch_equals_peft(kind_setup):
    _, (model, adapters, fwd, ref) = kind_setup
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=NAMES)
    names = [str(n) for n in ref["names"]]
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    served = lx.loraify(model.params, stack, stack.indices(names))
    logits = np.asarray(fwd(served, ids))
    assert rel_err(logits, ref["mixed"]) < RTOL
    for i, n in enumerate(names):  # the test can fail: adapted rows differ
        gap = np.abs(ref["mixed"][i] - ref["base"][i]).max()
        assert (gap < 1e-6) == (n == "__base__"), (i, n)
        assert gap < 1e-6 or gap > 0.5
    # Another assignment, same program: every row adapter c2, then c1.
    for n in NAMES:
        again = fwd(lx.with_indices(served, stack.indices([n] * len(names))), ids)
        assert rel_err(again, ref[n]) < RTOL
    assert fwd._cache_size() == 1


def test_served_adapters_in_a_jitted_step(setup):
    model, adapters, _, ref = setup
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=NAMES)
    names = [str(n) for n in ref["names"]]
    step = jax.jit(
        lambda p, s, ids: lx.quaxify(lambda q, t: model(t, params=q).logits)(
            lx.loraify(p, s), ids
        )
    )
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    out = step(model.params, stack.served(stack.indices(names)), ids)
    assert rel_err(out, ref["mixed"]) < RTOL


def test_merge_and_stack_round_trip(kind_setup):
    _, (model, adapters, _, ref) = kind_setup
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    for n in NAMES:
        merged = lx.merge(model.params, adapters[n])
        assert rel_err(model(ids, params=merged).logits, ref[n]) < RTOL
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=NAMES)
    for n in NAMES:  # (a stack keeps the union's order of the leaves)
        back, mine = stack[n], adapters[n]
        assert sorted(back.paths) == sorted(mine.paths)
        for p in mine.paths:
            for x, y in zip(back.weights[p], mine.weights[p]):
                np.testing.assert_array_equal(x, y)
        assert sorted(back.bias_deltas) == sorted(mine.bias_deltas)
        for p, d in mine.bias_deltas.items():
            np.testing.assert_array_equal(back.bias_deltas[p], d)


def test_fingerprint_sees_bias_updates(setup):
    _, adapters, _, _ = setup
    c1 = adapters["c1"]
    path = "classifier/out_proj/bias"
    other = eqx.tree_at(
        lambda a: a.bias_deltas[path], c1, c1.bias_deltas[path].at[0].add(1e-3)
    )
    assert other.fingerprint() != c1.fingerprint()


def test_bank_serves_heads(kind_setup):
    """An `AdapterBank` with `kinds=("lora", "bias")` serves the heads as the
    stack does, through loads, evictions and a compacted batch."""
    _, (model, adapters, fwd, ref) = kind_setup
    bank = lx.AdapterBank(
        model.params, lx.LoraRule("kernel$", rank=16), slots=1, kinds=("bias",)
    )
    for n in NAMES:
        bank.add(n, adapters[n])
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    names = [str(n) for n in ref["names"]]
    for n in (*NAMES, "c1"):  # one slot: each batch evicts the other adapter
        requests = [n, None, n, n, None]
        out = fwd(lx.loraify(model.params, bank, bank.indices(requests)), ids)
        want = np.where(
            np.asarray([r is None for r in requests])[:, None], ref["base"], ref[n]
        )
        assert rel_err(out, want) < RTOL
    bank2 = lx.AdapterBank(
        model.params, lx.LoraRule("kernel$", rank=16), slots=4, kinds=("bias",)
    )
    for n in NAMES:
        bank2.add(n, adapters[n])
    served = bank2.served(bank2.indices(names), compact=True)
    assert rel_err(fwd(lx.loraify(model.params, served), ids), ref["mixed"]) < RTOL
    served = bank2.served(bank2.indices(names))
    assert rel_err(fwd(lx.loraify(model.params, served), ids), ref["mixed"]) < RTOL
    # A bank's issued indices, decoded for the biases as for the factors.
    tree = lx.loraify(model.params, bank2, bank2.indices(names))
    assert rel_err(fwd(tree, ids), ref["mixed"]) < RTOL
    tree = lx.with_indices(tree, bank2.indices(["c2"] * len(names)))
    assert rel_err(fwd(tree, ids), ref["c2"]) < RTOL


def test_orbax_round_trip(setup, tmp_path):
    """`lx.save_adapter` keeps `bias_deltas` (format 3), for an adapter and a
    stack, bit for bit; a tree without the bias leaf is refused."""
    model, adapters, _, _ = setup
    c1 = adapters["c1"]
    stack = lx.stack_adapters([adapters[n] for n in NAMES], names=NAMES)
    lx.save_adapter(tmp_path / "one", c1)
    lx.save_adapter(tmp_path / "stack", stack)
    manifest = json.loads((tmp_path / "one" / "lorax_adapter.json").read_text())
    assert manifest["format_version"] == 3
    again = lx.load_adapter(tmp_path / "one", tree=model.params)
    assert again.fingerprint() == c1.fingerprint()
    back = lx.load_adapter(tmp_path / "stack", tree=model.params)
    for n in NAMES:
        assert back[n].fingerprint() == stack[n].fingerprint()
    for p, d in stack.bias_deltas.items():
        np.testing.assert_array_equal(back.bias_deltas[p], d)
    params = {k: v for k, v in model.params.items()}
    params["classifier"] = {
        k: {"kernel": v["kernel"]} for k, v in model.params["classifier"].items()
    }
    with pytest.raises(ValueError, match="modules_to_save"):
        lx.load_adapter(tmp_path / "one", tree=params)


def test_bank_export_and_combine_refuse(setup, tmp_path):
    model, adapters, _, _ = setup
    c1 = adapters["c1"]
    bank = lx.AdapterBank(model.params, lx.LoraRule("kernel$", rank=16), slots=2)
    with pytest.raises(ValueError, match="modules_to_save.*'bias'"):
        bank.add("c1", c1)
    with pytest.raises(ValueError, match="tree=params"):
        lx.save_peft_adapter(tmp_path / "peft", c1)
    with pytest.raises(ValueError, match="modules_to_save"):
        lx.combine_adapters([c1, adapters["c2"]], [0.5, 0.5], method="cat")


def test_export_round_trip(kind_setup, tmp_path):
    """Written back as PEFT saves it (the whole head, `modules_to_save`), read
    back to the same adapter and the same logits."""
    kind, (model, adapters, _, ref) = kind_setup
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    heads = [k.removesuffix("/kernel").replace("/", ".") for k in HEADS[kind][0]]
    for n in NAMES:
        lx.save_peft_adapter(tmp_path / n, adapters[n], tree=model.params)
        config = json.loads((tmp_path / n / "adapter_config.json").read_text())
        assert config["modules_to_save"] == heads
        tensors, _ = read_safetensors(tmp_path / n / "adapter_model.safetensors")
        original, _ = read_safetensors(
            ROOT / kind / "adapters" / n / "adapter_model.safetensors"
        )
        for key in original:
            if ".lora_" not in key:  # the saved head, as PEFT wrote it
                np.testing.assert_allclose(tensors[key], original[key], atol=1e-6)
        again = lx.load_peft_adapter(tmp_path / n, model.params)
        assert again.paths == adapters[n].paths
        merged = lx.merge(model.params, again)
        assert rel_err(model(ids, params=merged).logits, ref[n]) < RTOL


def _edited_copy(tmp_path, edit_tensors=None, edit_config=None) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(HERE / "adapters" / "c1", out)
    if edit_tensors is not None:
        tensors, _ = read_safetensors(out / "adapter_model.safetensors")
        edit_tensors(tensors)
        write_safetensors(out / "adapter_model.safetensors", tensors)
    if edit_config is not None:
        config = json.loads((out / "adapter_config.json").read_text())
        edit_config(config)
        (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_refusals(setup, tmp_path):
    model, _, _, _ = setup
    key = "base_model.model.classifier."

    def layer_norm(t):
        t[key + "norm.weight"] = np.ones(16, np.float32)
        t[key + "norm.bias"] = np.zeros(16, np.float32)

    with pytest.raises(lx.PeftFormatError, match="saved Linear layers"):
        lx.load_peft_adapter(_edited_copy(tmp_path / "a", layer_norm), model.params)

    def more_labels(t):
        t[key + "out_proj.weight"] = np.ones((4, 16), np.float32)
        t[key + "out_proj.bias"] = np.ones(4, np.float32)

    with pytest.raises(lx.PeftFormatError, match="another number of labels"):
        lx.load_peft_adapter(_edited_copy(tmp_path / "b", more_labels), model.params)

    def tokens(c):
        c["trainable_token_indices"] = [1, 2]

    with pytest.raises(lx.PeftFormatError, match="trainable_token_indices"):
        lx.load_peft_adapter(_edited_copy(tmp_path / "c", None, tokens), model.params)

    def no_head(t):
        t["base_model.model.score.weight"] = np.ones((3, 16), np.float32)

    with pytest.raises(lx.PeftFormatError, match="no leaf"):
        lx.load_peft_adapter(_edited_copy(tmp_path / "d", no_head), model.params)


def test_unchanged_head_adds_nothing(setup, tmp_path):
    """A saved module equal to the model's is no update at all."""
    model, _, _, _ = setup
    params = model.params["classifier"]

    def same(t):
        for m in ("dense", "out_proj"):
            t[f"base_model.model.classifier.{m}.weight"] = np.asarray(
                params[m]["kernel"]
            ).T.copy()
            t[f"base_model.model.classifier.{m}.bias"] = np.asarray(params[m]["bias"])

    ad = lx.load_peft_adapter(_edited_copy(tmp_path, same), model.params)
    assert not ad.bias_deltas
    assert not any(p.startswith("classifier") for p in ad.paths)


# -- the rule, against NumPy in float64 ----------------------------------------------

D_IN, D_OUT, N = 5, 3, 3


def _tree_and_stack(seed: int, eqx_layout: bool = False):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    b = rng.normal(size=(D_OUT,)).astype(np.float32)
    adapters, dense = [], []
    for i in range(N):
        r = i + 1
        a_i = rng.normal(size=(D_IN, r)).astype(np.float32)
        b_i = rng.normal(size=(r, D_OUT)).astype(np.float32)
        d_i = rng.normal(size=(D_OUT,)).astype(np.float32)
        alpha = 2.0 * r
        biases = {"b": jnp.asarray(d_i)} if i != 1 else {}  # adapter 1: no bias
        if eqx_layout:
            lay = LeafLayout("w", (D_OUT, D_IN), (1,), (0,), ())
        else:
            lay = LeafLayout("w", (D_IN, D_OUT), (0,), (1,), ())
        adapters.append(
            lx.Adapter(
                weights={"w": (jnp.asarray(a_i), jnp.asarray(b_i))},
                layouts=(lay,),
                ranks=(r,),
                alphas=(alpha,),
                use_rslora=(False,),
                bias_deltas=biases,
            )
        )
        full = w.astype(np.float64) + (alpha / r) * (a_i @ b_i).astype(np.float64)
        bias = b.astype(np.float64) + (d_i if i != 1 else 0)
        dense.append((full, bias))
    tree = {"w": jnp.asarray(w.T if eqx_layout else w), "b": jnp.asarray(b)}
    return tree, lx.stack_adapters(adapters), (w.astype(np.float64), b), dense


def _reference(x, idx, base, dense):
    x = np.asarray(x, np.float64)
    out = np.empty(x.shape[:-1] + (D_OUT,))
    flat_x = x.reshape(-1, x.shape[-1])
    flat_i = np.broadcast_to(
        np.asarray(idx).reshape(idx.shape + (1,) * (x.ndim - 1 - idx.ndim)),
        x.shape[:-1],
    ).reshape(-1)
    flat_o = out.reshape(-1, D_OUT)
    for k, (row, i) in enumerate(zip(flat_x, flat_i)):
        w, b = base if i < 0 else dense[i]
        flat_o[k] = row @ w + b
    return out


FORWARDS = {
    "x @ w + b": lambda p, x: x @ p["w"] + p["b"],
    "b + x @ w": lambda p, x: p["b"] + x @ p["w"],
    "flax": lambda p, x: (
        (x @ p["w"]) + jnp.reshape(p["b"], (1,) * (x.ndim - 1) + (-1,))
    ),
    "cast": lambda p, x: x @ p["w"] + p["b"].astype(jnp.float32),
}


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 4),
    seq=st.one_of(st.none(), st.integers(1, 3)),
    per_token=st.booleans(),
    forward=st.sampled_from(sorted(FORWARDS)),
    data=st.data(),
)
def test_bias_rule_against_numpy(seed, batch, seq, per_token, forward, data):
    tree, stack, base, dense = _tree_and_stack(seed)
    x_shape = (batch, D_IN) if seq is None else (batch, seq, D_IN)
    idx_shape = (batch, seq) if (seq is not None and per_token) else (batch,)
    idx = np.asarray(
        data.draw(
            st.lists(
                st.integers(-1, N - 1),
                min_size=int(np.prod(idx_shape)),
                max_size=int(np.prod(idx_shape)),
            )
        ),
        np.int32,
    ).reshape(idx_shape)
    x = np.random.default_rng(seed + 1).normal(size=x_shape).astype(np.float32)
    served = lx.loraify(tree, stack, jnp.asarray(idx))
    got = jax.jit(lx.quaxify(FORWARDS[forward]))(served, jnp.asarray(x))
    want = _reference(x, idx, base, dense)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # It can fail: adapter rows differ from the base.
    plain = _reference(x, np.full(idx_shape, -1), base, dense)
    adapted = np.broadcast_to(
        idx.reshape(idx.shape + (1,) * (len(x_shape) - 1 - idx.ndim)), x_shape[:-1]
    )
    if (adapted >= 0).any():
        assert np.abs(want - plain)[adapted >= 0].max() > 1e-3


def test_bias_rule_under_vmap_and_eqx_layout():
    tree, stack, base, dense = _tree_and_stack(3, eqx_layout=True)
    x = np.random.default_rng(0).normal(size=(4, D_IN)).astype(np.float32)
    idx = np.asarray([2, -1, 0, 1], np.int32)
    served = lx.loraify(tree, stack)

    def one(p, xi, i):
        return lx.quaxify(lambda q, v: q["w"] @ v + q["b"])(lx.with_indices(p, i), xi)

    got = jax.vmap(one, in_axes=(None, 0, 0))(served, jnp.asarray(x), jnp.asarray(idx))
    want = _reference(x, idx, base, [(w, b) for w, b in dense])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_bias_errors():
    tree, stack, _, _ = _tree_and_stack(1)
    served = lx.loraify(tree, stack, jnp.asarray([0, 1], jnp.int32))
    with pytest.raises(lx.UnsupportedOperationError, match="RowBias"):
        lx.quaxify(lambda p, x: x @ p["w"] + 2 * p["b"])(served, jnp.ones((2, D_IN)))
    unset = lx.loraify(tree, stack)
    with pytest.raises(ValueError, match="no indices"):
        lx.quaxify(lambda p, x: x @ p["w"] + p["b"])(unset, jnp.ones((2, D_IN)))
    with pytest.raises(lx.IndicesShapeError):
        lx.quaxify(lambda p, x: x @ p["w"] + p["b"])(served, jnp.ones((3, D_IN)))
