"""`lx.save_peft_adapter` for every kind it writes: conv LoRA, DoRA and IA3 (plain
LoRA, VeRA and the layer-stack / fused-kernel cases are in tests/test_peft.py).

Against real PEFT: the directories `tests/fixtures/export_for_peft.py` writes
(today's export must write them again, byte for byte) were loaded by PEFT 0.21 on
the torch models (`make_conv_fixture.py --exported`, `make_peft_fixtures.py
--exported`), and PEFT's outputs are the reference for ours on the Flax / Equinox
twins of those models, within 2e-4 relative. PEFT's own conv, DoRA and IA3
directories read and written back are PEFT's files again.

Unit round trips: save, then `load_peft_adapter`, gives the same factors, vectors
and layouts (hypothesis over conv kernels and channel counts, layer stacks,
multi-axis weights); refusals name the leaves and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from lorax_arrays._io.peft._convert import _is_feedforward
from lorax_arrays._io.safetensors import read_safetensors
from tests.peft_helpers import PEFT, RTOL, export_for_peft, rel_err, same_peft_dir

P = "base_model.model."
VARIANTS = PEFT / "llama" / "variants" / "adapters"
FIELDS = ("magnitudes", "in_scales", "out_scales")


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    return read_safetensors(directory / "adapter_model.safetensors")[0]


def _config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def _canonical(ad: lx.Adapter, p: str):
    """The layout, factors and vectors of leaf `p` with each axis group in
    increasing axis order (how `load_peft_adapter` lays a leaf out)."""
    lay = ad.layouts[ad.paths.index(p)]
    ns, ins, outs = len(lay.stack_axes), lay.in_axes, lay.out_axes
    stack = list(range(ns))
    a, b = (np.asarray(x) for x in ad.lora_factors(p))
    a = np.transpose(a, [*stack, *(ns + np.argsort(ins)), ns + len(ins)])
    b = np.transpose(b, [*stack, ns, *(ns + 1 + np.argsort(outs))])
    vectors = {}
    for f in FIELDS:
        if p in getattr(ad, f):
            axes = ins if f == "in_scales" else outs
            v = np.asarray(getattr(ad, f)[p])
            vectors[f] = np.transpose(v, [*stack, *(ns + np.argsort(axes))])
    key = (lay.path, lay.shape, tuple(sorted(ins)), tuple(sorted(outs)), lay.stack_axes)
    return key, a, b, vectors


def assert_same_adapter(back: lx.Adapter, ad: lx.Adapter) -> None:
    """The same leaves, layouts, scales, factors and vectors, exactly (each axis
    group in increasing order, as the loader lays leaves out)."""
    assert back.paths == ad.paths
    for p in ad.paths:
        assert back.kind(p) == ("lora" if ad.kind(p) == "vera" else ad.kind(p))
        assert back.scale(p) == pytest.approx(ad.scale(p), rel=1e-6)
        (k1, a1, b1, v1), (k2, a2, b2, v2) = _canonical(back, p), _canonical(ad, p)
        assert k1 == k2
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
        assert sorted(v1) == sorted(v2), p
        for f in v1:
            np.testing.assert_array_equal(v1[f], v2[f])


# ----------------------------------------------------------------------------
# The conv models of make_conv_fixture.py in JAX: convs (stride, padding),
# activation, mean over space, then the head (a Linear per position and the mean
# over time commute, so conv1d's `out` comes last too).

CONV_NETS = {
    "cnn": ([("conv1", 1, 1), ("conv2", 2, 0)], jax.nn.relu, "head"),
    "conv1d": ([("conv1", 1, 1), ("conv2", 2, 1)], jnp.tanh, "out"),
    "conv3d": ([("conv", 1, (0, 1, 0))], jnp.tanh, "head"),
}


def conv_forward(model: str, layout: str, params: dict, x):
    """`x` is channels first (torch's); a "flax" tree holds `(*k, I, O)` kernels,
    an "eqx" one `(O, I, *k)` weights (see export_for_peft.CONV_SPECS)."""
    convs, act, head = CONV_NETS[model]
    nd = x.ndim - 2
    space = "DHW"[3 - nd :]
    if layout == "flax":
        h, w = jnp.moveaxis(x, 1, -1), lambda m: params[m]["kernel"]  # noqa: E731
        dn = (f"N{space}C", f"{space}IO", f"N{space}C")
        bias = lambda m: params[m]["bias"]  # noqa: E731
        axes = tuple(range(1, nd + 1))
    else:
        h, w = x, lambda m: params[m]["weight"]  # noqa: E731
        dn = (f"NC{space}", f"OI{space}", f"NC{space}")
        bias = lambda m: params[m]["bias"].reshape(-1, *(1,) * nd)  # noqa: E731
        axes = tuple(range(2, nd + 2))
    for m, stride, pad in convs:
        pads = [(p, p) for p in (pad if isinstance(pad, tuple) else (pad,) * nd)]
        h = jax.lax.conv_general_dilated(
            h, w(m), (stride,) * nd, pads, dimension_numbers=dn
        )
        h = act(h + bias(m))
    h = h.mean(axes)
    k = w(head)
    if layout == "eqx":
        h = h @ k.T
    elif k.ndim == 3:  # a DenseGeneral kernel (heads, features, out)
        h = jnp.einsum("bnf,nfo->bo", h.reshape(h.shape[0], *k.shape[:2]), k)
    else:
        h = h @ k
    return h + params[head]["bias"]


# ----------------------------------------------------------------------------
# Against PEFT: conv LoRA.


@pytest.mark.parametrize(
    "model, layout",
    [(m, lay) for m, layouts in export_for_peft.CONV_SPECS.items() for lay in layouts],
)
def test_conv_export_loads_in_peft_with_the_same_outputs(model, layout, tmp_path):
    """A conv LoRA made here on Flax `(*k, I, O)` kernels or Equinox `(O, I, *k)`
    weights (1-, 2- and 3-D), exported: the directory PEFT loaded onto its
    `nn.Conv1d/2d/3d` (lora_A `(r, I, *k)`, lora_B `(O, r, 1, ...)`), and PEFT's
    outputs for it are ours."""
    ((_, _, ad),) = [
        e for e in export_for_peft.exported_conv_adapters() if e[:2] == (model, layout)
    ]
    golden_dir = PEFT / model / "exported" / layout
    lx.save_peft_adapter(tmp_path, ad)
    same_peft_dir(tmp_path, golden_dir)
    tensors = _tensors(tmp_path)
    params = export_for_peft.conv_params(model, layout)
    for lay in ad.layouts:
        module = lay.path.split("/")[0]
        a, b = (
            tensors[f"{P}{module}.lora_A.weight"],
            tensors[f"{P}{module}.lora_B.weight"],
        )
        if module.startswith("conv"):  # torch's conv weight (O, I, *k)
            torch_w = (
                lay.shape if layout == "eqx" else (lay.shape[-1], *lay.shape[-2::-1])
            )
            k = lay.shape[:-2] if layout == "flax" else lay.shape[2:]
            assert a.shape == (ad.ranks[ad.paths.index(lay.path)], torch_w[1], *k)
            assert b.shape == (torch_w[0], a.shape[0], *(1,) * len(k))
        else:  # a Linear, the DenseGeneral (2, 3, 4) kernel too: 2-D
            assert a.ndim == 2 and b.ndim == 2
    back = lx.load_peft_adapter(tmp_path, params)
    assert_same_adapter(back, ad)

    data = np.load(PEFT / model / "data.npz")
    golden = np.load(PEFT / model / "exported_outputs.npz")[layout]
    x = jnp.asarray(data["x"])
    base = conv_forward(model, layout, params, x)
    assert rel_err(base, data["base"]) < RTOL
    rows = np.arange(x.shape[0]) % 2 - 1  # base rows among the adapted ones
    forward = jax.jit(lx.quaxify(lambda p, x: conv_forward(model, layout, p, x)))
    out = forward(lx.loraify(params, lx.stack_adapters([back]), jnp.asarray(rows)), x)
    for i, r in enumerate(rows):
        assert rel_err(out[i], (golden if r == 0 else data["base"])[i]) < RTOL
    assert rel_err(golden, data["base"]) > 50 * RTOL


@pytest.mark.parametrize("model", list(export_for_peft.CONV_SPECS))
@pytest.mark.parametrize("layout", ["flax", "eqx"])
def test_peft_conv_adapter_reads_and_writes_back(model, layout, tmp_path):
    """PEFT's own conv LoRA (Conv1d, Conv2d, Conv3d): read onto either layout it
    serves PEFT's outputs, and written back it is PEFT's file again."""
    src = PEFT / model / "adapter"
    params = export_for_peft.conv_params(model, layout)
    ad = lx.load_peft_adapter(src, params)
    data = np.load(PEFT / model / "data.npz")
    x = jnp.asarray(data["x"])
    forward = jax.jit(lx.quaxify(lambda p, x: conv_forward(model, layout, p, x)))
    idx = jnp.zeros((x.shape[0],), jnp.int32)
    out = forward(lx.loraify(params, lx.stack_adapters([ad]), idx), x)
    assert rel_err(out, data["lora"]) < RTOL
    lx.save_peft_adapter(tmp_path, ad)
    want, got = _tensors(src), _tensors(tmp_path)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])
    src_cfg, cfg = _config(src), _config(tmp_path)
    assert (cfg["r"], cfg["lora_alpha"]) == (src_cfg["r"], src_cfg["lora_alpha"])
    assert sorted(cfg["target_modules"]) == sorted(src_cfg["target_modules"])


# ----------------------------------------------------------------------------
# Against PEFT: DoRA and IA3 on the Llama fixture.


@pytest.fixture(scope="module")
def llama():
    return export_for_peft.load_base("llama")


def test_variant_exports_load_in_peft_with_the_same_outputs(llama, tmp_path):
    """DoRA (mixed ranks, alphas, rsLoRA) and IA3 (output scaling on k/v, input
    scaling on the MLP's feedforward modules) made here and exported: what PEFT
    loaded (LoraConfig with use_dora, IA3Config), and its logits are ours, served
    in one batch with base rows."""
    entries = export_for_peft.exported_variant_adapters()
    names = [name for _, name, _ in entries]
    assert names == ["d1", "i1"]
    backs = []
    for _, name, ad in entries:
        lx.save_peft_adapter(tmp_path / name, ad)
        same_peft_dir(tmp_path / name, PEFT / "llama" / "exported" / name)
        back = lx.load_peft_adapter(tmp_path / name, llama.params)
        assert_same_adapter(back, ad)
        backs.append(back)
    d1, i1 = (_config(PEFT / "llama" / "exported" / n) for n in names)
    assert d1["peft_type"] == "LORA" and d1["use_dora"] is True
    assert i1["peft_type"] == "IA3" and set(i1["feedforward_modules"]) == {
        f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("up_proj", "down_proj")
    }
    golden = np.load(PEFT / "llama" / "exported_logits.npz")
    base = np.load(PEFT / "llama" / "logits.npz")["base"]
    ids = jnp.asarray(golden["input_ids"], jnp.int32)
    stack = lx.stack_adapters(backs, names=names)
    rows = [names[i % 3] if i % 3 < 2 else None for i in range(ids.shape[0])]
    forward = jax.jit(lx.quaxify(lambda p, ids: llama(ids, params=p).logits))
    out = forward(lx.loraify(llama.params, stack, stack.indices(rows)), ids)
    for i, row in enumerate(rows):
        want = base[i] if row is None else golden[row][i]
        assert rel_err(out[i], want) < RTOL, row
    for name in names:
        assert rel_err(golden[name], base) > 1e-2


@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_peft_variant_adapter_writes_back_as_peft_wrote_it(llama, tmp_path, name):
    """PEFT's own DoRA and IA3 directories, read and written back: the same
    tensors (shapes, dtypes, values) under the same keys, and a config that
    makes the same modules DoRA / feedforward."""
    src = VARIANTS / name
    ad = lx.load_peft_adapter(src, llama.params)
    lx.save_peft_adapter(tmp_path, ad)
    want, got = _tensors(src), _tensors(tmp_path)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])
    src_cfg, cfg = _config(src), _config(tmp_path)
    assert cfg["peft_type"] == src_cfg["peft_type"]
    modules = sorted({k[len(P) :].rsplit(".", 1)[0] for k in want if "ia3_l" in k})
    if name == "dora":
        assert cfg["use_dora"] is True and cfg["r"] == src_cfg["r"]
    for m in modules:
        assert _is_feedforward(cfg, m) == _is_feedforward(src_cfg, m)
    assert_same_adapter(lx.load_peft_adapter(tmp_path, llama.params), ad)


# ----------------------------------------------------------------------------
# Unit round trips.


def _randomised(ad: lx.Adapter, seed: int) -> lx.Adapter:
    """`ad` with every factor drawn at random and every vector around its initial
    value (never zero, never one)."""
    rng = np.random.default_rng(seed)
    draw = lambda x: rng.standard_normal(x.shape).astype(np.float32)  # noqa: E731
    return lx.Adapter(
        weights={p: (draw(a), draw(b)) for p, (a, b) in ad.weights.items()},
        layouts=ad.layouts,
        ranks=ad.ranks,
        alphas=ad.alphas,
        use_rslora=ad.use_rslora,
        **{
            f: {p: 1.5 + 0.4 * np.tanh(draw(v)) for p, v in getattr(ad, f).items()}
            for f in FIELDS
        },
    )


def _roundtrip(tmp_path: Path, tree, ad: lx.Adapter, **kw) -> lx.Adapter:
    lx.save_peft_adapter(tmp_path, ad, **kw)
    back = lx.load_peft_adapter(tmp_path, tree)
    assert_same_adapter(back, ad)
    return back


@settings(max_examples=8)
@given(
    n_space=st.integers(1, 3),
    kernel=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    n_in=st.integers(1, 5),
    n_out=st.integers(1, 5),
    rank=st.integers(1, 3),
    layout=st.sampled_from(["flax", "eqx"]),
    n_layers=st.sampled_from([0, 2]),
    seed=st.integers(0, 2**16),
)
def test_conv_roundtrip(
    tmp_path_factory, n_space, kernel, n_in, n_out, rank, layout, n_layers, seed
):
    """Any 1-3-D conv kernel, either layout, alone or in a layer stack: saved as
    PEFT's `(r, I, *k)` / `(O, r, 1, ...)` (checked against the factors
    directly) and read back to the same adapter."""
    k = tuple(kernel[:n_space])
    flax = layout == "flax"
    shape = (*k, n_in, n_out) if flax else (n_out, n_in, *k)
    stack = (n_layers,) if n_layers else ()
    name = "kernel" if flax else "weight"
    parent = {"conv": {name: jnp.zeros((*stack, *shape))}}
    tree = {"layers": parent} if n_layers else parent
    rule = lx.LoraRule(
        name,
        rank,
        alpha=2.0,
        out_axes=len(stack) + (len(shape) - 1 if flax else 0),
        stack_axes=tuple(range(len(stack))),
    )
    ad = _randomised(lx.init_adapter(tree, rule, key=jax.random.PRNGKey(0)), seed)
    tmp = tmp_path_factory.mktemp("conv")
    _roundtrip(tmp, tree, ad)
    (path,) = ad.paths
    a, b = (np.asarray(x) for x in ad.weights[path])
    tensors = _tensors(tmp)
    for e in np.ndindex(*stack):
        module = f"layers.{e[0]}.conv" if stack else "conv"
        a_t, b_t = (
            tensors[f"{P}{module}.lora_A.weight"],
            tensors[f"{P}{module}.lora_B.weight"],
        )
        # PEFT's A[r, i, *k] is the kernel's factor at (*k, i) (flax) or (i, *k).
        want_a = (
            np.moveaxis(a[e], (-2, -1), (0, 1)).transpose(1, 0, *range(2, n_space + 2))
            if flax
            else np.moveaxis(a[e], -1, 0)
        )
        np.testing.assert_array_equal(a_t, want_a)
        np.testing.assert_array_equal(b_t, b[e].T.reshape(n_out, rank, *(1,) * n_space))


def test_a_multi_axis_dense_kernel_is_not_a_conv(tmp_path):
    """A Flax `(k, I, O)` conv kernel and a DenseGeneral `(N, H, D)` kernel with
    two in-axes (linen attention's `out`) have the same layout: only a path that
    names a convolution (or `conv=`) makes the leaf PEFT's conv LoRA. 2-D and 3-D
    conv layouts and Equinox `(O, I, k)` weights are convs by layout."""
    tree = {
        "attn": {"out": {"kernel": jnp.zeros((2, 3, 4))}},  # (N, H, D)
        "q": {"kernel": jnp.zeros((4, 2, 3))},  # (D, N, H): one in-axis
        "conv1": {"kernel": jnp.zeros((3, 5, 6))},  # Whisper's (k, I, O)
        "patch": {"kernel": jnp.zeros((2, 2, 3, 4))},  # ViT (kh, kw, C, D)
        "e": {"weight": jnp.zeros((4, 6, 3))},  # Equinox Conv1d (O, I, k)
    }
    rules = [
        lx.LoraRule("attn|conv1|patch", 2, out_axes=-1),
        lx.LoraRule("^q", 2, in_axes=0),
        lx.LoraRule("^e", 2, out_axes=0),
    ]
    ad = _randomised(lx.init_adapter(tree, rules, key=jax.random.PRNGKey(0)), 1)
    _roundtrip(tmp_path / "a", tree, ad)
    t = _tensors(tmp_path / "a")
    shapes = {k[len(P) :]: v.shape for k, v in t.items() if "lora_A" in k}
    assert shapes == {
        "attn.out.lora_A.weight": (2, 6),
        "q.lora_A.weight": (2, 4),
        "conv1.lora_A.weight": (2, 5, 3),
        "patch.lora_A.weight": (2, 3, 2, 2),
        "e.lora_A.weight": (2, 6, 3),
    }
    # conv= decides instead: here only attn/out is a convolution (an odd model).
    lx.save_peft_adapter(tmp_path / "b", ad, conv=[r"attn/out"])
    shapes = {k: v.shape for k, v in _tensors(tmp_path / "b").items()}
    assert shapes[f"{P}attn.out.lora_A.weight"] == (2, 3, 2)
    assert shapes[f"{P}conv1.lora_A.weight"] == (2, 15)
    assert shapes[f"{P}patch.lora_A.weight"] == (2, 12)
    lx.save_peft_adapter(tmp_path / "c", ad, conv=r"conv1|patch")
    t = _tensors(tmp_path / "c")
    assert t[f"{P}attn.out.lora_A.weight"].shape == (2, 6)
    assert t[f"{P}e.lora_A.weight"].shape == (2, 18)
    with pytest.raises(ValueError, match=r"conv= names 'q/kernel'.*not a convolution"):
        lx.save_peft_adapter(tmp_path / "d", ad, conv="q")


def _variant_tree(rng):
    return {
        "q": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)},
        # (D, N, H): multi-axis out
        "k": {"kernel": jnp.asarray(rng.standard_normal((4, 2, 3)), jnp.float32)},
        "layers": {
            "down": {"kernel": jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)}
        },
    }


@pytest.mark.parametrize("variant", ["dora", "ia3"])
def test_variant_roundtrip(tmp_path, variant):
    """DoRA magnitudes and IA3 vectors (on the output, and on the input of
    feedforward modules) on a 2-D leaf, a multi-axis leaf whose out-axes are not
    in increasing order and a layer stack: read back as they were, flattened as
    lora_B's rows (DoRA, IA3 on the output) or lora_A's columns (IA3 on the input)."""
    rng = np.random.default_rng(0)
    tree = _variant_tree(rng)
    if variant == "dora":
        rules = [
            lx.LoraRule("^q", 2, alpha=3.0, variant="dora"),
            lx.LoraRule("^k", 3, in_axes=0, out_axes=(2, 1), variant="dora"),
            lx.LoraRule(
                "down", 2, alpha=5.0, use_rslora=True, stack_axes=0, variant="dora"
            ),
        ]
    else:
        rules = [
            lx.LoraRule("^q", 0, variant="ia3"),
            lx.LoraRule("^k", 0, in_axes=0, out_axes=(2, 1), variant="ia3"),
            lx.LoraRule("down", 0, stack_axes=0, variant="ia3_feedforward"),
        ]
    ad = _randomised(lx.init_adapter(tree, rules, key=jax.random.PRNGKey(0)), 3)
    _roundtrip(tmp_path, tree, ad)
    t, cfg = _tensors(tmp_path), _config(tmp_path)
    # k's vector is laid out (H, N) (its out_axes (2, 1)); PEFT's out is (N, H).
    field = "magnitudes" if variant == "dora" else "out_scales"
    k_vec = np.asarray(getattr(ad, field)["k/kernel"]).T.reshape(-1)
    if variant == "dora":
        assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
        np.testing.assert_array_equal(t[f"{P}k.lora_magnitude_vector"], k_vec)
        assert t[f"{P}layers.1.down.lora_magnitude_vector"].shape == (6,)
    else:
        assert cfg["peft_type"] == "IA3" and "r" not in cfg
        np.testing.assert_array_equal(t[f"{P}k.ia3_l"], k_vec[:, None])
        assert t[f"{P}q.ia3_l"].shape == (4, 1)
        assert t[f"{P}layers.2.down.ia3_l"].shape == (1, 5)
        assert cfg["feedforward_modules"] == [f"layers.{i}.down" for i in range(3)]


def test_identity_entries_of_a_stack(tmp_path):
    """Entries of a layer stack the adapter leaves alone are left out (IA3
    vectors of ones, zero LoRA factors); a DoRA entry with zero factors still
    scales its output by its magnitude, so it is written."""
    rng = np.random.default_rng(1)
    tree = _variant_tree(rng)
    ia3 = _randomised(
        lx.init_adapter(
            tree,
            lx.LoraRule("down", 0, stack_axes=0, variant="ia3"),
            key=jax.random.PRNGKey(0),
        ),
        0,
    )
    vec = np.array(ia3.out_scales["layers/down/kernel"])
    vec[1] = 1.0
    ia3 = lx.Adapter(
        weights=ia3.weights,
        layouts=ia3.layouts,
        ranks=ia3.ranks,
        alphas=ia3.alphas,
        use_rslora=ia3.use_rslora,
        out_scales={"layers/down/kernel": vec},
    )
    _roundtrip(tmp_path / "ia3", tree, ia3)
    assert sorted(_tensors(tmp_path / "ia3")) == [
        f"{P}layers.0.down.ia3_l",
        f"{P}layers.2.down.ia3_l",
    ]
    dora = _randomised(
        lx.init_adapter(
            tree,
            lx.LoraRule("down", 2, stack_axes=0, variant="dora"),
            key=jax.random.PRNGKey(0),
        ),
        0,
    )
    a, b = (np.array(x) for x in dora.weights["layers/down/kernel"])
    b[1] = 0.0
    dora = lx.Adapter(
        weights={"layers/down/kernel": (a, b)},
        layouts=dora.layouts,
        ranks=dora.ranks,
        alphas=dora.alphas,
        use_rslora=dora.use_rslora,
        magnitudes=dora.magnitudes,
    )
    _roundtrip(tmp_path / "dora", tree, dora)
    assert f"{P}layers.1.down.lora_magnitude_vector" in _tensors(tmp_path / "dora")


def test_feedforward_names_that_end_other_names_become_a_regex(tmp_path):
    """PEFT takes an IA3 module as feedforward when its name ends with a listed
    one: `mlp.fc` listed would catch `enc.mlp.fc`, which scales its output. Then
    `feedforward_modules` is a regex of the exact names (PEFT full-matches it)."""
    tree = {
        "mlp": {"fc": {"kernel": jnp.ones((4, 6))}},
        "enc": {"mlp": {"fc": {"kernel": jnp.ones((4, 6))}}},
    }
    rules = [
        lx.LoraRule("^mlp", 0, variant="ia3_feedforward"),
        lx.LoraRule("^enc", 0, variant="ia3"),
    ]
    ad = _randomised(lx.init_adapter(tree, rules, key=jax.random.PRNGKey(0)), 0)
    back = _roundtrip(tmp_path, tree, ad)
    cfg = _config(tmp_path)
    assert isinstance(cfg["feedforward_modules"], str)
    assert _is_feedforward(cfg, "mlp.fc") and not _is_feedforward(cfg, "enc.mlp.fc")
    assert back.kind("enc/mlp/fc/kernel") == "ia3"
    # Without the clash it is the plain list PEFT writes itself.
    lx.save_peft_adapter(
        tmp_path / "one", ad, key_map={"mlp.fc": "mlp/fc", "other.fc": "enc/mlp/fc"}
    )
    assert _config(tmp_path / "one")["feedforward_modules"] == ["mlp.fc"]


# ----------------------------------------------------------------------------
# Refusals.


def _mixed(tree, rules, seed=0):
    return _randomised(lx.init_adapter(tree, rules, key=jax.random.PRNGKey(0)), seed)


def test_what_no_single_peft_config_expresses_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    tree = _variant_tree(rng)
    cases = [
        (
            [lx.LoraRule("^q", 2, variant="dora"), lx.LoraRule("^k", 2, in_axes=0)],
            r"DoRA leaves \['q/kernel'\].*LoRA leaves \['k/kernel'\].*use_dora is "
            r"one flag.*Split it",
        ),
        (
            [lx.LoraRule("^q", 0, variant="ia3"), lx.LoraRule("^k", 2, in_axes=0)],
            r"IA3 leaves \['q/kernel'\].*one method \(peft_type\)",
        ),
        (
            [
                lx.LoraRule("^q", 0, variant="ia3"),
                lx.LoraRule("^k", 2, in_axes=0, variant="vera"),
            ],
            r"VeRA leaves are written as plain LoRA",
        ),
    ]
    for rules, match in cases:
        with pytest.raises(ValueError, match=match):
            lx.save_peft_adapter(tmp_path, _mixed(tree, rules))
    # One leaf with LoRA factors and an IA3 vector, or IA3 on both sides.
    ad = _mixed(tree, lx.LoraRule("^q", 2))
    both = lx.Adapter(
        weights=ad.weights,
        layouts=ad.layouts,
        ranks=ad.ranks,
        alphas=ad.alphas,
        use_rslora=ad.use_rslora,
        in_scales={"q/kernel": np.full(6, 2.0, np.float32)},
    )
    with pytest.raises(
        ValueError, match=r"'q/kernel' has both LoRA factors.*in_scales"
    ):
        lx.save_peft_adapter(tmp_path, both)
    ia3 = _mixed(tree, lx.LoraRule("^q", 0, variant="ia3"))
    two = lx.Adapter(
        weights=ia3.weights,
        layouts=ia3.layouts,
        ranks=ia3.ranks,
        alphas=ia3.alphas,
        use_rslora=ia3.use_rslora,
        out_scales=ia3.out_scales,
        in_scales={"q/kernel": np.full(6, 2.0, np.float32)},
    )
    with pytest.raises(ValueError, match=r"'q/kernel' has IA3 vectors on both"):
        lx.save_peft_adapter(tmp_path, two)


def test_variants_on_convs_and_embeddings_are_refused(tmp_path):
    """DoRA and IA3 on a convolution or an embedding are not served here (and
    `load_peft_adapter` refuses them), so they are not written either."""
    tree = {
        "conv1": {"kernel": jnp.ones((3, 5, 6))},
        "embed_tokens": {"embedding": jnp.ones((10, 6))},
    }
    for variant, rank in (("dora", 2), ("ia3", 0)):
        ad = _mixed(tree, lx.LoraRule("conv1", rank, out_axes=-1, variant=variant))
        with pytest.raises(ValueError, match=r"'conv1/kernel' is a convolution with"):
            lx.save_peft_adapter(tmp_path, ad)
        # Not a convolution after all: then it writes.
        lx.save_peft_adapter(tmp_path, ad, conv=())
        ad = _mixed(tree, lx.LoraRule("embed", rank, variant=variant))
        with pytest.raises(ValueError, match=r"'embed_tokens/embedding'.*an embedding"):
            lx.save_peft_adapter(tmp_path, ad)
    with pytest.raises(TypeError, match="conv must be"):
        lx.save_peft_adapter(tmp_path, ad, conv=3)
