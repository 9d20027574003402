"""`LoraRule` and `match_rules`: which leaves are adapted, and how they are laid out."""

from __future__ import annotations

import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx


@pytest.fixture(scope="module")
def mlp():
    return eqx.nn.MLP(8, 6, 16, 2, key=jr.key(0))


class _FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(12)(x)
        h = nn.DenseGeneral(features=(2, 4))(h)
        return nn.Dense(5)(h.reshape(*h.shape[:-2], 8))


@pytest.fixture(scope="module")
def flax_params():
    return _FlaxNet().init(jr.key(1), jnp.ones((1, 3, 8)))


def _by_path(matches):
    return {m.path: m for m in matches}


def test_mlp_default_layout_is_out_in(mlp):
    matches = lx.match_rules(mlp, lx.LoraRule("weight", 3))
    got = _by_path(matches)
    assert list(got) == ["layers/0/weight", "layers/1/weight", "layers/2/weight"]
    for path, shape in [
        ("layers/0/weight", (16, 8)),
        ("layers/1/weight", (16, 16)),
        ("layers/2/weight", (6, 16)),
    ]:
        m = got[path]
        # eqx.nn.Linear computes weight @ x: weight is (out, in).
        assert m.layout.shape == shape
        assert m.layout.in_axes == (1,)
        assert m.layout.out_axes == (0,)
        assert m.layout.stack_axes == ()
        assert m.layout.in_shape == (shape[1],)
        assert m.layout.out_shape == (shape[0],)
        assert m.rank == 3
        assert m.dtype == jnp.float32


def test_biases_are_never_candidates(mlp):
    # '.' matches every path, yet only the three 2-D weights are adapted.
    paths = [m.path for m in lx.match_rules(mlp, lx.LoraRule(".", 2))]
    assert paths == ["layers/0/weight", "layers/1/weight", "layers/2/weight"]


def test_linear_inside_a_dict_keeps_out_in_layout():
    tree = {"enc": eqx.nn.Linear(4, 7, key=jr.key(0)), "w": jnp.ones((4, 7))}
    got = _by_path(lx.match_rules(tree, lx.LoraRule(".", 2)))
    assert set(got) == {"enc/weight", "w"}
    assert (got["enc/weight"].layout.in_axes, got["enc/weight"].layout.out_axes) == (
        (1,),
        (0,),
    )
    # A plain 2-D leaf is (in, out), as in `x @ w`.
    assert (got["w"].layout.in_axes, got["w"].layout.out_axes) == ((0,), (1,))


def test_flax_params_kernel_is_in_out(flax_params):
    rules = [
        lx.LoraRule("Dense_.*kernel", 2),
        lx.LoraRule("DenseGeneral_0/kernel", 4, in_axes=(0,), out_axes=(1, 2)),
    ]
    got = _by_path(lx.match_rules(flax_params, rules))
    assert set(got) == {
        "params/Dense_0/kernel",
        "params/Dense_1/kernel",
        "params/DenseGeneral_0/kernel",
    }
    d0 = got["params/Dense_0/kernel"]
    assert d0.layout.shape == (8, 12)
    assert (d0.layout.in_axes, d0.layout.out_axes) == ((0,), (1,))
    dg = got["params/DenseGeneral_0/kernel"]
    assert dg.layout.shape == (12, 2, 4)
    assert dg.layout.in_shape == (12,)
    assert dg.layout.out_shape == (2, 4)
    assert dg.rank == 4


def test_raw_dict_skips_integer_and_1d_leaves():
    tree = {
        "w1": jnp.ones((8, 16)),
        "w2": jnp.ones((16, 4), jnp.bfloat16),
        "table": jnp.ones((10, 8), jnp.int32),
        "bias": jnp.ones((16,)),
    }
    got = _by_path(lx.match_rules(tree, lx.LoraRule(".*", 2)))
    assert set(got) == {"w1", "w2"}
    assert got["w2"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="table"):
        # The only leaf it names is an integer table: nothing to adapt.
        lx.match_rules(tree, lx.LoraRule("table", 2))


