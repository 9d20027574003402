"""Misuse of loraify / with_indices / merge gives clear, specific errors."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._core.array import UnsetIndicesError

D, W, OUT = 8, 12, 5


@pytest.fixture(scope="module")
def mlp():
    return eqx.nn.MLP(D, OUT, W, 2, key=jr.key(0))


@pytest.fixture(scope="module")
def stack(mlp):
    ads = [
        lx.init_adapter(mlp, lx.LoraRule("weight", r), key=jr.key(r)) for r in (2, 4)
    ]
    return lx.stack_adapters(ads, names=["x", "y"])


def _call(model, xs):
    return lx.quaxify(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))(model, xs)


def test_adapter_for_a_different_tree_structure(stack, mlp):
    with pytest.raises(KeyError) as info:
        lx.loraify({"encoder": mlp}, stack)
    msg = str(info.value)
    assert "'layers/0/weight'" in msg
    assert "Did you mean" in msg and "'encoder/layers/0/weight'" in msg


def test_adapter_for_a_different_model_shape(stack):
    wider = eqx.nn.MLP(D, OUT, W + 4, 2, key=jr.key(1))
    with pytest.raises(ValueError) as info:
        lx.loraify(wider, stack)
    msg = str(info.value)
    assert "'layers/0/weight'" in msg
    assert f"({W}, {D})" in msg and f"({W + 4}, {D})" in msg
    with pytest.raises(ValueError, match="shape"):
        lx.merge(wider, stack[0])


def test_merge_unknown_path_is_a_key_error(stack, mlp):
    with pytest.raises(KeyError, match="Did you mean"):
        lx.merge({"m": mlp}, stack[1])


def test_loraify_twice(stack, mlp):
    lm = lx.loraify(mlp, stack, [0, 1])
    with pytest.raises(ValueError, match="already a BatchedLoraArray") as info:
        lx.loraify(lm, stack)
    assert "with_indices" in str(info.value)


def test_loraify_wrong_adapter_type(mlp):
    with pytest.raises(TypeError, match="AdapterStack"):
        lx.loraify(mlp, {"layers/0/weight": (1, 2)})


def test_with_indices_without_loras(mlp):
    with pytest.raises(ValueError, match="no BatchedLoraArray") as info:
        lx.with_indices(mlp, [0, 1])
    assert "loraify" in str(info.value)


def test_with_indices_inside_quaxify(stack, mlp):
    lm = lx.loraify(mlp, stack, 0)

    def bad(m, x):
        return lx.with_indices(m, 1)(x)

    with pytest.raises(ValueError, match="outside"):
        lx.quaxify(bad)(lm, jnp.ones(D))

    # The common mistake: the index travels with the example, but with_indices is
    # called inside the quaxified function.
    lm0 = lx.loraify(mlp, stack)

    def one(x, i):
        return lx.quaxify(lambda m, x: lx.with_indices(m, i)(x))(lm0, x)

    with pytest.raises(ValueError, match="outside") as info:
        jax.vmap(one)(jnp.ones((2, D)), jnp.array([0, 1]))
    assert "lx.with_indices(m, i)" in str(info.value)


@pytest.mark.parametrize("bad", [[0, 2], [-2, 0], 2, np.array([0, 5]), jnp.array([7])])
def test_out_of_range_indices(stack, mlp, bad):
    with pytest.raises(lx.LoraIndexError, match=r"\[-1, 1\]"):
        lx.loraify(mlp, stack, bad)
    lm = lx.loraify(mlp, stack)
    with pytest.raises(lx.LoraIndexError):
        lx.with_indices(lm, bad)
    assert issubclass(lx.LoraIndexError, IndexError)


@pytest.mark.parametrize(
    "bad",
    [
        jnp.array([0.0, 1.0]),
        np.array([1.0, 0.0]),
        [0.5, 1.0],  # would silently truncate to [0, 1] if cast blindly
        [0.0, 1.0],
        1.0,
        np.array([True, False]),
    ],
)
def test_non_integer_indices(stack, mlp, bad):
    lm = lx.loraify(mlp, stack)
    with pytest.raises(TypeError, match="integer"):
        lx.with_indices(lm, bad)
    with pytest.raises(TypeError, match="integer"):
        lx.loraify(mlp, stack, bad)


def test_valid_index_forms_are_accepted(stack, mlp):
    lm = lx.loraify(mlp, stack)
    for idx in ([0, -1], (1, 0), np.array([1, -1], np.int64), jnp.array([0, 1])):
        out = lx.with_indices(lm, idx)
        got = out.layers[0].weight.indices
        assert got.dtype == jnp.int32 and got.shape == (2,)
    assert lx.with_indices(lm, 1).layers[0].weight.indices.shape == ()


def test_merge_needs_a_single_adapter(stack, mlp):
    with pytest.raises(TypeError, match=r"stack\[i\]"):
        lx.merge(mlp, stack)
    with pytest.raises(TypeError, match="Adapter"):
        lx.merge(mlp, [stack[0]])
    merged = lx.merge(mlp, stack["y"])
    assert isinstance(merged.layers[0].weight, jax.Array)


def test_merge_of_a_loraified_tree_uses_its_base(stack, mlp):
    lm = lx.loraify(mlp, stack, [0, 1])
    base_only = lx.merge(lm, stack[0])
    direct = lx.merge(mlp, stack[0])
    for a, b in zip(jax.tree.leaves(base_only), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)


def test_forward_without_indices(stack, mlp):
    lm = lx.loraify(mlp, stack)
    with pytest.raises(UnsetIndicesError, match="with_indices"):
        _call(lm, jnp.ones((2, D)))
    assert issubclass(UnsetIndicesError, ValueError)


def test_indices_not_matching_batch(stack, mlp):
    lm = lx.loraify(mlp, stack, [0, 1, 0])
    with pytest.raises(lx.IndicesShapeError, match=r"\(3,\)"):
        _call(lm, jnp.ones((2, D)))


def test_adapter_mask_marks_only_factors(stack, mlp):
    lm = lx.loraify(mlp, stack, [0, 1])
    mask = lx.adapter_mask(lm)
    w = mask.layers[0].weight
    assert (w.a, w.b, w.w, w.scale, w.indices) == (True, True, False, False, False)
    assert mask.layers[0].bias is False
    assert sum(jax.tree.leaves(mask)) == 2 * 3
