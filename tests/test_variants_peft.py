"""PEFT's LoRA variants (DoRA, IA3, VeRA) through `lx.load_peft_adapter`: the
parsed vectors against the files, one mixed batch of all of them against real
PEFT's logits (`tests/fixtures/peft/llama/variants`, made by
`tests/fixtures/make_variant_fixtures.py`), and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._core.paths import flatten_with_paths
from lorax_arrays._io.safetensors import read_safetensors, write_safetensors
from tests.peft_helpers import (
    PREFIX as P,
    RTOL,
    adapter_config,
    adapter_tensors,
    check_batch_equals_peft,
    export_for_peft,
    flax_kernel_path,
    module_names,
    peft_dir,
    rel_err,
)

VARIANTS = Path(__file__).parent / "fixtures" / "peft" / "llama" / "variants"
NAMES = ["dora", "ia3", "vera", "lora"]


@pytest.fixture(scope="module")
def llama():
    return export_for_peft.load_base("llama")


def _tensors(name: str) -> dict[str, np.ndarray]:
    return adapter_tensors(VARIANTS, name)


def _config(name: str) -> dict:
    return adapter_config(VARIANTS, name)


# ----------------------------------------------------------------------------
# Parsing: the vectors are the files' tensors, re-laid on the Flax (in, out)
# kernels.


def test_dora_parses_to_factors_and_magnitudes(llama):
    t = _tensors("dora")
    ad = lx.load_peft_adapter(VARIANTS / "adapters" / "dora", llama.params)
    modules = module_names(t, ".lora_magnitude_vector")
    assert len(modules) == 6 and sorted(ad.paths) == sorted(
        map(flax_kernel_path, modules)
    )
    for m in modules:
        p = flax_kernel_path(m)
        assert ad.kind(p) == "dora"
        a, b = ad.weights[p]
        np.testing.assert_array_equal(a, t[f"{P}{m}.lora_A.weight"].T)
        np.testing.assert_array_equal(b, t[f"{P}{m}.lora_B.weight"].T)
        np.testing.assert_array_equal(
            ad.magnitudes[p], t[f"{P}{m}.lora_magnitude_vector"]
        )
        assert ad.scale(p) == 8 / 4
    assert not ad.in_scales and not ad.out_scales


def test_ia3_parses_to_rank_zero_scales(llama):
    t = _tensors("ia3")
    ad = lx.load_peft_adapter(VARIANTS / "adapters" / "ia3", llama.params)
    modules = module_names(t, ".ia3_l")
    assert sorted(ad.paths) == sorted(map(flax_kernel_path, modules))
    flat = dict(flatten_with_paths(llama.params)[0])
    for m in modules:
        p, vec = flax_kernel_path(m), t[f"{P}{m}.ia3_l"]
        n_in, n_out = flat[p].shape
        assert ad.kind(p) == "ia3" and ad.ranks[ad.paths.index(p)] == 0
        a, b = ad.weights[p]
        assert a.shape == (n_in, 0) and b.shape == (0, n_out)
        if m.endswith("down_proj"):  # feedforward: scales the input
            assert p not in ad.out_scales
            np.testing.assert_array_equal(ad.in_scales[p], vec[0])
        else:
            assert p not in ad.in_scales
            np.testing.assert_array_equal(ad.out_scales[p], vec[:, 0])
    assert not ad.magnitudes


def test_vera_parses_to_a_plain_lora(llama):
    t = _tensors("vera")
    r = _config("vera")["r"]
    shared_a, shared_b = t["base_model.vera_A"], t["base_model.vera_B"]
    ad = lx.load_peft_adapter(VARIANTS / "adapters" / "vera", llama.params)
    modules = module_names(t, ".vera_lambda_b")
    assert sorted(ad.paths) == sorted(map(flax_kernel_path, modules))
    for m in modules:
        p = flax_kernel_path(m)
        lam_b, lam_d = t[f"{P}{m}.vera_lambda_b"], t[f"{P}{m}.vera_lambda_d"]
        a, b = ad.weights[p]
        n_in, n_out = a.shape[0], b.shape[1]
        assert ad.kind(p) == "lora" and ad.scale(p) == 1.0
        # Independently: A' = diag(d) A[:, :in] (r, in), B' = diag(b) B[:out] ...
        exp_a = (np.diag(lam_d) @ shared_a[:, :n_in]).T
        exp_b = (np.diag(lam_b) @ shared_b[:n_out, :]).T
        np.testing.assert_allclose(a, exp_a, rtol=1e-6)
        np.testing.assert_allclose(b, exp_b, rtol=1e-6)
        assert a.shape == (n_in, r)
        # ... and the product is PEFT's update for any x.
        x = np.random.default_rng(0).standard_normal((3, n_in)).astype(np.float32)
        peft = lam_b * ((lam_d * (x @ shared_a[:, :n_in].T)) @ shared_b[:n_out].T)
        np.testing.assert_allclose(x @ a @ b, peft, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# All four in one jitted batch, against PEFT's logits of each adapter alone.


def test_mixed_variant_batch_equals_peft(llama):
    adapters = [
        lx.load_peft_adapter(VARIANTS / "adapters" / n, llama.params) for n in NAMES
    ]
    check_batch_equals_peft(llama, VARIANTS / "logits.npz", adapters, NAMES)


# ----------------------------------------------------------------------------
# Stacked leaves (a scanned layer stack): per-layer vectors, identities for
# layers the adapter lacks.


def _stacked_tree(rng):
    w = rng.standard_normal((3, 4, 6)).astype(np.float32)  # (layer, in, out)
    return {"layers": {"q_proj": {"kernel": jnp.asarray(w)}}}, w


def test_stacked_dora_and_ia3(tmp_path):
    rng = np.random.default_rng(0)
    tree, w = _stacked_tree(rng)
    a = rng.standard_normal((2, 4)).astype(np.float32)
    b = rng.standard_normal((6, 2)).astype(np.float32)
    m = rng.random(6).astype(np.float32) + 0.5
    path = peft_dir(
        tmp_path / "dora",
        {"layers.1.q_proj": (a, b)},
        {"use_dora": True},
        extra={f"{P}layers.1.q_proj.lora_magnitude_vector": m},
    )
    ad = lx.load_peft_adapter(path, tree)
    p = "layers/q_proj/kernel"
    assert ad.layouts[0].stack_axes == (0,) and ad.kind(p) == "dora"
    mag = np.asarray(ad.magnitudes[p])
    np.testing.assert_array_equal(mag[1], m)
    # Layers 0 and 2 have zero factors and the base norm: DoRA is the identity.
    for layer in (0, 2):
        np.testing.assert_allclose(
            mag[layer], np.linalg.norm(w[layer], axis=0), rtol=1e-6
        )
        assert not np.any(np.asarray(ad.weights[p][1])[layer])

    vec = rng.random((6, 1)).astype(np.float32)
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    write_safetensors(
        ia3 / "adapter_model.safetensors", {f"{P}layers.2.q_proj.ia3_l": vec}
    )
    (ia3 / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "IA3",
                "target_modules": ["q_proj"],
                "feedforward_modules": [],
            }
        )
    )
    ad = lx.load_peft_adapter(ia3, tree)
    assert ad.ranks == (0,) and ad.kind(p) == "ia3"
    np.testing.assert_array_equal(
        ad.out_scales[p], np.stack([np.ones(6), np.ones(6), vec[:, 0]])
    )


# ----------------------------------------------------------------------------
# Refusals.


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(VARIANTS / "adapters" / name, dst)
    return dst


def _rewrite(path: Path, tensors=None, config=None) -> None:
    if tensors is not None:
        write_safetensors(path / "adapter_model.safetensors", tensors)
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(config)
        (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_dora_on_an_embedding_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    tree = {"embed_tokens": {"embedding": jnp.zeros((10, 6))}}
    a = rng.standard_normal((2, 10)).astype(np.float32)
    b = rng.standard_normal((6, 2)).astype(np.float32)
    path = peft_dir(
        tmp_path,
        {"embed_tokens": ("embedding", a, b)},
        {"use_dora": True},
        extra={f"{P}embed_tokens.lora_magnitude_vector": np.ones(6, np.float32)},
    )
    with pytest.raises(lx.PeftFormatError, match="embedding with DoRA"):
        lx.load_peft_adapter(path, tree)


def test_dora_file_without_magnitudes_is_refused(llama, tmp_path):
    path = _copy("dora", tmp_path)
    t = {k: v for k, v in _tensors("dora").items() if "magnitude" not in k}
    _rewrite(path, tensors=t)
    with pytest.raises(lx.PeftFormatError, match="no lora_magnitude_vector"):
        lx.load_peft_adapter(path, llama.params)
    _rewrite(path, tensors=_tensors("dora"), config={"use_dora": False})
    with pytest.raises(lx.PeftFormatError, match="does not set use_dora"):
        lx.load_peft_adapter(path, llama.params)


def test_vera_without_projections_is_refused(llama, tmp_path):
    path = _copy("vera", tmp_path)
    _rewrite(
        path,
        tensors={k: v for k, v in _tensors("vera").items() if "lambda" in k},
        config={"save_projection": False},
    )
    with pytest.raises(lx.PeftFormatError, match="save_projection=False.*PyTorch"):
        lx.load_peft_adapter(path, llama.params)
    _rewrite(path, config={"save_projection": True})
    with pytest.raises(lx.PeftFormatError, match="shared projections"):
        lx.load_peft_adapter(path, llama.params)


def test_ia3_next_to_a_bias_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "k_proj": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros(6)},
        "down_proj": {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros(4)},
    }
    path = tmp_path / "ia3"
    path.mkdir()
    cfg = {
        "peft_type": "IA3",
        "target_modules": ["k_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {
        f"{P}k_proj.ia3_l": rng.random((6, 1)).astype(np.float32),
        f"{P}down_proj.ia3_l": rng.random((1, 6)).astype(np.float32),
    }
    _rewrite(path, tensors=tensors)
    with pytest.raises(lx.PeftFormatError, match="including its bias.*'k_proj/bias'"):
        lx.load_peft_adapter(path, tree)
    # Input scaling (a feedforward module) is unaffected by the bias.
    del tensors[f"{P}k_proj.ia3_l"]
    _rewrite(path, tensors=tensors)
    ad = lx.load_peft_adapter(path, tree)
    assert ad.kind("down_proj/kernel") == "ia3"


@pytest.mark.parametrize(
    "name, tensors, config, match",
    [
        ("ia3", {"x.ia3_l": np.ones((6, 1))}, {"peft_type": "OFT"}, "OFT"),
        ("ia3", {"x.lora_A.weight": np.ones((2, 6))}, None, "another PEFT method"),
        ("ia3", {"x.ia3_l.bias": np.ones((6, 1))}, None, "not a IA3 weight"),
        ("ia3", None, {"feedforward_modules": ["k_proj"]}, "ia3_l should be"),
        ("ia3", None, {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("vera", {"x.vera_lambda_c": np.ones(8)}, None, "not a VeRA weight"),
        ("vera", None, {"bias": "all"}, "bias='all'"),
        ("vera", None, {"target_modules": ["k_proj"]}, "does not select"),
        ("dora", {"x.lora_magnitude_vector.weight": np.ones(6)}, None, "LoRA weight"),
    ],
)
def test_variant_files_are_checked(llama, tmp_path, name, tensors, config, match):
    path = _copy(name, tmp_path)
    if tensors is not None:
        extra = {
            f"{P}model.layers.0.self_attn.{k}": v.astype(np.float32)
            for k, v in tensors.items()
        }
        _rewrite(path, tensors={**_tensors(name), **extra})
    _rewrite(path, config=config)
    with pytest.raises(lx.PeftFormatError, match=match):
        lx.load_peft_adapter(path, llama.params)


# ----------------------------------------------------------------------------
# PEFT's convolution LoRA on a tiny CNN (`tests/fixtures/make_conv_fixture.py`),
# on Flax HWIO kernels and on Equinox-style OIHW weights.

CNN = Path(__file__).parent / "fixtures" / "peft" / "cnn"


def _cnn_params(layout: str) -> dict:
    t = read_safetensors(CNN / "base.safetensors")[0]
    params = {}
    for m in ("conv1", "conv2", "head"):
        w = t[f"{m}.weight"]
        if layout == "flax":
            w = w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)
        name = "kernel" if layout == "flax" else "weight"
        params[m] = {name: jnp.asarray(w), "bias": jnp.asarray(t[f"{m}.bias"])}
    return params


def _cnn(params: dict, x, layout: str):
    """The fixture's CNN: conv(3x3, pad 1), relu, conv(3x2, stride 2), relu, mean
    over space, linear head. `x` is NCHW."""
    if layout == "flax":
        dn, space, h = ("NHWC", "HWIO", "NHWC"), (1, 2), jnp.transpose(x, (0, 2, 3, 1))
        w = lambda m: params[m]["kernel"]  # noqa: E731
        bias = lambda m: params[m]["bias"]  # noqa: E731
    else:
        dn, space, h = ("NCHW", "OIHW", "NCHW"), (2, 3), x
        w = lambda m: params[m]["weight"]  # noqa: E731
        bias = lambda m: params[m]["bias"][:, None, None]  # noqa: E731
    for m, stride, pad in (("conv1", 1, 1), ("conv2", 2, 0)):
        h = jax.lax.conv_general_dilated(
            h, w(m), (stride, stride), [(pad, pad)] * 2, dimension_numbers=dn
        )
        h = jax.nn.relu(h + bias(m))
    h = h.mean(space)
    head = w("head") if layout == "flax" else w("head").T
    return h @ head + params["head"]["bias"]


@pytest.mark.parametrize("layout", ["flax", "eqx"])
def test_conv_lora_equals_peft(layout):
    t = read_safetensors(CNN / "adapter" / "adapter_model.safetensors")[0]
    data = np.load(CNN / "data.npz")
    params = _cnn_params(layout)
    ad = lx.load_peft_adapter(CNN / "adapter", params)
    name = "kernel" if layout == "flax" else "weight"
    for m in ("conv1", "conv2"):
        a_t, b_t = t[f"{P}{m}.lora_A.weight"], t[f"{P}{m}.lora_B.weight"]
        lay = ad.layouts[ad.paths.index(f"{m}/{name}")]
        a, b = ad.weights[lay.path]
        if layout == "flax":  # (kh, kw, I, O): in (0, 1, 2), out (3,)
            assert (lay.in_axes, lay.out_axes) == ((0, 1, 2), (3,))
            np.testing.assert_array_equal(a, a_t.transpose(2, 3, 1, 0))
        else:  # (O, I, kh, kw): in (1, 2, 3), out (0,)
            assert (lay.in_axes, lay.out_axes) == ((1, 2, 3), (0,))
            np.testing.assert_array_equal(a, a_t.transpose(1, 2, 3, 0))
        np.testing.assert_array_equal(b, b_t[:, :, 0, 0].T)
    stack = lx.stack_adapters([ad])
    rows = [0, -1, 0, -1]
    base = jax.jit(lambda p, x: _cnn(p, x, layout))(params, data["x"])
    assert rel_err(base, data["base"]) < RTOL
    forward = jax.jit(lx.quaxify(lambda p, x: _cnn(p, x, layout)))
    out = forward(lx.loraify(params, stack, jnp.asarray(rows)), data["x"])
    for i, r in enumerate(rows):
        want = data["lora"] if r == 0 else data["base"]
        assert rel_err(out[i], want[i]) < RTOL
    assert rel_err(data["lora"], data["base"]) > 50 * RTOL


def test_conv_lora_on_a_wrong_leaf_is_refused():
    params = _cnn_params("flax")
    params["conv2"]["kernel"] = jnp.zeros((2, 3, 4, 6))
    with pytest.raises(lx.PeftFormatError, match="convolution with in=4"):
        lx.load_peft_adapter(CNN / "adapter", params)


# ----------------------------------------------------------------------------
# Layout inference for conv kernels.


def test_conv_layers_have_a_default_layout():
    import equinox as eqx
    from flax import nnx

    key = jax.random.PRNGKey(0)
    tree = {
        "e2": eqx.nn.Conv2d(3, 5, (3, 2), key=key),
        "e1t": eqx.nn.ConvTranspose1d(3, 5, 3, key=key),
        "n2": nnx.Conv(3, 5, (3, 2), rngs=nnx.Rngs(0)),
    }
    got = {
        m.layout.path: (m.layout.in_axes, m.layout.out_axes)
        for m in lx.match_rules(tree, lx.LoraRule("e2|e1t|n2", 2))
    }
    assert got == {
        "e2/weight": ((1, 2, 3), (0,)),  # (O, I, kh, kw)
        "e1t/weight": ((1, 2), (0,)),  # (O, I, k)
        "n2/kernel/value": ((0, 1, 2), (3,)),  # (kh, kw, I, O)
    }
    # A vmapped stack of convs has no default (its stack axis is not known) ...
    stacked = eqx.filter_vmap(lambda k: eqx.nn.Conv2d(3, 5, 3, key=k))(
        jax.random.split(key, 2)
    )
    with pytest.raises(ValueError, match="stack_axes"):
        lx.match_rules({"s": stacked}, lx.LoraRule("s/weight", 2))
    # ... and with its stack axis named, it is an ordinary (in, out) split.
    lay = lx.match_rules(
        {"s": stacked}, lx.LoraRule("s/weight", 2, out_axes=1, stack_axes=0)
    )[0].layout
    assert (lay.in_axes, lay.out_axes, lay.stack_axes) == ((2, 3, 4), (1,), (0,))


def test_bare_conv_kernel_error_names_the_conv_layouts():
    tree = {"params": {"Conv_0": {"kernel": jnp.zeros((3, 3, 2, 4))}}}
    with pytest.raises(ValueError, match="`out_axes=-1` for a Flax HWIO conv kernel"):
        lx.match_rules(tree, lx.LoraRule("kernel", 2))
    lay = lx.match_rules(tree, lx.LoraRule("kernel", 2, out_axes=-1))[0].layout
    assert (lay.in_axes, lay.out_axes) == ((0, 1, 2), (3,))


def test_save_peft_writes_variants(llama, tmp_path):
    # DoRA and IA3 are written as themselves (tests/test_peft_export.py checks
    # them against PEFT); the vectors read back the same.
    for name in ("dora", "ia3"):
        ad = lx.load_peft_adapter(VARIANTS / "adapters" / name, llama.params)
        lx.save_peft_adapter(tmp_path / name, ad)
        back = lx.load_peft_adapter(tmp_path / name, llama.params)
        for field in ("magnitudes", "in_scales", "out_scales"):
            for p, v in getattr(ad, field).items():
                np.testing.assert_array_equal(v, getattr(back, field)[p])
    # VeRA is a plain LoRA: it writes, and reads back the same.
    ad = lx.load_peft_adapter(VARIANTS / "adapters" / "vera", llama.params)
    lx.save_peft_adapter(tmp_path / "vera", ad)
    back = lx.load_peft_adapter(tmp_path / "vera", llama.params)
    for p in ad.paths:
        for x, y in zip(ad.weights[p], back.weights[p]):
            np.testing.assert_array_equal(x, y)
        assert back.scale(p) == 1.0
