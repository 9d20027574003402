"""A qwix-quantised base (QLoRA serving): models quantised by qwix's post-training
quantisation, converted with `lx.from_qwix`, served with many adapters.

The reference never calls into lorax_arrays: for every row `e` with adapter
`i = indices[e]` it runs the model in NumPy float64 with each quantised weight
dequantised from qwix's own `QArray` (`(qvalue - zero_point) * scale`, the scale
repeated over its tiles; `qwix.dequantize` for NF4, whose codes index a table),
plus `scale_i * A_i B_i` (`-1` rows: the dequantised weight alone). Adapters are
made for the *float* model (`lx.init_adapter` on it, then random non-zero A and B
of two ranks, so two scales) and loaded onto the quantised one unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quax
from jaxtyping import ArrayLike

qwix = pytest.importorskip("qwix")
from flax import linen as nn, nnx  # noqa: E402

import lorax_arrays as lx  # noqa: E402
from tests.helpers import nonzero  # noqa: E402
from tests.model_helpers import weight_delta  # noqa: E402
from tests.scripts import run_script  # noqa: E402

# `Module.sow` outside `nnx.capture`, `.value` access: Flax 0.12 deprecations.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

D, HIDDEN, OUT = 16, 32, 8
RANKS = (2, 4)
ALPHA = 4.0  # scales 2 and 1
IDX = np.array([0, 1, -1, 1, 0])  # two adapters and a base row in one batch
RTOL = 1e-4


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


class Block(nnx.Module):
    """An attention-style block: an `nnx.Einsum` projection to heads (a 3-D
    kernel), heads flattened, an output projection, a residual."""

    def __init__(self, rngs):
        self.qkv = nnx.Einsum("btd,dhk->bthk", (D, 2, 8), (2, 8), rngs=rngs)
        self.o = nnx.Linear(16, D, rngs=rngs)

    def __call__(self, x):
        h = self.qkv(x)
        return x + self.o(h.reshape(*h.shape[:2], 16))


MLP_RULES = [lx.LoraRule(r"kernel", 4, ALPHA)]  # rank overridden per adapter
BLOCK_RULES = [
    lx.LoraRule("qkv/kernel", 4, ALPHA, in_axes=0, out_axes=(1, 2)),
    lx.LoraRule("o/kernel", 4, ALPHA),
]


def quantise(model, x, qtype="int8", *, tile_size=None, module_path=".*", **kw):
    rule = qwix.QtRule(
        module_path=module_path, weight_qtype=qtype, tile_size=tile_size, **kw
    )
    return qwix.quantize_model(model, qwix.PtqProvider([rule]), x)


def random_adapters(float_model, rules) -> list[lx.Adapter]:
    """One adapter per rank in RANKS, made for the float model, random non-zero."""
    out = []
    for seed, rank in enumerate(RANKS):
        ranked = [
            lx.LoraRule(r.pattern, rank, ALPHA, in_axes=r.in_axes, out_axes=r.out_axes)
            for r in rules
        ]
        template = lx.init_adapter(float_model, ranked, key=jax.random.PRNGKey(seed))
        rng = np.random.default_rng(seed)
        weights = {
            p: (nonzero(rng, a.shape, 0.2, 0.5), nonzero(rng, b.shape, 0.2, 0.5))
            for p, (a, b) in template.weights.items()
        }
        out.append(dataclasses.replace(template, weights=weights))
    return out


# --- the reference -------------------------------------------------------------


def _repeat_to(s: np.ndarray, shape) -> np.ndarray:
    """A scale (or zero point) repeated over its tiles to the weight's shape."""
    for ax, n in enumerate(shape):
        s = np.repeat(s, n // s.shape[ax], axis=ax)
    return s


def np_dequantised(with_aux) -> np.ndarray:
    """A qwix `WithAux[QArray]` (as qwix stores it: nnx.Params or plain arrays)
    dequantised in float64."""
    unbox = lambda v: np.asarray(v[...] if isinstance(v, nnx.Variable) else v)  # noqa: E731
    qa = with_aux.array
    q, scale = unbox(qa.qvalue), unbox(qa.scale).astype(np.float64)
    if qa.qtype == "nf4":  # codes index NF4's table: qwix's own dequantise
        return np.asarray(
            qwix.dequantize(
                qwix.QArray(jnp.asarray(q), jnp.asarray(scale), None, "nf4")
            )
        ).astype(np.float64)
    q = q.astype(np.float64)
    if qa.zero_point is not None:
        q = q - _repeat_to(unbox(qa.zero_point).astype(np.float64), q.shape)
    return q * _repeat_to(scale, q.shape)


def np_weight(module, name: str) -> np.ndarray:
    """A kernel of an NNX layer in float64: dequantised where qwix quantised it."""
    kernel = getattr(module, name).kernel
    if isinstance(kernel, nnx.Variable):
        return np.asarray(kernel[...], np.float64)
    return np_dequantised(kernel)


def np_bias(module, name: str) -> np.ndarray:
    return np.asarray(getattr(module, name).bias[...], np.float64)


def nnx_paths(*names) -> dict[str, str]:
    return {n: f"{n}/kernel/value" for n in names}


def with_adapter(weights: dict, adapter: lx.Adapter | None, paths: dict) -> dict:
    """`{name: w + scale · a ⊗ b}` (float64) for each kernel the adapter has, at
    `paths[name]`."""
    if adapter is None:
        return weights
    layouts = {lay.path: lay for lay in adapter.layouts}
    out = dict(weights)
    for name, path in paths.items():
        if path in adapter.weights:
            a, b = (np.asarray(f, np.float64) for f in adapter.weights[path])
            out[name] = weights[name] + adapter.scale(path) * weight_delta(
                a, b, layouts[path]
            )
    return out


def mlp_np(w, bias, x):
    h = np.maximum(x @ w["up"] + bias["up"], 0.0)
    return h @ w["down"] + bias["down"]


def block_np(w, bias, x):
    h = np.einsum("td,dhk->thk", x, w["qkv"]) + bias["qkv"]
    return x + h.reshape(x.shape[0], 16) @ w["o"] + bias["o"]


def reference_rows(forward, weights, biases, adapters, idx, x, paths=None):
    paths = paths or nnx_paths(*weights)
    x = np.asarray(x, np.float64)
    rows = []
    for e, i in enumerate(idx):
        ad = adapters[i] if i >= 0 else None
        rows.append(forward(with_adapter(weights, ad, paths), biases, x[e]))
    return np.stack(rows)


def assert_rows_close(got, want):
    got = np.asarray(got, np.float64)
    for e in range(want.shape[0]):
        np.testing.assert_allclose(
            got[e], want[e], rtol=RTOL, atol=RTOL * np.abs(want[e]).max()
        )


def serve(tree, x):
    return jax.jit(lx.quaxify(lambda m, x: m(x)))(tree, x)


# --- serving -------------------------------------------------------------------

QTYPES = [
    pytest.param("int8", None, {}, id="int8"),
    pytest.param(
        "int8", None, {"weight_calibration_method": "minmax"}, id="int8-zero-point"
    ),
    pytest.param("int4", None, {}, id="int4"),
    pytest.param("int4", 8, {}, id="int4-tiled"),
    pytest.param("nf4", 8, {}, id="nf4-tiled"),
]


@pytest.mark.parametrize("qtype,tile,kw", QTYPES)
def test_mixed_adapters_match_dequantised_merged(qtype, tile, kw):
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (len(IDX), 3, D))
    qmodel = quantise(model, x, qtype, tile_size=tile, **kw)
    adapters = random_adapters(model, MLP_RULES)

    served = lx.loraify(lx.from_qwix(qmodel), adapters, IDX)
    got = serve(served, x)

    weights = {n: np_dequantised(getattr(qmodel, n).kernel) for n in ("up", "down")}
    biases = {n: np_bias(qmodel, n) for n in ("up", "down")}
    want = reference_rows(mlp_np, weights, biases, adapters, IDX, x)
    assert_rows_close(got, want)
    # The base rows are exactly what qwix's own quantised model computes.
    base = np.asarray(qmodel(x))[IDX == -1]
    np.testing.assert_allclose(got[IDX == -1], base, rtol=1e-6, atol=1e-6)
    # The quantised weights are not what the float model had: the reference is
    # really the dequantised model.
    assert not np.allclose(weights["up"], np.asarray(model.up.kernel[...]))


