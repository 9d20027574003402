"""PEFT directories in and out.

Golden fixtures (`tests/fixtures/peft/`, made by real PEFT with
`make_peft_fixtures.py`) say what the right numbers are: our mixed batch on the
`transformers` Flax port of each model must equal PEFT's own mixed batch, and what
we export must mean in PEFT what it means here. Synthetic trees test the name
mapping, the orientation rule and every refusal, against NumPy references built
straight from the PEFT factors.
"""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from lorax_arrays._io.peft import is_targeted, pattern_key
from lorax_arrays._io.safetensors import (
    SafetensorsError,
    read_safetensors,
    write_safetensors,
)
from tests.model_helpers import causal_attention, gemma_attention, gemma_stack
from tests.peft_helpers import (
    FIXTURES,
    PEFT,
    RTOL,
    export_for_peft,
    peft_dir,
    rel_err,
    same_peft_dir,
)


@pytest.fixture(scope="module")
def models():
    return {m: export_for_peft.load_base(m) for m in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def forwards(models):
    return {
        m: jax.jit(lx.quaxify(lambda p, ids, model=model: model(ids, params=p).logits))
        for m, model in models.items()
    }


ADAPTERS = {"gpt2": ["g1", "g2"], "llama": ["l1", "l2", "l3"]}


# ----------------------------------------------------------------------------
# Against PEFT's own numbers.


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_mixed_batch_equals_peft(models, forwards, model_name):
    """PEFT adapters of different targets, ranks, patterns and rsLoRA, with base
    rows, in one jitted call of the Flax model, equal PEFT's mixed batch."""
    model, golden = models[model_name], np.load(PEFT / model_name / "logits.npz")
    names = ADAPTERS[model_name]
    adapters = [
        lx.load_peft_adapter(PEFT / model_name / "adapters" / n, model.params)
        for n in names
    ]
    stack = lx.stack_adapters(adapters, names=names)
    rows = [str(n) for n in golden["names"]]
    assert "__base__" in rows and set(names) <= set(rows)
    ids = jnp.asarray(golden["input_ids"], jnp.int32)
    out = forwards[model_name](
        lx.loraify(model.params, stack, stack.indices(rows)), ids
    )
    assert rel_err(out, golden["mixed"]) < RTOL
    # Each row is that adapter alone, and the adapters really change the model.
    for i, row in enumerate(rows):
        alone = golden["base"] if row == "__base__" else golden[row]
        assert rel_err(out[i], alone[i]) < RTOL
        if row != "__base__":
            assert rel_err(golden[row][i], golden["base"][i]) > 1e-2


def test_square_leaves_take_the_orientation_of_the_others(models):
    """GPT-2's Flax kernels are (out, in); the square attention c_proj must be read
    that way too. Reading it (in, out) is a silently wrong model: show it is."""
    model = models["gpt2"]
    path = PEFT / "gpt2" / "adapters" / "g1"
    adapter = lx.load_peft_adapter(path, model.params)
    square = "transformer/h/0/attn/c_proj/kernel"
    lay = {lay.path: lay for lay in adapter.layouts}[square]
    assert lay.shape == (32, 32) and lay.in_axes == (1,)
    wrong = lx.load_peft_adapter(
        path,
        model.params,
        orientation={r"attn/c_proj": "in_out", r"c_attn|mlp": "out_in"},
    )
    golden = np.load(PEFT / "gpt2" / "logits.npz")
    ids = jnp.asarray(golden["input_ids"], jnp.int32)
    f = jax.jit(lx.quaxify(lambda p: model(ids, params=p).logits))
    n = ids.shape[0]
    good = f(lx.loraify(model.params, adapter, jnp.zeros((n,), jnp.int32)))
    bad = f(lx.loraify(model.params, wrong, jnp.zeros((n,), jnp.int32)))
    assert rel_err(good, golden["g1"]) < RTOL
    assert rel_err(bad, golden["g1"]) > 1e-2


def test_export_loads_in_peft_with_the_same_outputs(models, forwards, tmp_path):
    """What `save_peft_adapter` writes today is what PEFT was shown (byte for byte
    in tensors, equal configs), and PEFT's logits for it equal ours."""
    for model_name, name, adapter in export_for_peft.exported_adapters():
        out_dir = tmp_path / model_name / name
        # Llama's embedding is untied: no head reads the adapted table.
        lx.save_peft_adapter(out_dir, adapter, untied_embeddings=model_name == "llama")
        same_peft_dir(out_dir, PEFT / model_name / "exported" / name)
        model = models[model_name]
        golden = np.load(PEFT / model_name / "exported_logits.npz")
        ids = jnp.asarray(golden["input_ids"], jnp.int32)
        back = lx.load_peft_adapter(out_dir, model.params)
        idx = jnp.zeros((ids.shape[0],), jnp.int32)
        ours = forwards[model_name](lx.loraify(model.params, back, idx), ids)
        assert rel_err(ours, golden[name]) < RTOL, (model_name, name)
        base = np.load(PEFT / model_name / "logits.npz")["base"]
        assert rel_err(golden[name], base) > 1e-2
        # And the round trip through PEFT's format loses nothing.
        assert back.paths == adapter.paths
        for p in adapter.paths:
            assert back.scale(p) == pytest.approx(adapter.scale(p), rel=1e-6)
            for x, y in zip(back.weights[p], adapter.weights[p]):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_peft_adapter_roundtrip_is_exact(models, tmp_path):
    """Load a PEFT directory, save it: same tensors under the same keys, and the
    same rank and alpha for every module as PEFT's config resolves them."""
    for model_name, names in ADAPTERS.items():
        for name in names:
            src = PEFT / model_name / "adapters" / name
            ad = lx.load_peft_adapter(src, models[model_name].params)
            lx.save_peft_adapter(tmp_path / name, ad)
            want, _ = read_safetensors(src / "adapter_model.safetensors")
            got, _ = read_safetensors(tmp_path / name / "adapter_model.safetensors")
            want = {k: v for k, v in want.items() if "lora_" in k}  # no base copies
            assert sorted(got) == sorted(want)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
            src_cfg = json.loads((src / "adapter_config.json").read_text())
            new_cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
            for key in {k.rsplit(".lora_", 1)[0] for k in want}:
                module = key.removeprefix("base_model.model.")
                for cfg_a, cfg_b in ((src_cfg, new_cfg),):
                    ra = cfg_a["rank_pattern"].get(
                        pattern_key(cfg_a["rank_pattern"], module), cfg_a["r"]
                    )
                    rb = cfg_b["rank_pattern"].get(
                        pattern_key(cfg_b["rank_pattern"], module), cfg_b["r"]
                    )
                    assert ra == rb
                assert is_targeted(new_cfg, module)


# ----------------------------------------------------------------------------
# Synthetic trees: names, orientation, refusals.


def _factors(rng, n_in, n_out, r):
    a = rng.standard_normal((r, n_in)).astype(np.float32)
    b = rng.standard_normal((n_out, r)).astype(np.float32)
    return a, b


def _apply(params: dict, x, orient: dict):
    """A raw-parameter two-layer model: each leaf used as its orientation says."""
    h = x
    for name in ("l0", "l1"):
        w = params[name]["w"]
        h = h @ w if orient[name] == "in_out" else h @ w.T
        h = jnp.tanh(h)
    return h


def _numpy_apply(params: dict, x, orient: dict, deltas: dict, scale: float):
    """The same model in float64 NumPy with `W + s·(B A)` merged in (torch's
    (out, in) convention, transposed to the leaf's own orientation)."""
    h = np.asarray(x, np.float64)
    for name in ("l0", "l1"):
        w = np.asarray(params[name]["w"], np.float64)
        if name in deltas:
            a, b = deltas[name]
            d = scale * (b.astype(np.float64) @ a.astype(np.float64))  # (out, in)
            w = w + (d.T if orient[name] == "in_out" else d)
        h = np.tanh(h @ w if orient[name] == "in_out" else h @ w.T)
    return h


@settings(max_examples=12)
@given(
    d_in=st.integers(2, 6),
    d_hid=st.integers(2, 6),
    orient=st.sampled_from(["in_out", "out_in"]),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_orientation_rule_on_synthetic_trees(
    tmp_path_factory, d_in, d_hid, orient, rank, seed
):
    """Layer 0 is (d_in -> d_hid), layer 1 square (d_hid -> d_hid): the square one
    takes layer 0's orientation when that is non-square, and is refused when
    nothing decides it; either way never a wrong model."""
    rng = np.random.default_rng(seed)
    shape0 = (d_in, d_hid) if orient == "in_out" else (d_hid, d_in)
    params = {
        "l0": {"w": jnp.asarray(rng.standard_normal(shape0), jnp.float32)},
        "l1": {"w": jnp.asarray(rng.standard_normal((d_hid, d_hid)), jnp.float32)},
    }
    mods = {
        "l0": _factors(rng, d_in, d_hid, rank),
        "l1": _factors(rng, d_hid, d_hid, rank),
    }
    path = peft_dir(tmp_path_factory.mktemp("peft"), mods, {"lora_alpha": 2 * rank})
    orients = {"l0": orient, "l1": orient}
    if d_in == d_hid:
        with pytest.raises(lx.PeftFormatError, match="orientation="):
            lx.load_peft_adapter(path, params)
        adapter = lx.load_peft_adapter(path, params, orientation=orient)
    else:
        adapter = lx.load_peft_adapter(path, params)
    x = rng.standard_normal((3, d_in)).astype(np.float32)
    served = lx.loraify(params, adapter, jnp.array([0, -1, 0]))
    out = jax.jit(lx.quaxify(lambda p, x: _apply(p, x, orients)))(served, x)
    ref = _numpy_apply(params, x, orients, mods, scale=2.0)
    ref_base = _numpy_apply(params, x, orients, {}, scale=0.0)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[1], ref_base[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[2], ref[2], rtol=1e-4, atol=1e-5)


def test_orientation_override_is_checked_against_shapes(tmp_path):
    rng = np.random.default_rng(0)
    params = {"l0": {"w": jnp.zeros((3, 5))}, "l1": {"w": jnp.zeros((5, 5))}}
    mods = {"l0": _factors(rng, 3, 5, 2), "l1": _factors(rng, 5, 5, 2)}
    path = peft_dir(tmp_path / "a", mods)
    with pytest.raises(lx.PeftFormatError, match="contradicts its shape"):
        lx.load_peft_adapter(path, params, orientation="out_in")
    with pytest.raises(ValueError, match="use 'in_out'"):
        lx.load_peft_adapter(path, params, orientation="sideways")
    # Conflicting evidence from the non-square leaves: the square one is refused.
    params3 = {
        "l0": {"w": jnp.zeros((3, 5))},  # in_out
        "l1": {"w": jnp.zeros((5, 5))},
        "l2": {"w": jnp.zeros((7, 5))},  # out_in (5 -> 7)
    }
    mods3 = {**mods, "l2": _factors(rng, 5, 7, 2)}
    path3 = peft_dir(tmp_path / "b", mods3)
    with pytest.raises(lx.PeftFormatError, match="other leaves disagree"):
        lx.load_peft_adapter(path3, params3)


def test_equinox_linear_and_embedding(tmp_path):
    """`eqx.nn.Linear.weight` is (out, in) whatever its shape, and an embedding
    table (vocab, dim); names map through `key_map` (dict and function)."""
    import equinox as eqx

    class Net(eqx.Module):
        embed: eqx.nn.Embedding
        proj: eqx.nn.Linear

        def __call__(self, t):
            return self.proj(self.embed(t))

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    net = Net(eqx.nn.Embedding(11, 6, key=k1), eqx.nn.Linear(6, 6, key=k2))
    rng = np.random.default_rng(1)
    ea, eb = _factors(rng, 11, 6, 2)
    pa, pb = _factors(rng, 6, 6, 3)
    mods = {
        "model.embed_tokens": ("embedding", ea, eb),
        "model.layers.0.mlp.proj": (pa, pb),
    }
    path = peft_dir(tmp_path / "eqx", mods, {"lora_alpha": 6, "r": 3})
    with pytest.raises(lx.PeftFormatError, match="no leaf for it"):
        lx.load_peft_adapter(path, net)
    key_map = {"model.embed_tokens": "embed", "model.layers.0.mlp.proj": "proj"}
    by_dict = lx.load_peft_adapter(path, net, key_map=key_map)
    by_fn = lx.load_peft_adapter(path, net, key_map=lambda m: key_map[m])
    assert by_dict.paths == by_fn.paths == ("embed/weight", "proj/weight")
    served = lx.loraify(net, by_dict, jnp.array([0, -1]))
    tokens = jnp.array([3, 7])

    @lx.quaxify
    def run(m, t):
        return jax.vmap(m)(t)

    out = run(served, tokens)
    # NumPy: rank_pattern gives the embedding rank 2 and alpha 6 -> scale 3;
    # the projection rank 3 -> scale 2.
    e = np.asarray(net.embed.weight, np.float64) + 3.0 * (eb @ ea).T
    w = np.asarray(net.proj.weight, np.float64) + 2.0 * (pb @ pa)
    bias = np.asarray(net.proj.bias, np.float64)
    ref0 = e[3] @ w.T + bias
    base = (
        np.asarray(net.embed.weight, np.float64)[7]
        @ np.asarray(net.proj.weight, np.float64).T
        + bias
    )
    np.testing.assert_allclose(out[0], ref0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[1], base, rtol=1e-4, atol=1e-5)


@given(
    prefix=st.sampled_from(["", "params/", "model/params/"]),
    nnx=st.booleans(),
    torch_prefix=st.sampled_from(["", "model."]),
    n_layers=st.integers(1, 3),
)
def test_default_names(tmp_path_factory, prefix, nnx, torch_prefix, n_layers):
    """A tree path without its weight's name, with a prefix on either side (a Flax
    variables dict, an NNX `/value`, a torch `...ForCausalLM`), is the module."""
    rng = np.random.default_rng(n_layers)
    params, mods = {}, {}
    for i in range(n_layers):
        for name, (n_in, n_out) in {"q_proj": (4, 6), "down": (6, 4)}.items():
            w = jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)
            leaf = {"value": w} if nnx else w
            node = params
            for part in f"{prefix}layers/{i}/{name}".split("/"):
                node = node.setdefault(part, {}) if part else node
            node["kernel"] = leaf
            mods[f"{torch_prefix}layers.{i}.{name}"] = _factors(rng, n_in, n_out, 2)
    path = peft_dir(tmp_path_factory.mktemp("names"), mods)
    if torch_prefix and prefix:
        # Both sides have a prefix the other lacks: no rule can see through that.
        with pytest.raises(lx.PeftFormatError, match="no leaf for it"):
            lx.load_peft_adapter(path, params)
        return
    adapter = lx.load_peft_adapter(path, params)
    value = "/value" if nnx else ""
    expected = {
        f"{prefix}layers/{i}/{name}/kernel{value}"
        for i in range(n_layers)
        for name in ("q_proj", "down")
    }
    assert set(adapter.paths) == expected
    for p in adapter.paths:
        i, name = p.removeprefix(prefix).split("/")[1:3]
        a, b = mods[f"{torch_prefix}layers.{i}.{name}"]
        np.testing.assert_array_equal(adapter.weights[p][0], a.T)
        np.testing.assert_array_equal(adapter.weights[p][1], b.T)


def test_unknown_module_names_the_closest_paths(tmp_path):
    rng = np.random.default_rng(0)
    params = {"layers": {"0": {"q_proj": {"kernel": jnp.zeros((4, 6))}}}}
    path = peft_dir(tmp_path / "a", {"layers.0.q_prj": _factors(rng, 4, 6, 2)})
    with pytest.raises(lx.PeftFormatError, match=r"q_prj.*layers\.0\.q_proj"):
        lx.load_peft_adapter(path, params)
    with pytest.raises(lx.PeftFormatError, match="key_map sends"):
        lx.load_peft_adapter(path, params, key_map={"layers.0.q_prj": "nope"})
    ok = lx.load_peft_adapter(
        path, params, key_map={"layers.0.q_prj": "layers/0/q_proj"}
    )
    assert ok.paths == ("layers/0/q_proj/kernel",)
    # Wrong shapes: made for another model.
    small = {"layers": {"0": {"q_prj": {"kernel": jnp.zeros((4, 5))}}}}
    with pytest.raises(lx.PeftFormatError, match="another model"):
        lx.load_peft_adapter(path, small)


def _simple(tmp_path, config=None, extra=None, modules=None):
    rng = np.random.default_rng(0)
    params = {"q_proj": {"kernel": jnp.zeros((4, 6))}}
    modules = modules or {"q_proj": _factors(rng, 4, 6, 2)}
    return peft_dir(tmp_path, modules, config, extra), params


@pytest.mark.parametrize(
    "config, match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
        ({"peft_type": "OFT"}, "LoRA adapters only"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "biases"),
        ({"modules_to_save": [3]}, "modules_to_save"),  # malformed
        ({"lora_bias": True}, "LoRA bias"),
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"target_parameters": ["experts.w"]}, "target_parameters"),
        ({"r": 3}, "rank 2 in the file but 3"),
        ({"rank_pattern": {"q_proj": 5}}, "rank 2 in the file but 5"),
        ({"target_modules": ["k_proj"]}, "does not select"),
        ({"target_modules": "k_.*"}, "does not select"),
        ({"r": "eight"}, "expected a rank >= 1"),
        ({"r": 0}, "expected a rank >= 1"),
        # Malformed fields: each names the file and the field, never a raw error.
        ({"target_modules": "q_(proj"}, "'target_modules' holds 'q_\\(proj'.*regular"),
        ({"target_modules": 5}, "'target_modules' is 5; expected a regex"),
        ({"target_modules": ["q_proj", 3]}, "holds 3; expected module names"),
        ({"exclude_modules": {"q": 1}}, "'exclude_modules' is .*expected a regex"),
        ({"rank_pattern": {"q_(": 2}}, "'rank_pattern' key holds 'q_\\('.*regular"),
        ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern\\['q_proj'\\] is 2.5"),
        ({"alpha_pattern": {"q_proj": "x"}}, "expected a finite number"),
        ({"layers_to_transform": "1"}, "'layers_to_transform' is '1'"),
        ({"layers_pattern": "la(yers"}, "'layers_pattern' holds"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(tmp_path, config, match):
    path, params = _simple(tmp_path, config)
    with pytest.raises(lx.PeftFormatError, match=match) as e:
        lx.load_peft_adapter(path, params)
    assert str(tmp_path) in str(e.value) or "load_peft_adapter" in str(e.value)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"base_model.model.q_proj.lora_magnitude_vector": np.ones(6)}, "DoRA"),
        ({"base_model.model.q_proj.lora_B.bias": np.ones(6)}, "not a LoRA weight"),
        ({"base_model.model.q_proj.lora_A.default.weight": np.ones((2, 4))}, "key"),
        ({"base_model.model.q_proj.weight": np.ones((4, 6))}, "differs"),
        # The same module under two spellings, with different values.
        ({"q_proj.lora_A.weight": np.ones((2, 4), np.float32)}, "two spellings"),
        # Integer factors (a float cast would serve them).
        ({"base_model.model.k_proj.lora_A.weight": np.ones((2, 4), np.int32)}, "int32"),
    ],
)
def test_unknown_keys_are_refused(tmp_path, extra, match):
    path, params = _simple(tmp_path, extra=extra)
    with pytest.raises(lx.PeftFormatError, match=match):
        lx.load_peft_adapter(path, params)


