"""Sentinels for what `lorax_arrays/_compat.py` patches into quax.

When one of these fails after a quax upgrade, quax has changed under us: check
whether the patch is still needed (and whether quax's own version keeps the custom
backward pass of a `jax.custom_vjp` function applied to plain activations, which
tests/test_control_flow.py checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import quax
from quax._trace import _QuaxTrace

import lorax_arrays as lx


def test_quax_does_not_handle_custom_vjp_itself():
    assert lx._compat.QUAX_HANDLES_CUSTOM_VJP is False, (
        "quax now handles custom_vjp itself: check whether "
        "lorax_arrays/_compat.py's patch is still needed"
    )


def test_patch_is_installed_on_quax_trace():
    assert "process_custom_vjp_call" in _QuaxTrace.__dict__
    assert _QuaxTrace.process_custom_vjp_call is lx._compat._process_custom_vjp_call


def test_patched_custom_vjp_runs_its_backward_pass_under_plain_quaxify():
    # The patch is on quax's trace, so plain `quax.quaxify` (no BatchedLoraArray
    # anywhere) gets it too: the custom backward pass (doubling) is used.
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (2.0 * g * jnp.cos(x),))
    x = jnp.linspace(-1.0, 1.0, 5)
    grad = jax.grad(lambda v: quax.quaxify(f)(v).sum())(x)
    np.testing.assert_allclose(grad, 2.0 * np.cos(x), rtol=1e-6)