def test_einsum_block_per_token_indices():
    model = Block(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 4, D))
    qmodel = quantise(model, x, "int8")
    adapters = random_adapters(model, BLOCK_RULES)
    idx = np.array([[0, 1, -1, 1], [-1, -1, 0, 0], [1, 0, 1, -1]])

    got = serve(lx.loraify(lx.from_qwix(qmodel), adapters, idx), x)

    weights = {n: np_dequantised(getattr(qmodel, n).kernel) for n in ("qkv", "o")}
    biases = {n: np_bias(qmodel, n) for n in ("qkv", "o")}
    xs = np.asarray(x, np.float64)
    for e in range(3):
        for t in range(4):
            i = idx[e, t]
            ad = adapters[i] if i >= 0 else None
            w = with_adapter(weights, ad, nnx_paths("qkv", "o"))
            want = block_np(w, biases, xs[e, t][None])[0]
            np.testing.assert_allclose(
                got[e, t], want, rtol=RTOL, atol=RTOL * np.abs(want).max()
            )


def test_partly_quantised_model_adapts_both_kinds():
    """Only `up` quantised: `down` stays a float Param; one rule adapts both."""
    model = MLP(nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (len(IDX), D))
    qmodel = quantise(model, x, "int8", module_path="up")
    converted = lx.from_qwix(qmodel)
    assert isinstance(converted.up.kernel.get_value(), lx.QwixArray)
    assert not isinstance(converted.down.kernel.get_value(), lx.QwixArray)
    adapters = random_adapters(model, MLP_RULES)

    got = serve(lx.loraify(converted, adapters, IDX), x)

    weights = {n: np_weight(qmodel, n) for n in ("up", "down")}
    biases = {n: np_bias(qmodel, n) for n in ("up", "down")}
    assert_rows_close(got, reference_rows(mlp_np, weights, biases, adapters, IDX, x))