def test_in_axes_only_or_out_axes_only_infers_the_rest():
    tree = {"k": jnp.ones((8, 2, 4))}
    (m,) = lx.match_rules(tree, lx.LoraRule("k", 2, in_axes=0))
    assert (m.layout.in_axes, m.layout.out_axes) == ((0,), (1, 2))
    (m,) = lx.match_rules(tree, lx.LoraRule("k", 2, out_axes=(-1,)))
    assert (m.layout.in_axes, m.layout.out_axes) == ((0, 1), (2,))


def test_stack_axes_leave_a_2d_default():
    tree = {"layers": {"w": jnp.ones((3, 8, 5))}}
    (m,) = lx.match_rules(tree, lx.LoraRule("w", 2, stack_axes=0))
    assert m.layout.stack_axes == (0,)
    assert (m.layout.in_axes, m.layout.out_axes) == ((1,), (2,))
    assert m.layout.stack_shape == (3,)


@pytest.mark.parametrize(
    "kwargs", [{}, dict(in_axes=2), dict(out_axes=-2), dict(in_axes=2, out_axes=1)]
)
def test_vmapped_linear_stack_leading_axes_are_stack_axes(kwargs):
    # eqx.filter_vmap over Linear constructors: weight (L, out, in). Naming only the
    # in (or out) axis must not turn the layer axis into an out (or in) axis.
    layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 6, key=k))(
        jr.split(jr.key(0), 3)
    )
    (m,) = lx.match_rules(layers, lx.LoraRule("weight", 2, **kwargs))
    assert m.layout.shape == (3, 6, 4)
    assert (m.layout.stack_axes, m.layout.in_axes, m.layout.out_axes) == (
        (0,),
        (2,),
        (1,),
    )
    # Naming every axis explicitly is still respected.
    (m,) = lx.match_rules(layers, lx.LoraRule("weight", 2, in_axes=2, out_axes=(0, 1)))
    assert (m.layout.stack_axes, m.layout.out_axes) == ((), (0, 1))


def test_first_matching_rule_wins(mlp):
    rules = [lx.LoraRule("layers/1", 8, alpha=4.0), lx.LoraRule("weight", 2)]
    got = _by_path(lx.match_rules(mlp, rules))
    assert got["layers/1/weight"].rank == 8
    assert got["layers/1/weight"].rule is rules[0]
    assert got["layers/1/weight"].scale == 0.5
    assert got["layers/0/weight"].rank == 2
    assert got["layers/2/weight"].rank == 2
    assert got["layers/0/weight"].rule is rules[1]


def test_rule_whose_leaves_were_all_claimed_is_an_error(mlp):
    rules = [lx.LoraRule("weight", 2), lx.LoraRule("layers/1", 8)]
    with pytest.raises(ValueError, match="earlier rules") as info:
        lx.match_rules(mlp, rules)
    assert "'layers/1'" in str(info.value)


def test_3d_leaf_without_axes_names_path_and_suggests_axes():
    tree = {"attn": {"qkv": jnp.ones((8, 2, 4))}, "w": jnp.ones((4, 4))}
    with pytest.raises(ValueError) as info:
        lx.match_rules(tree, [lx.LoraRule("w", 2), lx.LoraRule("qkv", 2)])
    msg = str(info.value)
    assert "'attn/qkv'" in msg
    assert "(8, 2, 4)" in msg
    assert "in_axes" in msg and "out_axes" in msg


def test_rule_matching_nothing_names_pattern_and_lists_paths(mlp):
    with pytest.raises(ValueError) as info:
        lx.match_rules(mlp, [lx.LoraRule("weight", 2), lx.LoraRule("q_proj", 2)])
    msg = str(info.value)
    assert "'q_proj'" in msg
    for path in ("layers/0/weight", "layers/1/weight", "layers/2/weight"):
        assert repr(path) in msg


