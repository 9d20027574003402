"""Calling a loraified model without `lx.quaxify` says so.

Without quaxify, Equinox, Flax and plain `jnp` code meet the bare `BatchedLoraArray`
and used to fail with errors that do not point at the fix ("unsupported operand
type(s) for @: 'BatchedLoraArray' and 'BatchTracer'", "float() argument must be a
string or a real number, not 'BatchedLoraArray'", "dot requires ndarray or scalar
arguments"). Each now raises `QuaxifyMissingError` (a `TypeError`) naming
`lx.quaxify`; under quaxify the same calls run.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._core.array import QuaxifyMissingError
from tests.fast_init import random_adapters

D_IN, D_OUT, B = 4, 3, 2
IDX = np.array([1, -1], np.int32)
FIX = r"lx\.quaxify.*eqx\.filter_jit\(lx\.quaxify\(forward\)\)"


def _mlp():
    mlp = eqx.nn.MLP(D_IN, D_OUT, 8, 1, key=jr.key(0))
    stack = lx.stack_adapters(random_adapters(mlp, [lx.LoraRule("weight", 2)] * 2, 0))
    return mlp, lx.loraify(mlp, stack, IDX)


def _flax():
    dense = nn.Dense(D_OUT)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, D_IN)), "float32")
    params = dense.init(jr.key(1), x)
    stack = lx.stack_adapters(
        random_adapters(params, [lx.LoraRule("kernel", 2)] * 2, 0)
    )
    return dense, params, lx.loraify(params, stack, IDX), x


def test_equinox_mlp_under_vmap_without_quaxify():
    _, served = _mlp()
    xs = jnp.ones((B, D_IN))

    def forward(m, xs):
        return jax.vmap(m)(xs)

    with pytest.raises(QuaxifyMissingError, match=FIX):
        forward(served, xs)
    with pytest.raises(QuaxifyMissingError, match=FIX):
        eqx.filter_jit(forward)(served, xs)
    # The fix the message names works.
    out = eqx.filter_jit(lx.quaxify(forward))(served, xs)
    assert out.shape == (B, D_OUT)


def test_flax_dense_apply_without_quaxify():
    dense, params, served, x = _flax()
    with pytest.raises(QuaxifyMissingError, match=FIX):
        dense.apply(served, x)
    with pytest.raises(QuaxifyMissingError, match=FIX):
        jax.jit(dense.apply)(served, x)
    out = jax.jit(lx.quaxify(dense.apply))(served, x)
    # Row 1 uses the base weight alone.
    np.testing.assert_allclose(out[1], dense.apply(params, x)[1], rtol=1e-5)


def test_jnp_on_a_bare_weight():
    _, _, served, x = _flax()
    kernel = served["params"]["kernel"]
    assert isinstance(kernel, lx.BatchedLoraArray)
    calls = {
        "jnp.dot": lambda: jnp.dot(x, kernel),
        "jnp.matmul": lambda: jnp.matmul(x, kernel),
        "jnp.einsum": lambda: jnp.einsum("bi,io->bo", x, kernel),
        "jnp.asarray": lambda: jnp.asarray(kernel),
        "np.asarray": lambda: np.asarray(kernel),
        "x @ W": lambda: x @ kernel,
        "W.T @ x": lambda: kernel @ x.T,
        "x + W": lambda: jnp.ones((D_IN, D_OUT)) + kernel,
        "W * 2": lambda: kernel * 2,
        "W[tokens]": lambda: kernel[jnp.array([0, 1])],
        "float(W)": lambda: float(kernel),
    }
    for name, call in calls.items():
        with pytest.raises(QuaxifyMissingError, match=FIX):
            call()
        assert issubclass(QuaxifyMissingError, TypeError), name
    out = lx.quaxify(lambda W, x: jnp.dot(x, W))(kernel, x)
    assert out.shape == (B, D_OUT)


def test_closed_over_weight_is_named_in_the_message():
    # quaxify only sees what it is given: a weight closed over stays bare.
    _, _, served, x = _flax()
    kernel = served["params"]["kernel"]
    with pytest.raises(QuaxifyMissingError, match="closes over"):
        lx.quaxify(lambda x: x @ kernel)(x)


def test_not_an_array_like_to_libraries():
    # quax asks `eqx.is_array_like` of every rule's output: a BatchedLoraArray must
    # not look like a plain array there, or quax would wrap it as one.
    _, _, served, _ = _flax()
    kernel = served["params"]["kernel"]
    assert not eqx.is_array_like(kernel)
    assert not eqx.is_inexact_array_like(kernel)
    assert not hasattr(kernel, "__jax_array__")
    assert getattr(kernel, "__jax_array__", None) is None
    assert np.shape(kernel) == jnp.shape(kernel) == (D_IN, D_OUT)