def test_linen_params_quantised_with_quantize_params():
    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(HIDDEN)(x))  # Dense_0
            return nn.Dense(OUT)(h)  # Dense_1

    model = LinenMLP()
    x = jax.random.normal(jax.random.PRNGKey(5), (len(IDX), D))
    params = model.init(jax.random.PRNGKey(0), x)
    rule = qwix.QtRule(module_path=".*", weight_qtype="int8")
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    qparams = qwix.quantize_params(
        params, jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)
    )
    adapters = random_adapters(params, MLP_RULES)

    served = lx.loraify(lx.from_qwix(qparams), adapters, IDX)
    # The float module's apply (or `lx.from_qwix(qmodel)`, its float class).
    got = jax.jit(lx.quaxify(model.apply))(served, x)
    got2 = jax.jit(lx.quaxify(lx.from_qwix(qmodel).apply))(served, x)
    np.testing.assert_array_equal(got, got2)

    p = qparams["params"]
    weights = {
        "up": np_dequantised(p["Dense_0"]["kernel"]),
        "down": np_dequantised(p["Dense_1"]["kernel"]),
    }
    biases = {
        "up": np.asarray(p["Dense_0"]["bias"], np.float64),
        "down": np.asarray(p["Dense_1"]["bias"], np.float64),
    }
    paths = {"up": "params/Dense_0/kernel", "down": "params/Dense_1/kernel"}
    want = reference_rows(mlp_np, weights, biases, adapters, IDX, x, paths)
    assert_rows_close(got, want)


# --- the base product is qwix's, and stays quantised -----------------------------


def test_base_product_is_qwix_dot_general(monkeypatch):
    from qwix._src.core import dot_general as qdg

    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (len(IDX), D))
    qmodel = quantise(model, x, "int8")
    served = lx.loraify(lx.from_qwix(qmodel), random_adapters(model, MLP_RULES), IDX)

    calls = []
    original = qdg.dot_general

    def spy(lhs, rhs, *args, **kwargs):
        calls.append((type(lhs).__name__, type(rhs).__name__, rhs.shape))
        return original(lhs, rhs, *args, **kwargs)

    monkeypatch.setattr(qdg, "dot_general", spy)
    lx.quaxify(lambda m, x: m(x))(served, x)
    assert sorted(c[2] for c in calls) == [(D, HIDDEN), (HIDDEN, OUT)]
    assert all(rhs == "QArray" for _, rhs, _ in calls)

    # No float copy of a weight anywhere in the served tree: the kernels are
    # int8 codes and per-channel scales.
    for leaf in jax.tree.leaves(served):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.shape not in ((D, HIDDEN), (HIDDEN, OUT)), leaf.shape