def test_saved_embedding_layer_must_equal_the_tree(tmp_path):
    """PEFT saves whole embedding layers next to their LoRA; equal is fine."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((9, 4)).astype(np.float32)
    params = {"embed_tokens": {"embedding": jnp.asarray(table)}}
    a, b = _factors(rng, 9, 4, 2)
    extra = {"base_model.model.embed_tokens.base_layer.weight": table}
    mods = {"embed_tokens": ("embedding", a, b)}
    path = peft_dir(tmp_path / "ok", mods, extra=extra)
    assert lx.load_peft_adapter(path, params).paths == ("embed_tokens/embedding",)
    extra = {"base_model.model.embed_tokens.base_layer.weight": table + 1}
    path = peft_dir(tmp_path / "bad", mods, extra=extra)
    with pytest.raises(lx.PeftFormatError, match="resized"):
        lx.load_peft_adapter(path, params)


def test_untied_head_with_its_base_copy_in_torch_layout(tmp_path):
    """PEFT saves an untied `lm_head`'s weight beside its LoRA, in torch's
    `(vocab, hidden)`; the Flax kernel is `(hidden, vocab)`. The copy is checked in
    either layout, the adapter loads, and the head serves `h @ (W + s·(B A)ᵀ)`
    (float64 NumPy); a copy that differs in both layouts is still refused."""
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((4, 9)).astype(np.float32)  # (hidden, vocab)
    params = {"lm_head": {"kernel": jnp.asarray(kernel)}}
    a, b = _factors(rng, 4, 9, 2)  # torch: A (r, hidden), B (vocab, r)
    mods = {"lm_head": (a, b)}
    extra = {"base_model.model.lm_head.base_layer.weight": kernel.T.copy()}
    adapter = lx.load_peft_adapter(peft_dir(tmp_path / "ok", mods, extra=extra), params)
    h = rng.standard_normal((3, 4)).astype(np.float32)
    served = lx.loraify(params, adapter, jnp.asarray([0, -1, 0]))
    got = np.asarray(lx.quaxify(lambda p, h: h @ p["lm_head"]["kernel"])(served, h))
    s = 8 / 2  # lora_alpha / r
    merged = kernel.astype(np.float64) + s * (b.astype(np.float64) @ a).T
    want = np.stack([h[0] @ merged, h[1] @ kernel, h[2] @ merged])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    bad = {"base_model.model.lm_head.base_layer.weight": kernel.T + 1}
    with pytest.raises(lx.PeftFormatError, match="differs"):
        lx.load_peft_adapter(peft_dir(tmp_path / "bad", mods, extra=bad), params)


def test_missing_and_corrupt_files(tmp_path):
    path, params = _simple(tmp_path / "a")
    half = tmp_path / "half"
    shutil.copytree(path, half)
    (half / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lx.load_peft_adapter(half, params)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lx.load_peft_adapter(tmp_path, params)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:-3])
    with pytest.raises(SafetensorsError, match="adapter_model.safetensors"):
        lx.load_peft_adapter(path, params)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lx.PeftFormatError, match="adapter_config.json"):
        lx.load_peft_adapter(path, params)
    rng = np.random.default_rng(0)
    only_a = {"base_model.model.q_proj.lora_A.weight": np.ones((2, 4), np.float32)}
    lone = peft_dir(tmp_path / "lone", {"k": _factors(rng, 4, 6, 2)}, extra=only_a)
    with pytest.raises(lx.PeftFormatError, match="no lora_B"):
        lx.load_peft_adapter(lone, params, key_map={"k": "q_proj"})


def test_dtype_and_bf16(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    a, b = _factors(rng, 4, 6, 2)
    bf = ml_dtypes.bfloat16
    path, params = _simple(tmp_path, modules={"q_proj": (a.astype(bf), b.astype(bf))})
    ad = lx.load_peft_adapter(path, params)
    assert ad.weights["q_proj/kernel"][0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(ad.weights["q_proj/kernel"][0]), a.astype(bf).T
    )
    ad32 = lx.load_peft_adapter(path, params, dtype=jnp.float32)
    assert ad32.weights["q_proj/kernel"][1].dtype == jnp.float32


# ----------------------------------------------------------------------------
# PEFT's matching rules, as its code defines them.


def test_pattern_key_follows_peft():
    keys = ["down_proj", r"model\.layers\.1\.self_attn\.q_proj", "q_proj"]
    assert pattern_key(keys, "model.layers.0.mlp.down_proj") == "down_proj"
    assert pattern_key(keys, "model.layers.1.self_attn.q_proj") == keys[1]
    assert pattern_key(keys, "model.layers.0.self_attn.q_proj") == "q_proj"
    # Suffixes must start at a module boundary, and match to the end.
    assert pattern_key(["proj"], "model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert pattern_key(["q_proj"], "model.q_proj.lora") == "model.q_proj.lora"
    # The first matching key wins (dict order), as in PEFT.
    assert pattern_key(["layers.0.q_proj", "q_proj"], "m.layers.0.q_proj") == (
        "layers.0.q_proj"
    )


def test_is_targeted_follows_peft():
    cfg = {"target_modules": ["q_proj", "v_proj"]}
    assert is_targeted(cfg, "model.layers.0.self_attn.q_proj")
    assert not is_targeted(cfg, "model.layers.0.self_attn.qq_proj")
    assert is_targeted({"target_modules": r".*\.q_proj"}, "a.b.q_proj")
    assert not is_targeted({"target_modules": r"q_proj"}, "a.b.q_proj")  # fullmatch
    layer1 = {"target_modules": ["q_proj"], "layers_to_transform": [1]}
    assert is_targeted(layer1, "model.layers.1.self_attn.q_proj")
    assert not is_targeted(layer1, "model.layers.10.self_attn.q_proj")
    assert not is_targeted(layer1, "model.layers.0.self_attn.q_proj")
    # A module named exactly in target_modules skips the layer check, in PEFT too.
    assert is_targeted(layer1, "q_proj")
    pattern = {**layer1, "layers_pattern": "h"}
    assert is_targeted(pattern, "transformer.h.1.attn.q_proj")
    assert not is_targeted(pattern, "transformer.blocks.1.attn.q_proj")
    excl = {"target_modules": ["q_proj"], "exclude_modules": ["layers.0.q_proj"]}
    assert not is_targeted(excl, "model.layers.0.q_proj")
    assert is_targeted(excl, "model.layers.1.q_proj")


# ----------------------------------------------------------------------------
# Saving: refusals and mixed-scale bookkeeping.


def jr_key(i):
    return jax.random.PRNGKey(i)


def test_save_refusals(tmp_path):
    import equinox as eqx

    mlp = eqx.nn.MLP(4, 4, 8, depth=1, key=jax.random.PRNGKey(0))
    ad = lx.init_adapter(mlp, lx.LoraRule("weight", rank=2), key=jax.random.PRNGKey(1))
    with pytest.raises(TypeError, match=r"stack\[i\]"):
        lx.save_peft_adapter(tmp_path / "s", lx.stack_adapters([ad, ad]))
    # Multi-axis leaves are written (see the fused-kernel tests below), but
    # stack axes that are not leading could not be read back.
    inner = {"w": jnp.zeros((4, 3, 5))}
    iad = lx.init_adapter(
        inner,
        lx.LoraRule("w", rank=2, in_axes=0, out_axes=2, stack_axes=1),
        key=jr_key(1),
    )
    with pytest.raises(ValueError, match="stack axes must come first"):
        lx.save_peft_adapter(tmp_path / "t", iad)
    two = {"layers": {"qkv": {"w": jnp.zeros((2, 3, 4, 5))}}}
    tad = lx.init_adapter(
        two, lx.LoraRule("w", rank=2, stack_axes=(0, 1)), key=jr_key(1)
    )
    tad = jax.tree.map(jnp.ones_like, tad)
    with pytest.raises(ValueError, match="2 stack axes"):
        lx.save_peft_adapter(tmp_path / "t", tad)
    stacked = {"blocks": {"w": jnp.zeros((3, 4, 5))}, "w": jnp.zeros((3, 4, 5))}
    sad = lx.init_adapter(
        stacked, lx.LoraRule("^w", rank=2, stack_axes=0), key=jr_key(1)
    )
    with pytest.raises(ValueError, match="no layer list"):
        lx.save_peft_adapter(tmp_path / "v", sad)
    with pytest.raises(ValueError, match="two leaves map"):
        lx.save_peft_adapter(tmp_path / "u", ad, key_map=lambda p: "same")


def test_save_mixed_rslora_keeps_every_scale(tmp_path):
    """One rsLoRA flag per PEFT config: a leaf with the other flag gets its alpha
    rewritten so that PEFT's scale is the leaf's own."""
    params = {f"l{i}": {"kernel": jnp.zeros((4, 6))} for i in range(3)}
    rules = [
        lx.LoraRule("l0", rank=4, alpha=3.0, use_rslora=True),
        lx.LoraRule("l1", rank=4, alpha=3.0, use_rslora=True),
        lx.LoraRule("l2", rank=2, alpha=5.0),
    ]
    ad = export_for_peft.random_adapter(params, rules, seed=3)
    lx.save_peft_adapter(tmp_path, ad)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4
    back = lx.load_peft_adapter(tmp_path, params)
    for p in ad.paths:
        assert back.scale(p) == pytest.approx(ad.scale(p), rel=1e-12)
    assert ad.scale("l2/kernel") == 2.5 and ad.scale("l0/kernel") == 1.5


# ----------------------------------------------------------------------------
# The .safetensors reader and writer.


def test_reader_reads_torch_written_bf16():
    tensors, meta = read_safetensors(FIXTURES / "torch_dtypes.safetensors")
    assert meta == {"format": "pt"}
    ramp = np.arange(12, dtype=np.float32).reshape(3, 4) / 8 - 0.5
    assert str(tensors["ramp_bf16"].dtype) == "bfloat16"
    np.testing.assert_array_equal(tensors["ramp_bf16"].astype(np.float32), ramp)
    np.testing.assert_array_equal(
        tensors["ramp_f16"], (np.arange(6) / 4).astype(np.float16).reshape(2, 3)
    )
    np.testing.assert_array_equal(tensors["ints"], np.arange(5))


def test_reader_and_writer_agree_with_safetensors(tmp_path):
    import safetensors.numpy as sn

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((2,)).astype(np.float16),
        "c": np.arange(7, dtype=np.int64),
        "d": np.zeros((0, 3), np.float32),
    }
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"k": "v"})
    theirs = sn.load_file(str(tmp_path / "ours.safetensors"))
    sn.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    ours, meta = read_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"k": "v"}
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
        np.testing.assert_array_equal(ours[k], v)
        assert ours[k].dtype == v.dtype


def test_reader_refuses_corrupt_headers(tmp_path):
    import struct

    good = tmp_path / "x.safetensors"
    write_safetensors(good, {"a": np.ones((2, 2), np.float32)})
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])

    def write(h, body=data[8 + n :]):
        raw = json.dumps(h).encode()
        (tmp_path / "y.safetensors").write_bytes(
            struct.pack("<Q", len(raw)) + raw + body
        )
        return tmp_path / "y.safetensors"

    cases = [
        ({"a": {**header["a"], "shape": [2, 3]}}, "needs 24 bytes"),
        ({"a": {**header["a"], "dtype": "F7"}}, "dtype 'F7'"),
        ({"a": {**header["a"], "data_offsets": [0, 64]}}, "spans bytes"),
        ({"a": {**header["a"], "shape": [-2, -2]}}, "negative dimension"),
        ({**header, "__metadata__": ["format", "pt"]}, "__metadata__ is"),
        ({**header, "__metadata__": {"format": 1}}, "__metadata__ is"),
    ]
    for h, match in cases:
        with pytest.raises(SafetensorsError, match=match):
            read_safetensors(write(h))
    with pytest.raises(SafetensorsError, match="bytes after the last tensor"):
        read_safetensors(write(header, data[8 + n :] + b"\0" * 4))
    (tmp_path / "z.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(SafetensorsError, match="header length"):
        read_safetensors(tmp_path / "z.safetensors")


def test_embedding_lora_leaves_a_tied_head_alone(tmp_path):
    """PEFT's embedding LoRA changes the lookup, not a head tied to the same table
    (GPT-2); an adapter made here adapts both. Both kinds in one batch."""
    rng = np.random.default_rng(5)
    vocab, dim = 11, 4
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    params = {"wte": {"embedding": jnp.asarray(table)}}
    ea, eb = _factors(rng, vocab, dim, 2)
    path = peft_dir(tmp_path / "p", {"wte": ("embedding", ea, eb)}, {"lora_alpha": 2})
    peft_ad = lx.load_peft_adapter(path, params)
    assert peft_ad.lookup_only == (True,)
    native = export_for_peft.random_adapter(
        params, [lx.LoraRule("embedding", rank=3, alpha=6.0)], seed=1
    )
    # The flag survives orbax.
    lx.save_adapter(tmp_path / "ck", peft_ad)
    assert lx.load_adapter(tmp_path / "ck").lookup_only == (True,)
    stack = lx.stack_adapters([peft_ad, native])

    def tied_lm(p, tokens):
        e = p["wte"]["embedding"]
        return e[tokens] @ e.T

    tokens = jnp.array([[1, 4], [2, 9], [3, 3]])
    out = lx.quaxify(tied_lm)(lx.loraify(params, stack, jnp.array([0, 1, -1])), tokens)
    t64 = table.astype(np.float64)
    peft_lookup = t64 + 1.0 * (eb @ ea).T
    na, nb = (np.asarray(x, np.float64) for x in native.weights["wte/embedding"])
    native_table = t64 + 2.0 * (na @ nb)
    refs = [
        peft_lookup[np.asarray(tokens[0])] @ t64.T,  # head keeps the base table
        native_table[np.asarray(tokens[1])] @ native_table.T,
        t64[np.asarray(tokens[2])] @ t64.T,
    ]
    for row, ref in zip(out, refs):
        np.testing.assert_allclose(row, ref, rtol=1e-4, atol=1e-4)
    # And the difference is real: adapting the head too would change row 0.
    wrong = peft_lookup[np.asarray(tokens[0])] @ peft_lookup.T
    assert np.abs(wrong - refs[0]).max() > 1e-2


def _scan_model(params, x, orient):
    """A scanned stack of square layers, `h = tanh(h @ W[l])` (or `W[l].T`)."""

    def step(h, w):
        return jnp.tanh(h @ w if orient == "in_out" else h @ w.T), None

    return jax.lax.scan(step, x, params["model"]["layers"]["proj"]["w"])[0]


@settings(max_examples=6)
@given(orient=st.sampled_from(["in_out", "out_in"]), seed=st.integers(0, 2**16))
def test_stacked_layers_load_and_save(tmp_path_factory, orient, seed):
    """One PEFT module per layer of a scanned stack: layer 1 missing, layer 2 with
    its own rank and alpha (folded into B); served through `lax.scan`, against
    float64 NumPy layer by layer; saved back as per-layer modules."""
    rng = np.random.default_rng(seed)
    n_layers, d = 3, 5
    stack_w = rng.standard_normal((n_layers, d, d)).astype(np.float32) * 0.5
    # `w`: a name with no convention (a `kernel` is (in, out) by Flax's).
    params = {"model": {"layers": {"proj": {"w": jnp.asarray(stack_w)}}}}
    mods = {
        "model.layers.0.proj": _factors(rng, d, d, 3),
        "model.layers.2.proj": _factors(rng, d, d, 2),
    }
    extra_cfg = {
        "lora_alpha": 6,
        "r": 3,
        "target_modules": ["proj"],
        "rank_pattern": {"layers.2.proj": 2},
        "alpha_pattern": {"layers.2.proj": 1},
    }
    tmp = tmp_path_factory.mktemp("stacked")
    path = peft_dir(tmp / "in", mods, extra_cfg)
    with pytest.raises(lx.PeftFormatError, match="orientation="):
        lx.load_peft_adapter(path, params)  # square layers: nothing decides
    ad = lx.load_peft_adapter(path, params, orientation=orient)
    (lay,) = ad.layouts
    assert lay.stack_axes == (0,) and lay.shape == (n_layers, d, d)
    x = rng.standard_normal((4, d)).astype(np.float32)
    forward = jax.jit(lx.quaxify(lambda p, x: _scan_model(p, x, orient)))
    out = forward(lx.loraify(params, ad, jnp.array([0, -1, 0, 0])), x)
    scales = {0: 6 / 3, 2: 1 / 2}

    def ref(row, adapted):
        h = x[row].astype(np.float64)
        for layer in range(n_layers):
            w = stack_w[layer].astype(np.float64)
            if adapted and layer in scales:
                a, b = mods[f"model.layers.{layer}.proj"]
                dlt = scales[layer] * (b.astype(np.float64) @ a)  # (out, in)
                w = w + (dlt.T if orient == "in_out" else dlt)
            h = np.tanh(h @ w if orient == "in_out" else h @ w.T)
        return h

    for row, adapted in enumerate([True, False, True, True]):
        np.testing.assert_allclose(out[row], ref(row, adapted), rtol=1e-4, atol=1e-5)
    # Back out: one module per adapted layer, the same products.
    lx.save_peft_adapter(tmp / "out", ad)
    tensors, _ = read_safetensors(tmp / "out" / "adapter_model.safetensors")
    assert {k.rsplit(".lora_", 1)[0] for k in tensors} == {
        "base_model.model.model.layers.0.proj",
        "base_model.model.model.layers.2.proj",
    }
    back = lx.load_peft_adapter(tmp / "out", params, orientation=orient)
    out2 = forward(lx.loraify(params, back, jnp.array([0, -1, 0, 0])), x)
    np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6)
    # key_map to (path, layer) works too.
    km = {
        "model.layers.0.proj": ("model/layers/proj/w", 0),
        "model.layers.2.proj": ("model/layers/proj/w", 2),
    }
    by_map = lx.load_peft_adapter(path, params, key_map=km, orientation=orient)
    for x_, y_ in zip(by_map.weights[lay.path], ad.weights[lay.path]):
        np.testing.assert_array_equal(np.asarray(x_), np.asarray(y_))


# ----------------------------------------------------------------------------
# Fused kernels: separate PEFT q/k/v modules onto one leaf's entries.

FB, FT, FD, FN, FK, FH = 3, 3, 8, 4, 2, 3  # D != N*H: the shapes decide the axes


def _unfused_params(rng, n_layers, kv_heads):
    """torch-like separate projections as Flax `(in, out)` kernels, per layer."""
    shapes = {
        "q_proj": (FD, FN * FH),
        "k_proj": (FD, kv_heads * FH),
        "v_proj": (FD, kv_heads * FH),
        "o_proj": (FN * FH, FD),
    }
    return {
        "model": {
            "layers": {
                str(layer): {
                    "self_attn": {
                        name: {
                            "kernel": jnp.asarray(
                                (rng.standard_normal(shape) * 0.4).astype(np.float32)
                            )
                        }
                        for name, shape in shapes.items()
                    }
                }
                for layer in range(n_layers)
            }
        }
    }


def _fuse(unfused, n_layers, kv_heads):
    """The same weights as Gemma lays them out: `qkv_einsum (3, N, D, H)` (MHA)
    or `q_einsum (N, D, H)` + `kv_einsum (2, K, D, H)` (GQA), `attn_vec_einsum
    (N, H, D)`; with a leading layer axis when there are several layers."""
    per_layer = []
    for layer in range(n_layers):
        m = unfused["model"]["layers"][str(layer)]["self_attn"]
        w = {k: np.asarray(v["kernel"]) for k, v in m.items()}

        def heads(kernel, n):  # (D, n*H) -> (n, D, H)
            return kernel.reshape(FD, n, FH).transpose(1, 0, 2)

        q = heads(w["q_proj"], FN)
        k, v = heads(w["k_proj"], kv_heads), heads(w["v_proj"], kv_heads)
        p = {"attn_vec_einsum": {"w": w["o_proj"].reshape(FN, FH, FD)}}
        if kv_heads == FN:
            p["qkv_einsum"] = {"w": np.stack([q, k, v])}
        else:
            p["q_einsum"] = {"w": q}
            p["kv_einsum"] = {"w": np.stack([k, v])}
        per_layer.append(p)
    if n_layers == 1:
        return jax.tree.map(jnp.asarray, per_layer[0])
    stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *per_layer)
    return {"layers": stacked}


def _fused_key_map(n_layers, kv_heads):
    """PEFT module name -> (leaf path, entry) on the fused tree."""
    km = {}
    for layer in range(n_layers):
        name = f"model.layers.{layer}.self_attn"
        pre = "" if n_layers == 1 else "layers/"
        at = (lambda e: e) if n_layers == 1 else (lambda e, j=layer: (j, e))
        if kv_heads == FN:
            for e, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                km[f"{name}.{proj}"] = (f"{pre}qkv_einsum/w", at(e))
        else:
            km[f"{name}.q_proj"] = (
                f"{pre}q_einsum/w" if n_layers == 1 else (f"{pre}q_einsum/w", layer)
            )
            km[f"{name}.k_proj"] = (f"{pre}kv_einsum/w", at(0))
            km[f"{name}.v_proj"] = (f"{pre}kv_einsum/w", at(1))
        km[f"{name}.o_proj"] = (
            f"{pre}attn_vec_einsum/w"
            if n_layers == 1
            else (f"{pre}attn_vec_einsum/w", layer)
        )
    return km


def _unfused_reference(unfused, adapter, x, n_layers, kv_heads):
    """The separate-projection model in float64 NumPy, `adapter` (an Adapter on
    the unfused tree, or None) merged into every kernel it has."""

    def weight(path):
        w = np.asarray(unfused_leaf(path), np.float64)
        if adapter is None or path not in adapter.weights:
            return w
        j = adapter.paths.index(path)
        r, alpha = adapter.ranks[j], adapter.alphas[j]
        s = alpha / (np.sqrt(r) if adapter.use_rslora[j] else r)
        a, b = (np.asarray(v, np.float64) for v in adapter.weights[path])
        return w + s * (a @ b)

    def unfused_leaf(path):
        node = unfused
        for part in path.split("/"):
            node = node[part]
        return node

    h = np.asarray(x, np.float64)
    for layer in range(n_layers):
        pre = f"model/layers/{layer}/self_attn"
        proj = lambda n: weight(f"{pre}/{n}/kernel")  # noqa: E731, B023
        q = (h @ proj("q_proj")).reshape(FB, FT, FN, FH)
        k = (h @ proj("k_proj")).reshape(FB, FT, kv_heads, FH)
        v = (h @ proj("v_proj")).reshape(FB, FT, kv_heads, FH)
        enc = causal_attention(q, k, v, np).reshape(FB, FT, FN * FH)
        h = h + enc @ proj("o_proj")
    return h


def _unfused_adapters(unfused):
    """Two adapters on the separate projections: own ranks and alphas per
    projection, one rsLoRA leaf, and no `v_proj` after layer 0 in the first (its
    fused entries must come out zero)."""
    first = [
        lx.LoraRule("q_proj", 2, 4.0),
        lx.LoraRule("k_proj", 3, 3.0, use_rslora=True),
        lx.LoraRule("/0/self_attn/v_proj", 4, 2.0),
        lx.LoraRule("o_proj", 2, 1.0),
    ]
    second = [lx.LoraRule("(q|k|v)_proj", 1, 2.0)]
    return [
        export_for_peft.random_adapter(unfused, rules, seed)
        for seed, rules in enumerate([first, second])
    ]


@pytest.mark.parametrize("n_layers, kv_heads", [(1, FN), (2, FK)])
def test_separate_qkv_modules_load_onto_fused_kernels(tmp_path, n_layers, kv_heads):
    """PEFT adapters trained on separate `q_proj`/`k_proj`/`v_proj`/`o_proj`
    (written by `save_peft_adapter` from the unfused tree) load onto Gemma's
    fused kernels through `key_map` (`(path, entry)`, `(path, (layer, entry))`),
    and the fused model serves what the unfused one with the adapters merged in
    NumPy computes; exported back per module they are the same products."""
    rng = np.random.default_rng(n_layers)
    unfused = _unfused_params(rng, n_layers, kv_heads)
    fused = _fuse(unfused, n_layers, kv_heads)
    adapters = _unfused_adapters(unfused)
    key_map = _fused_key_map(n_layers, kv_heads)
    loaded = []
    for j, ad in enumerate(adapters):
        lx.save_peft_adapter(tmp_path / f"a{j}", ad)
        loaded.append(lx.load_peft_adapter(tmp_path / f"a{j}", fused, key_map=key_map))
    first = loaded[0]
    fused_path = "qkv_einsum/w" if kv_heads == FN else "kv_einsum/w"
    fused_path = fused_path if n_layers == 1 else f"layers/{fused_path}"
    (lay,) = [lay for lay in first.layouts if lay.path == fused_path]
    n_stack = 1 if n_layers == 1 else 2
    assert lay.stack_axes == tuple(range(n_stack))
    assert lay.in_axes == (n_stack + 1,) and lay.out_axes == (n_stack, n_stack + 2)
    if n_layers == 2:
        a, b = first.weights[fused_path]
        v = 2 if kv_heads == FN else 1
        assert not np.any(np.asarray(a)[1, v]) and not np.any(np.asarray(b)[1, v])
        assert np.all(np.any(np.asarray(b)[0] != 0, axis=(1, 2, 3)))

    x = rng.standard_normal((FB, FT, FD)).astype(np.float32)
    idx = jnp.array([0, 1, -1])
    model = (
        gemma_attention if n_layers == 1 else lambda p, x: gemma_stack(p["layers"], x)
    )
    served = lx.loraify(fused, lx.stack_adapters(loaded), idx)
    out = jax.jit(lx.quaxify(model))(served, x)
    for row, ad in enumerate([*adapters, None]):
        ref = _unfused_reference(unfused, ad, x, n_layers, kv_heads)
        np.testing.assert_allclose(out[row], ref[row], rtol=2e-4, atol=2e-4)
    base = _unfused_reference(unfused, None, x, n_layers, kv_heads)
    assert np.abs(out[0] - base[0]).max() > 1e-2

    # Back out, per module, with the same key_map: each module's product
    # s · B A is the original's (ranks padded, scales folded).
    lx.save_peft_adapter(tmp_path / "out", first, key_map=key_map)
    t_in, _ = read_safetensors(tmp_path / "a0" / "adapter_model.safetensors")
    t_out, _ = read_safetensors(tmp_path / "out" / "adapter_model.safetensors")
    assert set(t_out) == set(t_in)
    cfg_in = json.loads((tmp_path / "a0" / "adapter_config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "adapter_config.json").read_text())

    def product(t, cfg, module):
        key = f"base_model.model.{module}"
        a, b = t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"]
        r = cfg["rank_pattern"].get(re.escape(module), cfg["r"])
        alpha = cfg["alpha_pattern"].get(re.escape(module), cfg["lora_alpha"])
        s = alpha / (np.sqrt(r) if cfg["use_rslora"] else r)
        return s * (b.astype(np.float64) @ a.astype(np.float64))

    modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in t_in}
    for module in modules:
        np.testing.assert_allclose(
            product(t_out, cfg_out, module),
            product(t_in, cfg_in, module),
            rtol=1e-5,
            atol=1e-6,
        )
    # ... and they load onto the unfused tree by their default names.
    back = lx.load_peft_adapter(tmp_path / "out", unfused)
    assert set(back.paths) == set(adapters[0].paths)


def test_fused_kernel_ambiguous_axes_and_refusals(tmp_path):
    """With `D == N * H` both `in=D` and `in=(N, H)` fit a `(3, N, D, H)` entry:
    refused, naming the choices, until `orientation` gives the leaf's axes; a
    module at an entry the leaf lacks, or at a stack entry and the whole leaf,
    is refused."""
    rng = np.random.default_rng(0)
    n, h = 2, 3
    d = n * h
    fused = {"attn": {"qkv_einsum": {"w": jnp.zeros((3, n, d, h))}}}
    mods = {
        f"attn.{p}": _factors(rng, d, n * h, 2) for p in ("q_proj", "k_proj", "v_proj")
    }
    path = peft_dir(tmp_path / "p", mods)
    km = {
        f"attn.{p}": ("attn/qkv_einsum/w", e)
        for e, p in enumerate(("q_proj", "k_proj", "v_proj"))
    }
    with pytest.raises(
        lx.PeftFormatError, match=r"2 ways.*\(\(2,\), \(1, 3\)\).*orientation="
    ):
        lx.load_peft_adapter(path, fused, key_map=km)
    with pytest.raises(lx.PeftFormatError, match="describes a 2-D weight"):
        lx.load_peft_adapter(path, fused, key_map=km, orientation="in_out")
    ad = lx.load_peft_adapter(
        path, fused, key_map=km, orientation={"qkv": ((2,), (1, 3))}
    )
    (lay,) = ad.layouts
    assert (lay.in_axes, lay.out_axes, lay.stack_axes) == ((2,), (1, 3), (0,))
    a, b = ad.weights[lay.path]
    for e, p in enumerate(("q_proj", "k_proj", "v_proj")):
        pa, pb = mods[f"attn.{p}"]
        np.testing.assert_array_equal(np.asarray(a[e]), pa.T)
        np.testing.assert_array_equal(np.asarray(b[e]), pb.T.reshape(2, n, h))
    bad = {**km, "attn.v_proj": ("attn/qkv_einsum/w", 3)}
    with pytest.raises(lx.PeftFormatError, match=r"entry \(3,\).*no such entry"):
        lx.load_peft_adapter(path, fused, key_map=bad, orientation=((2,), (1, 3)))
    mixed = {**km, "attn.v_proj": "attn/qkv_einsum/w"}
    with pytest.raises(lx.PeftFormatError, match="another model|whole-leaf"):
        lx.load_peft_adapter(path, fused, key_map=mixed, orientation=((2,), (1, 3)))
    with pytest.raises(TypeError, match=r"\(path, \(i, j\)\)"):
        lx.load_peft_adapter(path, fused, key_map=lambda m: ("x", "0"))


@pytest.mark.parametrize("layout", ["flax", "equinox_names"])
def test_head_lora_on_a_tied_table_changes_the_head_only(tmp_path, layout):
    """PEFT's LoRA on an `lm_head` tied to the embedding table (GPT-2, GPT-Neo)
    changes the head and not the lookup. With no leaf of its own, the loader
    names the table; mapped there with `key_map`, it is served on the head
    only, in one batch with PEFT's embedding LoRA on the same table, an adapter
    made here (both reads) and base rows. Reference: NumPy float64 with the
    table merged per read."""
    rng = np.random.default_rng(11)
    vocab, dim = 13, 5
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    kernel = rng.standard_normal((dim, dim)).astype(np.float32) / 2
    if layout == "flax":
        params = {"wte": {"embedding": jnp.asarray(table)}, "h": {"kernel": kernel}}
        table_path = "wte/embedding"
    else:
        params = {"embed": {"weight": jnp.asarray(table)}, "h": {"kernel": kernel}}
        table_path = "embed/weight"
    table_module = table_path.split("/")[0]

    def tied_lm(p, tokens):
        e = p[table_module][table_path.split("/")[1]]
        return jnp.tanh(e[tokens] @ p["h"]["kernel"]) @ e.T

    ha, hb = _factors(rng, dim, vocab, 3)  # lm_head: A (r, dim), B (vocab, r)
    head_dir = peft_dir(tmp_path / "head", {"lm_head": (ha, hb)}, {"lora_alpha": 6})
    with pytest.raises(
        lx.PeftFormatError, match=rf"key_map=\{{'lm_head': '{table_path}'"
    ):
        lx.load_peft_adapter(head_dir, params)
    head_ad = lx.load_peft_adapter(head_dir, params, key_map={"lm_head": table_path})
    assert head_ad.head_only == (True,) and head_ad.lookup_only == (False,)
    ea, eb = _factors(rng, vocab, dim, 2)
    emb_dir = peft_dir(
        tmp_path / "emb", {table_module: ("embedding", ea, eb)}, {"lora_alpha": 2}
    )
    emb_ad = lx.load_peft_adapter(emb_dir, params)
    native = export_for_peft.random_adapter(
        params, [lx.LoraRule(re.escape(table_path), rank=2, alpha=4.0)], seed=3
    )
    # The flag survives orbax, and the fingerprint tells it apart.
    lx.save_adapter(tmp_path / "ck", head_ad)
    back = lx.load_adapter(tmp_path / "ck")
    assert back.head_only == (True,)
    assert back.fingerprint() == head_ad.fingerprint()
    stack = lx.stack_adapters([head_ad, emb_ad, native])
    tokens = jnp.array([[1, 4, 12], [2, 9, 0], [3, 3, 7], [5, 6, 8]])
    idx = jnp.array([0, 1, 2, -1])
    out = np.asarray(lx.quaxify(tied_lm)(lx.loraify(params, stack, idx), tokens))

    t64, k64 = table.astype(np.float64), kernel.astype(np.float64)
    na, nb = (np.asarray(x, np.float64) for x in native.weights[table_path])
    head_table = t64 + 2.0 * (hb.astype(np.float64) @ ha)  # torch (vocab, dim)
    emb_table = t64 + 1.0 * (eb.astype(np.float64) @ ea).T
    native_table = t64 + 2.0 * (na @ nb)
    looks = [t64, emb_table, native_table, t64]
    heads = [head_table, t64, native_table, t64]
    for i in range(4):
        tok = np.asarray(tokens[i])
        ref = np.tanh(looks[i][tok] @ k64) @ heads[i].T
        np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=1e-4)
    # Applying the head's update to the lookup too (the old behaviour) is
    # measurably different.
    wrong = np.tanh(head_table[np.asarray(tokens[0])] @ k64) @ head_table.T
    assert np.abs(wrong - out[0]).max() > 1e-2
    # The bank serves the same rows.
    bank = lx.AdapterBank(params, lx.LoraRule(re.escape(table_path), rank=3), slots=3)
    for name, ad in (("head", head_ad), ("emb", emb_ad), ("native", native)):
        bank.add(name, ad)
    served = bank.served(bank.indices(["head", "emb", "native", None]))
    got = lx.quaxify(tied_lm)(lx.loraify(params, served), tokens)
    np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)
    # merge cannot fold a head-only update into a shared table.
    with pytest.raises(ValueError, match="head-only"):
        lx.merge(params, head_ad)


@pytest.mark.parametrize("nnx_value", [False, True])
def test_flax_kernels_are_in_out_by_convention(tmp_path, nnx_value):
    """PEFT's default LoraConfig targets square q/v projections: a leaf named
    `kernel` (Flax Dense, NNX Linear) is (in, out), so it loads in one line,
    the same as with `orientation='in_out'`; a non-square kernel whose shape is
    (out, in) for the module is refused (a model with transposed weights), not
    read the other way; `fan_in_fan_out` (GPT-2's Conv1D) leaves square
    kernels to the other evidence."""
    rng = np.random.default_rng(2)
    d, f = 6, 4

    def leaf(x):
        return {"value": jnp.asarray(x)} if nnx_value else jnp.asarray(x)

    q = rng.standard_normal((d, d)).astype(np.float32)
    params = {"attn": {"q_proj": {"kernel": leaf(q)}}}
    mods = {"attn.q_proj": _factors(rng, d, d, 2)}
    path = peft_dir(tmp_path / "sq", mods)
    ad = lx.load_peft_adapter(path, params)
    forced = lx.load_peft_adapter(path, params, orientation="in_out")
    assert ad.layouts == forced.layouts and ad.layouts[0].in_axes == (0,)
    x = rng.standard_normal((2, d)).astype(np.float32)
    kpath = ad.paths[0]

    def fwd(p, x):
        k = p["attn"]["q_proj"]["kernel"]
        return x @ (k["value"] if nnx_value else k)

    out = lx.quaxify(fwd)(lx.loraify(params, ad, jnp.array([0, -1])), x)
    a, b = mods["attn.q_proj"]
    ref = x.astype(np.float64) @ (q + 4.0 * (b.astype(np.float64) @ a).T)  # 8 / 2
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[1], x[1] @ q, rtol=1e-5, atol=1e-5)
    # A kernel stored (out, in) for the module: refused, naming the fix.
    wrong = {"attn": {"q_proj": {"kernel": leaf(np.zeros((f, d), np.float32))}}}
    path2 = peft_dir(tmp_path / "ns", {"attn.q_proj": _factors(rng, d, f, 2)})
    with pytest.raises(lx.PeftFormatError, match="transposed shapes") as e:
        lx.load_peft_adapter(path2, wrong)
    assert re.escape(kpath) in str(e.value) or kpath in str(e.value)
    back = lx.load_peft_adapter(path2, wrong, orientation="out_in")
    assert back.layouts[0].in_axes == (1,)
    # fan_in_fan_out: the square kernel alone decides nothing.
    path3 = peft_dir(tmp_path / "fifo", mods, {"fan_in_fan_out": True})
    with pytest.raises(lx.PeftFormatError, match="orientation="):
        lx.load_peft_adapter(path3, params)


def test_a_second_spelling_with_equal_values_loads(tmp_path):
    """A key written with and without PEFT's prefix, equal: one copy is used."""
    rng = np.random.default_rng(0)
    mods = {"q_proj": _factors(rng, 4, 6, 2)}
    extra = {"q_proj.lora_A.weight": mods["q_proj"][0].copy()}
    path, params = _simple(tmp_path / "a", extra=extra, modules=mods)
    plain, _ = _simple(tmp_path / "b", modules=mods)
    got = lx.load_peft_adapter(path, params)
    want = lx.load_peft_adapter(plain, params)
    assert got.fingerprint() == want.fingerprint()


def test_integer_factors_are_refused_by_the_adapter_and_the_bank(tmp_path):
    """An Adapter cannot hold integer factors, so no bank casts and serves them."""
    params = {"q_proj": {"kernel": jnp.zeros((4, 6))}}
    ad = export_for_peft.random_adapter(params, [lx.LoraRule("q_proj", rank=2)], 0)
    a, b = ad.weights["q_proj/kernel"]
    with pytest.raises(TypeError, match="`a` at 'q_proj/kernel' has dtype int32"):
        lx.Adapter(
            {"q_proj/kernel": (np.asarray(a).astype(np.int32), b)},
            ad.layouts,
            ad.ranks,
            ad.alphas,
            ad.use_rslora,
        )


def test_skip_modules_leaves_out_what_the_jax_model_does_not_run(tmp_path):
    """PEFT's all-linear on a torch model adapts modules a Flax port lacks (a
    pooler a masked-LM forward never uses): the "no leaf" error says how to leave
    them out; `skip_modules` does, by name or prefix, and refuses a typo."""
    rng = np.random.default_rng(4)
    mods = {
        "q_proj": _factors(rng, 4, 6, 2),
        "pooler.dense": _factors(rng, 6, 6, 2),
    }
    path, params = _simple(tmp_path, {"target_modules": "all-linear"}, modules=mods)
    with pytest.raises(lx.PeftFormatError, match=r"skip_modules=\['pooler.dense'\]"):
        lx.load_peft_adapter(path, params)
    for skip in (["pooler"], ["pooler.dense"], ["base_model.model.pooler"]):
        ad = lx.load_peft_adapter(path, params, skip_modules=skip)
        assert ad.paths == ("q_proj/kernel",)
    only = _simple(tmp_path / "q", modules={"q_proj": mods["q_proj"]})[0]
    assert (
        lx.load_peft_adapter(path, params, skip_modules=["pooler"]).fingerprint()
        == lx.load_peft_adapter(only, params).fingerprint()
    )
    with pytest.raises(lx.PeftFormatError, match="skip_modules names \\['poolr'\\]"):
        lx.load_peft_adapter(path, params, skip_modules=["poolr"])
    with pytest.raises(TypeError, match="list of PEFT module names"):
        lx.load_peft_adapter(path, params, skip_modules="pooler")


def test_non_finite_alphas_in_the_config_are_non_finite_adapters(tmp_path):
    for i, cfg in enumerate(
        [{"lora_alpha": float("nan")}, {"alpha_pattern": {"q_proj": float("inf")}}]
    ):
        path, params = _simple(tmp_path / str(i), cfg)
        with pytest.raises(lx.NonFiniteAdapterError, match="adapter_config.json"):
            lx.load_peft_adapter(path, params)


def test_a_square_saved_module_on_a_bare_weight_is_not_guessed(tmp_path):
    """A module saved in full (`modules_to_save`) is oriented as a LoRA module
    is: on a square leaf named `weight` that is not an `eqx.nn.Linear`, nothing
    says which way round it is, so the loader asks instead of guessing; with
    `orientation=` each way gives that way's update."""
    rng = np.random.default_rng(9)
    base = rng.standard_normal((3, 3)).astype(np.float32)
    saved = rng.standard_normal((3, 3)).astype(np.float32)  # torch (out, in)
    params = {
        "q_proj": {"kernel": jnp.zeros((4, 6))},
        "classifier": {"weight": jnp.asarray(base)},
    }
    path = peft_dir(
        tmp_path,
        {"q_proj": _factors(rng, 4, 6, 2)},
        {"modules_to_save": ["classifier"]},
        extra={"base_model.model.classifier.weight": saved},
    )
    with pytest.raises(lx.PeftFormatError, match="orientation="):
        lx.load_peft_adapter(path, params)
    for way, want in (("out_in", saved), ("in_out", saved.T)):
        ad = lx.load_peft_adapter(
            path, params, orientation={"classifier": way, "q_proj": "in_out"}
        )
        merged = lx.merge(params, ad)["classifier"]["weight"]
        np.testing.assert_allclose(np.asarray(merged), want, rtol=1e-5, atol=1e-5)
