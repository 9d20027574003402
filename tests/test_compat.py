"""Sentinels and checks for what `_rules/quax_compat.py` patches into quax.

When one of these fails after a quax (or JAX) upgrade, quax has changed under us:
check whether each patch is still needed, then update its version range
(`CUSTOM_VJP_PATCH_VERSIONS` for the custom_vjp method, whose custom backward pass
tests/test_control_flow.py checks; `QUAX_CALL_VERSIONS` for `_Quaxify.__call__`
and the tracer's `value` slot, which tests/test_nnx.py and
tests/test_value_duck_typing.py exercise). docs/design.md, "Compatibility", says
why each exists.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax
from quax._trace import _QuaxTrace
from quax.examples.lora import LoraArray

from lorax_arrays._rules import quax_compat as _compat


def _doubling_grad():
    """`sin` whose custom backward pass doubles the gradient."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (2.0 * g * jnp.cos(x),))
    return f


@pytest.fixture
def unpatched(monkeypatch):
    """quax's trace as quax ships it: our method removed for the test."""
    if _compat.PATCHED_CUSTOM_VJP:
        monkeypatch.delattr(_QuaxTrace, "process_custom_vjp_call")
    assert "process_custom_vjp_call" not in _QuaxTrace.__dict__


def test_quax_does_not_handle_custom_vjp_itself():
    assert _compat.QUAX_HANDLES_CUSTOM_VJP is False, (
        "quax now handles custom_vjp itself: check whether "
        "_rules/quax_compat.py's patch is still needed"
    )


def test_quax_version_is_one_the_patch_is_known_to_work_with():
    lo, hi = _compat.CUSTOM_VJP_PATCH_VERSIONS
    assert lo <= _compat.QUAX_VERSION < hi, (
        f"quax {_compat.QUAX_VERSION} is outside {lo} <= version < {hi}, the "
        "versions _rules/quax_compat.py's custom_vjp patch is known to work with, "
        "so it is not applied: check the patch against this quax and widen "
        "CUSTOM_VJP_PATCH_VERSIONS (or drop the patch if quax handles custom_vjp)"
    )
    assert _compat.PATCHED_CUSTOM_VJP


def test_the_patch_is_applied_only_in_the_known_range():
    assert _compat._version_tuple("0.4.6") == (0, 4, 6)
    assert _compat._version_tuple("0.5.0rc1") == (0, 5, 0)
    assert _compat.should_patch((0, 4, 6), quax_handles_it=False)
    assert _compat.should_patch((0, 4, 12), quax_handles_it=False)
    assert not _compat.should_patch((0, 4, 6), quax_handles_it=True)
    assert not _compat.should_patch((0, 4, 5), quax_handles_it=False)
    assert not _compat.should_patch((0, 5, 0), quax_handles_it=False)
    assert not _compat.should_patch((1, 0), quax_handles_it=False)


def _quax_lora():
    w = jr.normal(jr.key(0), (4, 3))
    lora = LoraArray(w, rank=2, key=jr.key(1))
    # b starts at zero; make the adaptation visible.
    return eqx.tree_at(lambda m: m.b, lora, jnp.ones_like(lora.b))


def _loss(x, m):
    # A custom_vjp of an activation that a quax value produced (`x @ m` is a quax
    # tracer of a plain array): the case the patch is for.
    return _doubling_grad()(x @ m).sum()


X = jnp.linspace(-1.0, 1.0, 4)


def test_without_the_patch_quax_refuses_custom_vjp(unpatched):
    # What the patch is for: quax as shipped raises for a custom_vjp that meets
    # its trace, even on plain activations.
    with pytest.raises(NotImplementedError, match="custom_vjp"):
        jax.grad(quax.quaxify(_loss))(X, _quax_lora())


def test_patched_custom_vjp_runs_its_backward_pass_under_plain_quaxify():
    """Plain `quax.quaxify` (no BatchedLoraArray anywhere) gets the patch too:
    quax's LoraArray keeps its matmul rule, and the custom backward pass (doubling)
    is used."""
    lora = _quax_lora()
    got = jax.grad(quax.quaxify(_loss))(X, lora)
    dense = np.asarray(lora.w + lora.a @ lora.b)
    expected = dense @ (2.0 * np.cos(np.asarray(X) @ dense))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def _custom_vjp_error(fn, *args):
    with pytest.raises(Exception) as info:
        quax.quaxify(fn)(*args)
    return type(info.value), str(info.value)


def test_other_quax_values_in_a_custom_vjp_behave_as_without_the_patch(monkeypatch):
    """quax's own LoraArray given to a custom_vjp function: the same error as quax
    raises natively (not ours, which is about BatchedLoraArrays)."""
    f = _doubling_grad()
    lora = _quax_lora()
    patched = _custom_vjp_error(f, lora)
    assert _QuaxTrace.process_custom_vjp_call is _compat._process_custom_vjp_call
    monkeypatch.delattr(_QuaxTrace, "process_custom_vjp_call")
    native = _custom_vjp_error(f, lora)
    assert patched[0] is native[0] and patched[0] is NotImplementedError
    assert patched[1] == native[1]
    assert "BatchedLoraArray" not in patched[1]


# -- quax's argument wrapping on JAX >= 0.11 ------------------------------------


def _nnx_linear_under_plain_quax():
    """An NNX Linear whose kernel is a quax LoraArray, through `quax.quaxify`."""
    from flax import nnx

    lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    lin.kernel = nnx.Param(LoraArray(lin.kernel[...], rank=1, key=jr.key(1)))
    return quax.quaxify(lambda m, x: m(x))(lin, jnp.ones((4, 3)))


def test_quax_versions_the_call_and_value_patches_were_checked_with():
    lo, hi = _compat.QUAX_CALL_VERSIONS
    assert lo <= _compat.QUAX_VERSION < hi, (
        f"quax {_compat.QUAX_VERSION} is outside {lo} <= version < {hi}, the "
        "versions whose `_Quaxify.__call__` and tracer `value` slot "
        "_rules/quax_compat.py copies and wraps: check both against this quax "
        "and widen QUAX_CALL_VERSIONS (or drop a patch quax no longer needs)"
    )
    assert _compat.PATCHED_TRACER_VALUE


def test_the_call_patch_is_applied_exactly_on_a_jax_that_leaves_no_trace():
    # JAX <= 0.10 leaves `eval_trace` current in `take_current_trace()`; >= 0.11
    # leaves none. The patch is needed (and applied) only in the second case.
    assert _compat.PATCHED_QUAXIFY_CALL == _compat.JAX_TAKE_LEAVES_NO_TRACE
    version = tuple(int(p) for p in jax.__version__.split(".")[:2])
    assert _compat.JAX_TAKE_LEAVES_NO_TRACE == (version >= (0, 11))


def test_nnx_under_plain_quax_works_with_the_call_patch():
    out = _nnx_linear_under_plain_quax()
    assert out.shape == (4, 2) and np.isfinite(np.asarray(out)).all()


def test_without_the_call_patch_nnx_fails_exactly_where_jax_leaves_no_trace(
    monkeypatch,
):
    """What the patch fixes: on JAX >= 0.11, quax as it ships rebuilds NNX
    Variables with no trace current, and NNX asserts."""
    from quax._quaxify import _Quaxify

    monkeypatch.setattr(_Quaxify, "__call__", _compat.native_quaxify_call)
    if _compat.JAX_TAKE_LEAVES_NO_TRACE:
        with pytest.raises(AssertionError):
            _nnx_linear_under_plain_quax()
    else:
        assert _nnx_linear_under_plain_quax().shape == (4, 2)