def test_qlora_gradients_match_dequantised_reference():
    """Training adapters on a quantised base (QLoRA): the gradients are those of
    the dequantised model with the adapter merged, written in plain JAX."""
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(6), (4, D))
    qmodel = quantise(model, x, "int8")
    converted = lx.from_qwix(qmodel)
    adapter = random_adapters(model, MLP_RULES)[0]
    weights = {
        n: jnp.asarray(np_dequantised(getattr(qmodel, n).kernel), jnp.float32)
        for n in ("up", "down")
    }
    biases = {n: jnp.asarray(np_bias(qmodel, n), jnp.float32) for n in weights}

    def loss(adapter):
        served = lx.loraify(converted, adapter, jnp.zeros(4, jnp.int32))
        return jnp.sum(lx.quaxify(lambda m, x: m(x))(served, x) ** 2)

    def ref_loss(adapter):
        w = {
            n: weights[n]
            + adapter.scale(f"{n}/kernel/value")
            * (
                adapter.weights[f"{n}/kernel/value"][0]
                @ adapter.weights[f"{n}/kernel/value"][1]
            )
            for n in weights
        }
        h = jax.nn.relu(x @ w["up"] + biases["up"])
        return jnp.sum((h @ w["down"] + biases["down"]) ** 2)

    got = jax.jit(jax.grad(loss))(adapter)
    want = jax.jit(jax.grad(ref_loss))(adapter)
    for path, (ga, gb) in got.weights.items():
        wa, wb = want.weights[path]
        assert np.abs(wa).max() > 0 and np.abs(wb).max() > 0
        np.testing.assert_allclose(ga, wa, rtol=1e-3, atol=1e-3 * np.abs(wa).max())
        np.testing.assert_allclose(gb, wb, rtol=1e-3, atol=1e-3 * np.abs(wb).max())


# --- adapters made for the float model, stacks, banks ------------------------------


def test_float_model_adapters_bank_peft_and_paths(tmp_path):
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(7), (len(IDX), D))
    qmodel = quantise(model, x, "int4")
    converted = lx.from_qwix(qmodel)

    # Same paths, shapes and layouts as the float model: only the weights.
    float_matches = lx.match_rules(model, MLP_RULES)
    q_matches = lx.match_rules(converted, MLP_RULES)
    assert [m.layout for m in q_matches] == [m.layout for m in float_matches]
    assert [m.path for m in q_matches] == ["down/kernel/value", "up/kernel/value"]
    assert all(m.dtype == np.float32 for m in q_matches)

    adapters = random_adapters(model, MLP_RULES)
    # A PEFT directory written from the float model's adapter loads onto the
    # quantised tree as the same adapter.
    lx.save_peft_adapter(tmp_path, adapters[1])
    loaded = lx.load_peft_adapter(tmp_path, converted)
    assert loaded.layouts == adapters[1].layouts
    for path, (a, b) in adapters[1].weights.items():
        np.testing.assert_allclose(loaded.weights[path][0], a, rtol=1e-6)
        np.testing.assert_allclose(loaded.weights[path][1], b, rtol=1e-6)
        assert loaded.scale(path) == adapters[1].scale(path)

    bank = lx.AdapterBank(converted, MLP_RULES, slots=2)
    bank.add("a", adapters[0])
    bank.add("b", loaded)
    names = [{0: "a", 1: "b", -1: None}[int(i)] for i in IDX]
    got = serve(lx.loraify(converted, bank, bank.indices(names)), x)

    weights = {n: np_dequantised(getattr(qmodel, n).kernel) for n in ("up", "down")}
    biases = {n: np_bias(qmodel, n) for n in ("up", "down")}
    assert_rows_close(got, reference_rows(mlp_np, weights, biases, adapters, IDX, x))


