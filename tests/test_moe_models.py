"""Real-library MoE blocks (EasyDeL's `standard_moe`, MaxText's sparse-matmul path in
its `take` and `repeat` forms; `tests/moe_models.py`) inside a small decoder block,
served with adapted attention and expert weights, against float64 NumPy references
that merge each token's own adapter (issue #22).

- one adapter for the whole call (scalar indices, traced as a server passes them)
  and the base (`-1`): equal to the reference;
- per request `(B,)` and per token `(B, T)` indices, through the decoder block and
  the bare MoE block, written as a user would call them: each row equal to its
  request's (or token's) reference, with the low-rank term in either form (rows
  sorted by expert and adapter, `strategy="segment"`; grouped by expert,
  `strategy="gather"`);
- the low-rank term is grouped, not dense: with scalar indices the expert weights
  give 9 `ragged_dot_general` equations (per weight: the base, `x·A`, `(x·A)·B`)
  and no `(E, D, F)`-shaped array is built; per token, no weight-shaped array
  (`(..., D, F)` or `(..., F, D)`) is built either;
- the models and references themselves: unadapted, every style equals the
  reference; per request (decoder) and per token (MoE block) the references equal
  the model run on each row's merged weights without `lorax_arrays`; and the
  references tell adapters apart (so the tests have power).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from tests import moe_models as mm
from tests.helpers import walk_eqns

CFG = mm.CONFIG
B, T = 4, 5
PARAMS = mm.init_params(CFG)
RULES = mm.rules()
ADAPTERS = [mm.make_adapter(PARAMS, RULES, seed) for seed in (1, 2, 3)]
X = np.random.default_rng(7).normal(size=(B, T, CFG.d)).astype(np.float32)
PER_REQUEST = np.array([0, 2, -1, 1], np.int32)
PER_TOKEN = (
    np.random.default_rng(3).integers(-1, len(ADAPTERS), (B, T)).astype(np.int32)
)
STYLES = list(mm.STYLES)
MIN_GAP = 1e-4  # top-k decisions float32 cannot flip


def _decoder(style):
    return lambda p, x: mm.decoder(p, x, CFG, style)


def _moe(style):
    return lambda p, x: mm.STYLES[style](p, x, CFG)


def _assert_matches(got, want, gap):
    assert gap > MIN_GAP, gap  # else the reference's experts could differ
    got = np.asarray(got, np.float64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("style", STYLES)
def test_unadapted_models_equal_the_reference(style):
    for fn, ref in ((_decoder, mm.reference_decoder), (_moe, mm.reference_moe)):
        got = jax.jit(fn(style))(PARAMS, X)
        _assert_matches(got, *ref(PARAMS, ADAPTERS, -1, X, CFG))


def test_the_references_tell_adapters_apart():
    y0, _ = mm.reference_decoder(PARAMS, ADAPTERS, 0, X)
    y1, _ = mm.reference_decoder(PARAMS, ADAPTERS, 1, X)
    mixed, _ = mm.reference_decoder(PARAMS, ADAPTERS, PER_REQUEST, X)
    base, _ = mm.reference_decoder(PARAMS, ADAPTERS, -1, X)
    assert np.abs(y0 - y1).max() > 0.1 * np.abs(y0).max()
    # a request's rows are its own adapter's, whatever the other rows use
    np.testing.assert_allclose(mixed[0], y0[0], rtol=1e-12)
    np.testing.assert_allclose(mixed[3], y1[3], rtol=1e-12)
    np.testing.assert_allclose(mixed[2], base[2], rtol=1e-12)


def _merged_f32(i):
    return {
        k: v.astype(np.float32)
        for k, v in mm.merged_weights(PARAMS, ADAPTERS, i).items()
    }


@pytest.mark.parametrize("style", STYLES)
def test_the_per_row_references_equal_the_model_on_merged_weights(style):
    """Without lorax_arrays: a request's rows of the decoder, and a token's row of
    the (row-independent) MoE block, are the model's on the weights with that
    row's adapter merged. So the per-row tests below fail only where serving
    does."""
    fns = {"decoder": jax.jit(_decoder(style)), "moe": jax.jit(_moe(style))}
    outs = {
        (name, i): np.asarray(fn(_merged_f32(i), X))
        for name, fn in fns.items()
        for i in range(-1, len(ADAPTERS))
    }
    want, _ = mm.reference_decoder(PARAMS, ADAPTERS, PER_REQUEST, X, CFG)
    got = np.stack([outs["decoder", int(i)][b] for b, i in enumerate(PER_REQUEST)])
    _assert_matches(got, want, 1.0)
    want, _ = mm.reference_moe(PARAMS, ADAPTERS, PER_TOKEN, X, CFG)
    got = np.array(
        [
            [outs["moe", int(i)][b, t] for t, i in enumerate(row)]
            for b, row in enumerate(PER_TOKEN)
        ]
    )
    _assert_matches(got, want, 1.0)


_STEPS = {
    style: jax.jit(
        lambda tree, x, i, style=style: lx.quaxify(_decoder(style))(
            lx.with_indices(tree, i), x
        )
    )
    for style in STYLES
}


@pytest.mark.parametrize("i", [1, -1])
@pytest.mark.parametrize("style", STYLES)
def test_one_adapter_for_the_batch_equals_its_merged_model(style, i):
    """Scalar indices, traced (as a server passes them): works today."""
    tree = lx.loraify(PARAMS, ADAPTERS)
    got = _STEPS[style](tree, X, jnp.int32(i))
    _assert_matches(got, *mm.reference_decoder(PARAMS, ADAPTERS, i, X, CFG))


@pytest.mark.parametrize(
    "which, strategy",
    [("request", None)] + [("token", s) for s in (None, "segment", "gather")],
)
@pytest.mark.parametrize("style", STYLES)
def test_per_row_adapters(style, which, strategy):
    """Per request, `(B,)` indices `[0, 2, -1, 1]`, or per token, `(B, T)` random
    ones: each row its own adapter (or the base) in attention and in the experts;
    per token, the per-row term in the form `auto` picks and in each form forced."""
    idx = PER_REQUEST if which == "request" else PER_TOKEN
    tree = lx.loraify(PARAMS, ADAPTERS, idx)
    got = jax.jit(lx.quaxify(_decoder(style), strategy=strategy))(tree, X)
    _assert_matches(got, *mm.reference_decoder(PARAMS, ADAPTERS, idx, X, CFG))


@pytest.mark.parametrize("style", STYLES)
def test_per_token_adapters_in_the_bare_moe_block(style):
    """The MoE block alone (no attention before it), per-token indices: where a
    failure of the decoder test lies."""
    tree = lx.loraify(PARAMS, ADAPTERS, PER_TOKEN)
    got = jax.jit(lx.quaxify(_moe(style)))(tree, X)
    _assert_matches(got, *mm.reference_moe(PARAMS, ADAPTERS, PER_TOKEN, X, CFG))


def _weight_shaped(jaxpr):
    """Equations (other than the frozen base's stop_gradient) whose output ends in
    an expert weight's `(D, F)` or `(F, D)`: a merged or per-row dense weight."""
    mats = {(CFG.d, CFG.f), (CFG.f, CFG.d)}
    return [
        e.primitive.name
        for e in walk_eqns(jaxpr)
        for v in e.outvars
        if tuple(v.aval.shape[-2:]) in mats and e.primitive.name != "stop_gradient"
    ]


@pytest.mark.parametrize("style", STYLES)
def test_the_low_rank_term_is_grouped_not_dense(style):
    tree = lx.loraify(PARAMS, ADAPTERS, np.int32(1))
    jaxpr = jax.make_jaxpr(lx.quaxify(_moe(style)))(tree, X).jaxpr
    ragged = [e for e in walk_eqns(jaxpr) if e.primitive.name == "ragged_dot_general"]
    assert len(ragged) == 9  # per expert weight: the base, x·A, (x·A)·B
    assert not _weight_shaped(jaxpr)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("strategy", [None, "segment", "gather"])
def test_the_per_token_low_rank_term_is_not_dense(style, strategy):
    """Either form of the per-row term (rows sorted by expert and adapter, or
    grouped by expert), and the one `auto` picks, builds no weight."""
    tree = lx.loraify(PARAMS, ADAPTERS, PER_TOKEN)
    f = lx.quaxify(_moe(style), strategy=strategy)
    jaxpr = jax.make_jaxpr(f)(tree, X).jaxpr
    ragged = [e for e in walk_eqns(jaxpr) if e.primitive.name == "ragged_dot_general"]
    assert len(ragged) == 9  # per expert weight: the base and the two factors
    assert not _weight_shaped(jaxpr)