def test_bad_axes_error_names_the_leaf(flax_params):
    # The DenseGeneral bias is 2-D (2, 4) too, so an unanchored pattern catches it
    # and its out_axes=(1, 2) do not fit: the error must say which leaf.
    rule = lx.LoraRule("DenseGeneral", 2, in_axes=(0,), out_axes=(1, 2))
    with pytest.raises(ValueError) as info:
        lx.match_rules(flax_params, rule)
    msg = str(info.value)
    assert "params/DenseGeneral_0/bias" in msg
    assert "out_axes" in msg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_axes=(0,), out_axes=(1,)), "none of"),
        (dict(in_axes=(0,), out_axes=(0, 1, 2)), "both"),
        (dict(in_axes=(3,)), "axis 3"),
    ],
)
def test_inconsistent_axes_are_errors(kwargs, match):
    # A one-letter path that also occurs inside the message ("weight").
    tree = {"w": jnp.ones((8, 2, 4))}
    with pytest.raises(ValueError, match=match) as info:
        lx.match_rules(tree, lx.LoraRule("w", 2, **kwargs))
    assert "'w'" in str(info.value)


def test_printed_table_shows_path_shape_rank(mlp):
    rules = [lx.LoraRule("layers/0", 2), lx.LoraRule("layers/2", 5, alpha=10.0)]
    matches = lx.match_rules(mlp, rules)
    assert isinstance(matches, lx.RuleMatches)
    assert isinstance(matches, tuple) and len(matches) == 2
    text = str(matches)
    lines = text.splitlines()
    header = lines[0].split()
    for col in ("path", "shape", "rank", "scale"):
        assert col in header
    row0 = next(line for line in lines if line.startswith("layers/0/weight"))
    row2 = next(line for line in lines if line.startswith("layers/2/weight"))
    assert "(16, 8)" in row0 and " 2 " in row0
    assert "(6, 16)" in row2 and " 5 " in row2 and " 2 " in row2  # scale 10/5
    params = 2 * (8 + 16) + 5 * (16 + 6)
    assert f"2 leaves adapted, {params:,} adapter parameters." in text
    assert "layers/0/weight" in repr(matches)


def test_rslora_scale_is_alpha_over_sqrt_rank(mlp):
    rule = lx.LoraRule("layers/0", 4, alpha=8.0, use_rslora=True)
    assert rule.scale == pytest.approx(8.0 / 2.0)
    (m,) = lx.match_rules(mlp, rule)
    assert m.scale == pytest.approx(4.0)
    ad = lx.init_adapter(mlp, rule, key=jr.key(0))
    assert ad.scale("layers/0/weight") == pytest.approx(4.0)
    stack = lx.stack_adapters([ad])
    assert float(stack.scales["layers/0/weight"][0]) == pytest.approx(4.0)
    plain = lx.LoraRule("layers/0", 4, alpha=8.0)
    assert plain.scale == pytest.approx(2.0)
    assert lx.LoraRule("x", 16).scale == 1.0  # alpha defaults to rank


@settings(max_examples=20, deadline=None)
@given(
    rank=st.integers(1, 64),
    alpha=st.one_of(st.none(), st.floats(0.25, 128.0)),
    rs=st.booleans(),
)
def test_scale_formula(rank, alpha, rs):
    rule = lx.LoraRule("w", rank, alpha, use_rslora=rs)
    a = rank if alpha is None else alpha
    expected = a / math.sqrt(rank) if rs else a / rank
    assert rule.scale == pytest.approx(expected)


def test_invalid_rules():
    with pytest.raises(ValueError, match="invalid regex"):
        lx.LoraRule("layers/(", 2)
    with pytest.raises(ValueError, match="rank"):
        lx.LoraRule("w", 0)
    with pytest.raises(ValueError, match="rank"):
        lx.LoraRule("w", -3)
    with pytest.raises(TypeError, match="rank"):
        lx.LoraRule("w", 2.0)
    with pytest.raises(TypeError, match="rank"):
        lx.LoraRule("w", True)
    tree = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="no rules"):
        lx.match_rules(tree, [])
    with pytest.raises(TypeError, match="LoraRule"):
        lx.match_rules(tree, ["w"])


def test_loraified_tree_matches_like_its_base(mlp):
    rules = [lx.LoraRule("layers/[01]", 2)]
    ad = lx.init_adapter(mlp, rules, key=jr.key(0))
    lm = lx.loraify(mlp, ad, jnp.zeros((2,), jnp.int32))
    before = [(m.path, m.layout) for m in lx.match_rules(mlp, rules)]
    after = [(m.path, m.layout) for m in lx.match_rules(lm, rules)]
    assert before == after
    assert jax.tree.structure(lm) != jax.tree.structure(mlp)