LAYOUTS = [
    # (weight shape, in_axes, out_axes, the product, its float64 reference)
    pytest.param((D, OUT), 0, 1, lambda W, x: x @ W, lambda w, x: x @ w, id="x@W"),
    pytest.param(  # an (out, in) weight: the transpose rule on the QArray
        (OUT, D), 1, 0, lambda W, x: x @ W.T, lambda w, x: x @ w.T, id="x@W.T"
    ),
    pytest.param(  # a DenseGeneral kernel (in, heads, dim) flattened: reshape
        (D, 2, 4),
        0,
        (1, 2),
        lambda W, x: x @ W.reshape(D, 8),
        lambda w, x: x @ w.reshape(D, 8),
        id="x@W.reshape",
    ),
]


@pytest.mark.parametrize("shape,in_axes,out_axes,product,np_product", LAYOUTS)
def test_batched_lora_array_takes_a_qarray(
    shape, in_axes, out_axes, product, np_product
):
    w = jax.random.normal(jax.random.PRNGKey(0), shape)
    outs = (out_axes,) if isinstance(out_axes, int) else out_axes
    qa = qwix.quantize(w, "int8", channelwise_axes=outs)
    lay = lx.LeafLayout("w", shape, (in_axes,), outs, ())
    rng = np.random.default_rng(0)
    a = nonzero(rng, (2, *lay.in_shape, 3))
    b = nonzero(rng, (2, 3, *lay.out_shape))
    idx = jnp.array([1, -1, 0])
    lora = lx.BatchedLoraArray(
        qa, a, b, scale=0.5, indices=idx, in_axes=in_axes, out_axes=out_axes
    )
    assert isinstance(lora.w, lx.QwixArray)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, D))
    got = jax.jit(lx.quaxify(product))(lora, x)

    deq = np.asarray(qa.qvalue, np.float64) * np.asarray(qa.scale, np.float64)
    for e, i in enumerate(np.asarray(idx)):
        w_e = deq
        if i >= 0:
            w_e = deq + 0.5 * weight_delta(
                a[i].astype(np.float64), b[i].astype(np.float64), lay
            )
        want = np_product(w_e, np.asarray(x[e], np.float64))
        np.testing.assert_allclose(
            got[e], want, rtol=RTOL, atol=RTOL * np.abs(want).max()
        )


class Scaled(quax.ArrayValue):
    """A user's own quantised-style quax type: the weight `q * s`."""

    q: jax.Array
    s: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.q.shape, self.q.dtype)

    def materialise(self):
        raise RuntimeError("only through x @ W")


@quax.register(jax.lax.dot_general_p)
def _(x: ArrayLike, w: Scaled, *, dimension_numbers, **params):
    return jax.lax.dot_general(x, w.q, dimension_numbers, **params) * w.s


def test_own_quax_type_is_one_weight_at_its_path():
    """Any quax value is one leaf named by its own path (its parts never are), so
    rules, adapters and loraify reach a user's own quantised type as well."""
    rng = np.random.default_rng(0)
    q, s = nonzero(rng, (D, OUT)), np.float32(0.25)
    tree = {"layer": {"kernel": Scaled(jnp.asarray(q), jnp.asarray(s))}}
    rules = [lx.LoraRule("kernel", 2)]
    assert [m.path for m in lx.match_rules(tree, rules)] == ["layer/kernel"]
    template = lx.init_adapter(tree, rules, key=jax.random.PRNGKey(0))
    a, b = nonzero(rng, (D, 2)), nonzero(rng, (2, OUT))
    adapter = lx.Adapter(
        weights={"layer/kernel": (a, b)},
        layouts=template.layouts,
        ranks=template.ranks,
        alphas=template.alphas,
        use_rslora=template.use_rslora,
    )
    idx = np.array([0, -1])
    served = lx.loraify(tree, adapter, idx)
    x = nonzero(rng, (2, D))
    got = lx.quaxify(lambda t, x: x @ t["layer"]["kernel"])(served, x)
    w = q.astype(np.float64) * s
    for e, i in enumerate(idx):
        w_e = w + (a.astype(np.float64) @ b if i >= 0 else 0)
        want = x[e].astype(np.float64) @ w_e
        np.testing.assert_allclose(
            got[e], want, rtol=RTOL, atol=RTOL * np.abs(want).max()
        )


# --- errors ------------------------------------------------------------------


