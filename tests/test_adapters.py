"""`init_adapter`, `Adapter` as a pytree, `stack_adapters` and `AdapterStack`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from tests.fast_init import random_adapters
from tests.helpers import assert_base_rows
from tests.model_helpers import (
    F32_TOL,
    assert_close,
    einsum_merge,
    randomize,
)

D_IN, WIDTH, D_OUT = 8, 12, 6


@pytest.fixture(scope="module")
def mlp():
    return eqx.nn.MLP(D_IN, D_OUT, WIDTH, 2, key=jr.key(0))


def _call_batched(model, xs):
    return lx.quaxify(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))(model, xs)


_call_batched_jit = eqx.filter_jit(_call_batched)


def _het_adapters(mlp):
    """Three adapters of ranks 2, 4, 8 adapting different sets of layers."""
    rule_sets = [
        [lx.LoraRule("layers/0", 2, alpha=4.0)],
        [lx.LoraRule("weight", 4, alpha=2.0)],
        [lx.LoraRule("layers/[12]", 8, alpha=8.0, use_rslora=True)],
    ]
    return random_adapters(mlp, rule_sets, seed=20, std=0.3)


# -- init_adapter -------------------------------------------------------------------


def test_init_shapes_and_zero_b(mlp):
    ad = lx.init_adapter(mlp, lx.LoraRule("weight", 3), key=jr.key(1))
    assert ad.paths == ("layers/0/weight", "layers/1/weight", "layers/2/weight")
    assert ad.ranks == (3, 3, 3)
    expected = {
        "layers/0/weight": ((D_IN, 3), (3, WIDTH)),
        "layers/1/weight": ((WIDTH, 3), (3, WIDTH)),
        "layers/2/weight": ((WIDTH, 3), (3, D_OUT)),
    }
    for path, (sa, sb) in expected.items():
        a, b = ad.weights[path]
        assert a.shape == sa and b.shape == sb
        assert a.dtype == b.dtype == jnp.float32
        assert np.all(np.asarray(b) == 0)
        # Kaiming-uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and not degenerate.
        bound = 1 / np.sqrt(sa[0])
        assert np.all(np.abs(np.asarray(a)) <= bound)
        assert np.std(np.asarray(a)) > bound / 4


def test_init_multi_axis_and_stacked_layouts():
    tree = {
        "qkv": jnp.ones((8, 2, 4)),
        "layers": {"w": jnp.ones((3, 8, 5))},
    }
    rules = [
        lx.LoraRule("qkv", 2, in_axes=(0,), out_axes=(1, 2)),
        lx.LoraRule("layers/w", 4, stack_axes=(0,)),
    ]
    ad = lx.init_adapter(tree, rules, key=jr.key(0), dtype=jnp.bfloat16)
    a, b = ad.weights["qkv"]
    assert (a.shape, b.shape) == ((8, 2), (2, 2, 4))
    a, b = ad.weights["layers/w"]
    assert (a.shape, b.shape) == ((3, 8, 4), (3, 4, 5))
    assert a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16


def test_init_different_keys_give_different_a(mlp):
    rule = lx.LoraRule("layers/0", 2)
    a0 = lx.init_adapter(mlp, rule, key=jr.key(0)).weights["layers/0/weight"][0]
    a1 = lx.init_adapter(mlp, rule, key=jr.key(1)).weights["layers/0/weight"][0]
    assert not np.allclose(a0, a1)


def test_fresh_adapter_leaves_the_model_unchanged_exactly(mlp):
    ads = [
        lx.init_adapter(mlp, lx.LoraRule("weight", r), key=jr.key(r)) for r in (2, 5)
    ]
    xs = jr.normal(jr.key(3), (4, D_IN))
    idx = jnp.array([0, 1, -1, 1], jnp.int32)
    served = lx.loraify(mlp, ads, idx)
    base = jax.vmap(mlp)(xs)
    # Op by op: the base model's own operations plus an exact zero, bit for bit.
    np.testing.assert_array_equal(
        np.asarray(_call_batched(served, xs)), np.asarray(base)
    )
    # Compiled: another XLA program, equal within a few ulps (tests/helpers.py).
    assert_base_rows(_call_batched_jit(served, xs), base)


def test_merge_is_w_plus_scale_a_b(mlp):
    ad = lx.init_adapter(
        mlp, lx.LoraRule("layers/1", 4, alpha=8.0, use_rslora=True), key=jr.key(0)
    )
    ad = randomize(ad, 1)
    merged = lx.merge(mlp, ad)
    a, b = ad.weights["layers/1/weight"]
    w = mlp.layers[1].weight
    # (out, in) layout: the delta is (a @ b).T; rsLoRA scale 8 / sqrt(4).
    expected = w + 4.0 * (a @ b).T
    assert_close(merged.layers[1].weight, expected, **F32_TOL)
    np.testing.assert_array_equal(merged.layers[0].weight, mlp.layers[0].weight)
    np.testing.assert_array_equal(merged.layers[1].bias, mlp.layers[1].bias)


# -- Adapter as a pytree --------------------------------------------------------


def test_adapter_leaves_are_exactly_a_and_b(mlp):
    ad = lx.init_adapter(mlp, lx.LoraRule("weight", 3), key=jr.key(0))
    leaves = jax.tree.leaves(ad)
    assert len(leaves) == 2 * len(ad.paths) == 6
    expected = [x for p in ad.paths for x in ad.weights[p]]
    assert {id(x) for x in leaves} == {id(x) for x in expected}
    assert jax.tree.all(lx.adapter_mask(ad))


def test_adapter_tree_map_keeps_metadata(mlp):
    ad = randomize(lx.init_adapter(mlp, lx.LoraRule("weight", 3), key=jr.key(0)), 1)
    doubled = jax.tree.map(lambda x: 2 * x, ad)
    assert isinstance(doubled, lx.Adapter)
    assert (doubled.layouts, doubled.ranks, doubled.alphas) == (
        ad.layouts,
        ad.ranks,
        ad.alphas,
    )
    for p in ad.paths:
        for x, y in zip(doubled.weights[p], ad.weights[p]):
            np.testing.assert_array_equal(x, 2 * y)
    # Static metadata is hashable, so an Adapter is a valid jit argument.
    bumped = jax.jit(lambda a: jax.tree.map(lambda x: x + 1, a))(ad)
    assert isinstance(bumped, lx.Adapter) and bumped.layouts == ad.layouts
    np.testing.assert_allclose(
        bumped.weights["layers/2/weight"][0], ad.weights["layers/2/weight"][0] + 1
    )
    summed = jax.tree.map(jnp.add, ad, doubled)
    np.testing.assert_allclose(
        summed.weights["layers/0/weight"][1], 3 * ad.weights["layers/0/weight"][1]
    )


def test_adapter_works_with_optax_adam(mlp):
    ad = randomize(lx.init_adapter(mlp, lx.LoraRule("weight", 3), key=jr.key(0)), 1)
    opt = optax.adam(0.1)
    state = opt.init(ad)
    grads = jax.tree.map(jnp.ones_like, ad)
    updates, state = opt.update(grads, state, ad)
    new = optax.apply_updates(ad, updates)
    assert isinstance(new, lx.Adapter)
    assert new.ranks == ad.ranks
    # Adam's first step moves every parameter by (almost exactly) -lr * sign(g).
    for p in ad.paths:
        for x, y in zip(new.weights[p], ad.weights[p]):
            np.testing.assert_allclose(x, y - 0.1, rtol=1e-5, atol=1e-5)


def test_adapter_rejects_inconsistent_shapes(mlp):
    ad = lx.init_adapter(mlp, lx.LoraRule("layers/0", 3), key=jr.key(0))
    a, b = ad.weights["layers/0/weight"]
    with pytest.raises(ValueError, match="layers/0/weight"):
        lx.Adapter(
            {"layers/0/weight": (a, b[:2])},
            ad.layouts,
            ad.ranks,
            ad.alphas,
            ad.use_rslora,
        )


# -- stack_adapters ---------------------------------------------------------------


def test_stack_pads_ranks_and_zeroes_missing_paths(mlp):
    ads = _het_adapters(mlp)
    stack = lx.stack_adapters(ads)
    assert len(stack) == stack.n_adapters == 3
    assert set(stack.paths) == {"layers/0/weight", "layers/1/weight", "layers/2/weight"}
    ranks = dict(zip(stack.paths, stack.ranks))
    assert ranks["layers/0/weight"] == (2, 4, 0)
    assert ranks["layers/1/weight"] == (0, 4, 8)
    assert ranks["layers/2/weight"] == (0, 4, 8)
    a, b = stack.weights["layers/0/weight"]
    assert a.shape == (3, D_IN, 4) and b.shape == (3, 4, WIDTH)
    a, b = stack.weights["layers/1/weight"]
    assert a.shape == (3, WIDTH, 8) and b.shape == (3, 8, WIDTH)
    # Padding and missing adapters are zeros, scale 0 where the adapter is absent.
    a0, b0 = stack.weights["layers/0/weight"]
    assert np.all(np.asarray(a0[0, :, 2:]) == 0)
    assert np.all(np.asarray(b0[0, 2:, :]) == 0)
    assert np.all(np.asarray(a0[2]) == 0) and np.all(np.asarray(b0[2]) == 0)
    np.testing.assert_allclose(stack.scales["layers/0/weight"], [2.0, 0.5, 0.0])
    np.testing.assert_allclose(stack.scales["layers/1/weight"], [0.0, 0.5, 8 / 8**0.5])


def test_every_stacked_adapter_matches_its_own_merged_model(mlp):
    ads = _het_adapters(mlp)
    stack = lx.stack_adapters(ads)
    xs = jr.normal(jr.key(5), (6, D_IN))
    idx = jnp.array([2, 0, -1, 1, 2, 0], jnp.int32)
    out = _call_batched_jit(lx.loraify(mlp, stack, idx), xs)
    for e, i in enumerate(np.asarray(idx)):
        model = mlp if i < 0 else einsum_merge(mlp, ads[i])
        assert_close(out[e], model(xs[e]), **F32_TOL)
        if i >= 0:  # the adapter visibly changes this row
            assert np.abs(np.asarray(model(xs[e]) - mlp(xs[e]))).max() > 1e-2


def test_unpadding_round_trip(mlp):
    ads = _het_adapters(mlp)
    stack = lx.stack_adapters(ads)
    for i, ad in enumerate(ads):
        back = stack[i]
        assert isinstance(back, lx.Adapter)
        assert set(back.paths) == set(ad.paths)
        for p in ad.paths:
            j, k = back.paths.index(p), ad.paths.index(p)
            assert back.ranks[j] == ad.ranks[k]
            assert back.alphas[j] == ad.alphas[k]
            assert back.use_rslora[j] == ad.use_rslora[k]
            assert back.scale(p) == pytest.approx(ad.scale(p))
            for x, y in zip(back.weights[p], ad.weights[p]):
                assert x.shape == y.shape
                np.testing.assert_array_equal(x, y)
    # Negative positions count from the end, as for a list.
    np.testing.assert_array_equal(
        stack[-1].weights["layers/1/weight"][0], ads[2].weights["layers/1/weight"][0]
    )


def test_stacked_layer_axes_round_trip():
    tree = {"layers": {"w": jnp.ones((3, 8, 5))}}
    ads = [
        randomize(
            lx.init_adapter(tree, lx.LoraRule("w", r, stack_axes=0), key=jr.key(r)),
            r + 10,
        )
        for r in (1, 3)
    ]
    stack = lx.stack_adapters(ads)
    a, b = stack.weights["layers/w"]
    assert a.shape == (3, 2, 8, 3) and b.shape == (3, 2, 3, 5)
    for i, ad in enumerate(ads):
        for x, y in zip(stack[i].weights["layers/w"], ad.weights["layers/w"]):
            np.testing.assert_array_equal(x, y)


@settings(max_examples=5, deadline=None)
@given(ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_round_trip_any_ranks(ranks):
    tree = {"w": jnp.ones((5, 3)), "v": jnp.ones((3, 4))}
    ads = [
        randomize(
            lx.init_adapter(tree, lx.LoraRule("w" if j % 2 else ".", r), key=jr.key(j)),
            100 + j,
        )
        for j, r in enumerate(ranks)
    ]
    stack = lx.stack_adapters(ads)
    assert stack.weights["w"][0].shape == (len(ranks), 5, max(ranks))
    for i, ad in enumerate(ads):
        back = stack[i]
        assert back.paths == ad.paths or set(back.paths) == set(ad.paths)
        for p in ad.paths:
            for x, y in zip(back.weights[p], ad.weights[p]):
                np.testing.assert_array_equal(x, y)


def test_names_and_indices(mlp):
    ads = _het_adapters(mlp)
    stack = lx.stack_adapters(ads, names=["fr", "de", "es"])
    assert stack.names == ("fr", "de", "es")
    idx = stack.indices(["fr", None, "__base__", 1, -1, "es"])
    assert idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx, [0, -1, -1, 1, -1, 2])
    for x, y in zip(
        stack["de"].weights["layers/1/weight"], stack[1].weights["layers/1/weight"]
    ):
        np.testing.assert_array_equal(x, y)
    # NumPy / JAX integers mean the same as Python ints; -1 is still the base.
    np.testing.assert_array_equal(stack.indices(np.array([-1, 2, 0])), [-1, 2, 0])
    np.testing.assert_array_equal(stack.indices(jnp.array([1, -1])), [1, -1])


def test_indices_reject_negative_positions_and_bools(mlp):
    stack = lx.stack_adapters(_het_adapters(mlp))
    # -1 is the base model, so -2 must not silently mean "second from the end".
    with pytest.raises(lx.LoraIndexError):
        stack.indices([-2])
    with pytest.raises(lx.LoraIndexError):
        stack.indices([0, 3])
    with pytest.raises(TypeError):
        stack.indices([True])
    with pytest.raises(TypeError):
        stack.indices([0.0])


def test_stack_errors(mlp):
    ads = _het_adapters(mlp)
    with pytest.raises(ValueError, match="at least one"):
        lx.stack_adapters([])
    with pytest.raises(TypeError, match="not an Adapter"):
        lx.stack_adapters([ads[0], {"a": 1}])
    with pytest.raises(ValueError, match="2 names for 3"):
        lx.stack_adapters(ads, names=["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        lx.stack_adapters(ads, names=["a", "b", "a"])
    with pytest.raises(ValueError, match="__base__"):
        lx.stack_adapters(ads, names=["a", "__base__", "c"])
    named = lx.stack_adapters(ads, names=["a", "b", "c"])
    with pytest.raises(KeyError, match="'zz'"):
        named["zz"]
    with pytest.raises(KeyError, match="'zz'"):
        named.indices(["a", "zz"])
    unnamed = lx.stack_adapters(ads)
    with pytest.raises(KeyError, match="names="):
        unnamed["a"]
    with pytest.raises(lx.LoraIndexError):
        unnamed[3]
    with pytest.raises(lx.LoraIndexError):
        unnamed[-4]


def test_stack_rejects_adapters_for_different_models(mlp):
    other = eqx.nn.MLP(D_IN, D_OUT, WIDTH + 4, 2, key=jr.key(0))
    a0 = lx.init_adapter(mlp, lx.LoraRule("layers/0", 2), key=jr.key(0))
    a1 = lx.init_adapter(other, lx.LoraRule("layers/0", 2), key=jr.key(1))
    with pytest.raises(ValueError, match="layers/0/weight") as info:
        lx.stack_adapters([a0, a1])
    assert "same model" in str(info.value)
    # Same shape, different layout of the same leaf: also incompatible.
    tree = {"k": jnp.ones((4, 2, 4))}
    b0 = lx.init_adapter(tree, lx.LoraRule("k", 2, in_axes=0), key=jr.key(0))
    b1 = lx.init_adapter(tree, lx.LoraRule("k", 2, in_axes=(0, 1)), key=jr.key(0))
    with pytest.raises(ValueError, match="'k'"):
        lx.stack_adapters([b0, b1])


def test_adapter_stack_is_a_pytree(mlp):
    stack = lx.stack_adapters(_het_adapters(mlp))
    leaves = jax.tree.leaves(stack)
    # a and b per path, plus one scale vector per path.
    assert len(leaves) == 3 * len(stack.paths)
    mask = lx.adapter_mask(stack)
    assert sum(jax.tree.leaves(mask)) == 2 * len(stack.paths)
    halved = jax.tree.map(lambda x: x / 2, stack)
    assert isinstance(halved, lx.AdapterStack)
    assert halved.ranks == stack.ranks


def test_init_adapter_under_jit_and_eval_shape_matches_eager():
    """init_adapter is traceable (jit, eval_shape) and gives the same values."""
    params = {"dense": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)}}
    rules = [lx.LoraRule("kernel", rank=3)]
    key = jax.random.key(4)
    eager = lx.init_adapter(params, rules, key=key)
    jitted = jax.jit(lambda k: lx.init_adapter(params, rules, key=k))(key)
    shapes = jax.eval_shape(lambda k: lx.init_adapter(params, rules, key=k), key)
    for e, j, s in zip(
        jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(shapes)
    ):
        np.testing.assert_array_equal(np.asarray(e), np.asarray(j))
        assert e.shape == s.shape and e.dtype == s.dtype
    a, b = eager.weights["dense/kernel"]
    assert np.all(np.asarray(b) == 0) and np.any(np.asarray(a) != 0)


def test_merge_matches_numpy_on_multi_axis_and_stacked_leaves():
    """`lx.merge` against an einsum in float64 NumPy, on a Flax DenseGeneral kernel
    `(D, H, K)`, an Einsum kernel `(N, D, H)` with the contracted axis in the
    middle, a scanned stack `(L, in, out)` and a stacked multi-axis `(K, L, D, H)`
    with the stack axis second."""
    rng = np.random.default_rng(0)
    tree = {
        "dense_general": rng.standard_normal((5, 3, 4)),
        "einsum": rng.standard_normal((3, 5, 4)),
        "stack": rng.standard_normal((2, 5, 6)),
        "stack_multi": rng.standard_normal((4, 2, 5, 3)),
    }
    tree = {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
    rules = [
        lx.LoraRule("dense_general", 3, alpha=6.0, in_axes=0, out_axes=(1, 2)),
        lx.LoraRule("einsum", 2, alpha=1.0, in_axes=1, out_axes=(0, 2)),
        lx.LoraRule("^stack$", 4, alpha=2.0, stack_axes=0, use_rslora=True),
        lx.LoraRule("stack_multi", 2, in_axes=(2,), out_axes=(3, 0), stack_axes=1),
    ]
    ad = randomize(lx.init_adapter(tree, rules, key=jr.key(0)), 3, std=0.5)
    merged = lx.merge(tree, ad)
    ref = einsum_merge(tree, ad, xp=np)
    for k in tree:
        assert_close(merged[k], ref[k], **F32_TOL)
        assert np.abs(np.asarray(merged[k]) - np.asarray(tree[k])).max() > 1e-2
    # One written out by hand: DenseGeneral, delta[d, h, k] = sum_r a[d, r] b[r, h, k].
    a, b = (np.asarray(x, np.float64) for x in ad.weights["dense_general"])
    by_hand = np.asarray(tree["dense_general"], np.float64) + 2.0 * np.tensordot(
        a, b, axes=1
    )
    assert_close(merged["dense_general"], by_hand, **F32_TOL)
