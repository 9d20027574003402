"""Model code that duck-types on `.value` inside `lx.quaxify`.

NNX-era layers read a weight with `if hasattr(kernel, "value"): kernel =
kernel.value` (MaxText's `linears.py`). quax's tracer keeps its Value in a slot
named `value`, so that line used to take the bare `BatchedLoraArray` out of its
tracer and the next operation raised `QuaxifyMissingError` inside `lx.quaxify`.
`_rules/quax_compat.py` makes the slot read as the tracer itself to such code.
Every result is checked against the per-example merged weight in float64 NumPy,
with random non-zero factors and a base row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from quax._trace import _QuaxTracer

import lorax_arrays as lx
from lorax_arrays._rules import quax_compat as _compat
from tests.fast_init import random_adapters
from tests.helpers import assert_close_to_reference, dense_weight_per_example, make_lora

D_IN, D_OUT, N, R = 5, 4, 3, 2
IDX = np.array([0, 2, -1, 1], np.int32)


def _unwrap(kernel):
    """MaxText's line, verbatim in spirit."""
    if hasattr(kernel, "value"):
        kernel = kernel.value
    return kernel


USES = {
    "matmul": lambda x, k: x @ k,
    "rmatmul-T": lambda x, k: (k.T @ x.T).T,
    "jnp.dot": lambda x, k: jnp.dot(x, k),
    "jnp.einsum": lambda x, k: jnp.einsum("bi,io->bo", x, k),
    "jnp.asarray": lambda x, k: x @ jnp.asarray(k, jnp.float32),
    "lax.dot_general": lambda x, k: lax.dot_general(x, k, (((1,), (0,)), ((), ()))),
    "astype": lambda x, k: x @ k.astype(jnp.float32),
}


def _reference(x, parts, idx):
    w_e = dense_weight_per_example(*parts, idx, (0,), (1,))
    return np.einsum("bi,bio->bo", np.asarray(x, np.float64), w_e)


@pytest.mark.parametrize("use", sorted(USES))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_kernel_value_duck_typing_serves_each_row(use, jit):
    lora, parts = make_lora((D_IN, D_OUT), n=N, rank=R, indices=jnp.asarray(IDX))
    x = np.random.default_rng(1).standard_normal((len(IDX), D_IN)).astype(np.float32)

    def f(params, x):
        return USES[use](x, _unwrap(params["kernel"]))

    run = lx.quaxify(f)
    out = (jax.jit(run) if jit else run)({"kernel": lora}, jnp.asarray(x))
    mag = np.abs(x) @ np.abs(dense_weight_per_example(*parts, IDX, (0,), (1,)))[0]
    assert_close_to_reference(out, _reference(x, parts, IDX), mag)


def test_kernel_value_in_nested_jit_scan_and_grad():
    """The same line inside a nested `jax.jit` and a `lax.scan` over a layer
    stack, and differentiated with respect to the factors."""
    lora, parts = make_lora(
        (2, D_IN, D_IN), (1,), (2,), (0,), n=N, rank=R, indices=jnp.asarray(IDX)
    )
    x = np.random.default_rng(2).standard_normal((len(IDX), D_IN)).astype(np.float32)

    @jax.jit
    def layer(h, k):
        return jnp.tanh(h @ _unwrap(k))

    def f(params, x):
        def body(h, k):
            return layer(h, k), None

        return lax.scan(body, x, params["w"])[0]

    out = jax.jit(lx.quaxify(f))({"w": lora}, jnp.asarray(x))
    w_e = dense_weight_per_example(*parts, IDX, (1,), (2,), (0,))  # (B, L, D, D)
    ref = np.asarray(x, np.float64)
    for layer_i in range(2):
        ref = np.tanh(np.einsum("bi,bio->bo", ref, w_e[:, layer_i]))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    def loss(a, b):
        return jnp.sum(lx.quaxify(f)({"w": lora.replace(a=a, b=b)}, x) ** 2)

    def loss_plain(a, b):
        # The same loss through the tracer itself (no `.value`).
        g = lambda params, x: lax.scan(  # noqa: E731
            lambda h, k: (jnp.tanh(h @ k), None), x, params["w"]
        )[0]
        return jnp.sum(lx.quaxify(g)({"w": lora.replace(a=a, b=b)}, x) ** 2)

    got = jax.grad(loss, (0, 1))(lora.a, lora.b)
    want = jax.grad(loss_plain, (0, 1))(lora.a, lora.b)
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


class MaxTextDense(nnx.Module):
    """MaxText's `DenseGeneral.__call__`, reduced to its weight handling."""

    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (D_IN, D_OUT)))

    def __call__(self, x):
        kernel = self.kernel[...]
        if hasattr(kernel, "value"):
            kernel = kernel.value
        kernel = jnp.asarray(kernel, jnp.float32)
        return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def test_maxtext_style_nnx_layer():
    model = MaxTextDense(nnx.Rngs(0))
    rules = [lx.LoraRule("kernel", rank=R, alpha=2.0 * R)]
    adapters = random_adapters(model, [rules] * N, seed=3, std=0.5)
    rng = np.random.default_rng(3)
    stack = lx.stack_adapters(adapters)
    served = lx.loraify(model, stack, jnp.asarray(IDX))
    x = rng.standard_normal((len(IDX), D_IN)).astype(np.float32)
    out = jax.jit(lx.quaxify(lambda m, x: m(x)))(served, jnp.asarray(x))
    w = np.asarray(model.kernel[...], np.float64)
    ref = np.empty((len(IDX), D_OUT))
    for row, i in enumerate(IDX):
        merged = w.copy()
        if i >= 0:
            a, b = (
                np.asarray(f, np.float64) for f in adapters[i].weights["kernel/value"]
            )
            merged += 2.0 * a @ b
        ref[row] = x[row] @ merged
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_owners_still_read_the_value_and_others_the_tracer():
    """quax and lorax_arrays read the Value from the slot; other code the tracer."""
    lora, _ = make_lora(indices=jnp.asarray(IDX[:1]))
    seen = {}

    def f(k):
        seen["foreign"] = k.value
        seen["owner"] = k._trace.to_value(k)  # quax's own read
        return jnp.ones((1, 4)) @ k

    lx.quaxify(f)(lora)
    assert _compat.PATCHED_TRACER_VALUE
    assert isinstance(seen["foreign"], _QuaxTracer)
    assert isinstance(seen["owner"], lx.BatchedLoraArray)


def test_without_the_patch_the_duck_typing_fails(monkeypatch):
    """What the patch fixes: quax's slot as it ships."""
    monkeypatch.setattr(_QuaxTracer, "value", _QuaxTracer.value.slot)
    lora, _ = make_lora(indices=jnp.asarray(IDX[:1]))
    with pytest.raises(lx.QuaxifyMissingError):
        lx.quaxify(lambda k: jnp.ones((1, 4)) @ _unwrap(k))(lora)