def test_rule_on_quantised_parts_lists_logical_weights_not_scales():
    model = MLP(nnx.Rngs(0))
    x = jnp.ones((2, D))
    converted = lx.from_qwix(quantise(model, x, "int8"))
    for pattern in ("qvalue", "scale$", "array"):
        with pytest.raises(ValueError, match="matches no weight") as e:
            lx.match_rules(converted, lx.LoraRule(pattern, 2))
        msg = str(e.value)
        assert "'down/kernel/value', 'up/kernel/value'" in msg
        assert "/array/" not in msg and "scale/value" not in msg
        assert "named by the float model's paths" in msg


def test_raw_qwix_tree_is_refused_with_the_fix():
    model = MLP(nnx.Rngs(0))
    x = jnp.ones((2, D))
    qmodel = quantise(model, x, "int8")
    adapter = random_adapters(model, MLP_RULES)[0]
    for call in (
        lambda: lx.match_rules(qmodel, MLP_RULES),
        lambda: lx.loraify(qmodel, adapter, IDX[:2]),
        lambda: lx.init_adapter(qmodel, MLP_RULES, key=jax.random.PRNGKey(0)),
    ):
        with pytest.raises(ValueError, match=r"lx\.from_qwix\(tree\)"):
            call()


@pytest.mark.filterwarnings("ignore:rngs must be provided")  # qwix LoRA's init
def test_unsupported_uses_of_a_quantised_weight_are_errors():
    model = MLP(nnx.Rngs(0))
    x = jnp.ones((2, D))
    converted = lx.from_qwix(quantise(model, x, "int8"))
    adapter = random_adapters(model, MLP_RULES)[0]
    # No silent dequantisation for an op without a rule.
    with pytest.raises(lx.UnsupportedOperationError, match="qwix-quantised weight"):
        lx.quaxify(lambda m: jnp.sin(m.up.kernel[...]))(converted)
    # Outside quaxify: NNX's `v[...]` reads the weight itself; anything else that
    # needs a plain array says where it works.
    assert isinstance(converted.up.kernel[...], lx.QwixArray)
    with pytest.raises(TypeError, match="used as a plain array"):
        converted.up.kernel[...][0]
    with pytest.raises(TypeError, match="used as a plain array"):
        converted.up.kernel[...] + 1.0
    # merge cannot fold an adapter into a quantised weight: the error says how.
    with pytest.raises(TypeError, match="dequantise the tree first"):
        lx.merge(converted, adapter)
    # Activation quantisation is not weight-only: refused, whether the model says
    # so (its qwix rules) or only its parameters do (static activation scales).
    for static in (False, True):
        act = quantise(model, x, "int8", act_qtype="int8", act_static_scale=static)
        with pytest.raises(ValueError, match="weight-only quantisation"):
            lx.from_qwix(act)
    act = quantise(model, x, "int8", act_qtype="int8", act_static_scale=True)
    with pytest.raises(ValueError, match="weight-only quantisation"):
        lx.from_qwix({"model": act})  # not the model itself: its static scales
    # The state of a quantised model holds codes and scales as separate leaves,
    # without their quantisation type: refused, naming the fix.
    state = nnx.state(quantise(model, x, "int8"))
    for call in (lambda: lx.from_qwix(state), lambda: lx.match_rules(state, MLP_RULES)):
        with pytest.raises(ValueError, match=r"lx\.from_qwix\(model\)"):
            call()
    # A QAT model (qwix.QtProvider) is not a quantised base.
    qat = qwix.quantize_model(
        model, qwix.QtProvider([qwix.QtRule(weight_qtype="int8")]), x
    )
    with pytest.raises(ValueError, match="PtqProvider"):
        lx.from_qwix(qat)
    # Nor is a model with qwix's own (single) LoRA: it would be dropped.
    qlora = qwix.apply_lora_to_model(
        model,
        qwix.LoraProvider([qwix.LoraRule(rank=2, alpha=2.0, weight_qtype="int8")]),
        x,
    )
    with pytest.raises(ValueError, match="qwix's own LoRA"):
        lx.from_qwix(qlora)


# --- the example and the benchmark ---------------------------------------------


def test_example_runs():
    out = run_script(["examples/qwix_base.py"])
    assert "max |batched - dequantised merged|" in out


def test_benchmark_quick():
    out = run_script(["-m", "benchmarks.qwix_base", "--quick"])
    assert "int8" in out and "int4" in out and "/ float" in out
