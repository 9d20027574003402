"""Index values are what the user passed: nothing wraps on the way to int32.

Concrete values are range-checked as given (a Python int, a NumPy int64 or
uint64 array), before any conversion could turn `2**32 + 1` into adapter 1 or
`2**32 - 1` into the base model; the message quotes the value passed. Traced
values of any integer dtype (unsigned included, where `+ 1` wraps the largest
value to 0) that lie outside `[-1, n)` give NaN rows, on every kind of leaf
(a rank-0 IA3-only leaf too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from tests.helpers import make_lora

HUGE = [2**32 + 1, 2**32 - 1, 2**31, 2**40, -(2**32) + 1, -2]


def _lora(idx=None):
    return make_lora((5, 4), n=3, rank=2, indices=idx)[0]


@pytest.mark.parametrize("bad", HUGE)
@pytest.mark.parametrize(
    "form",
    ["list", "int64", "uint64", "python-int"],
)
def test_concrete_values_beyond_int32_are_refused_quoting_them(bad, form):
    given = {
        "list": [0, bad, -1],
        "int64": np.array([0, bad, -1], np.int64),
        # A negative number has no uint64 form: its two's complement instead.
        "uint64": np.array([0, bad % 2**64], np.uint64),
        "python-int": bad,
    }[form]
    lora = _lora(np.zeros(3, np.int32))
    for call in (
        lambda: lx.with_indices({"w": lora}, given),
        lambda: lx.BatchedLoraArray(
            lora.w,
            lora.a,
            lora.b,
            scale=lora.scale,
            indices=given,
            in_axes=0,
            out_axes=1,
        ),
    ):
        quoted = bad % 2**64 if form == "uint64" else bad
        with pytest.raises(lx.LoraIndexError, match=f"adapter index {quoted} "):
            call()


@pytest.mark.parametrize("bad", HUGE)
def test_stack_indices_refuse_huge_numbers(bad):
    rules = lx.LoraRule("w", rank=2)
    tree = {"w": jnp.ones((5, 4))}
    stack = lx.stack_adapters(
        [lx.init_adapter(tree, rules, key=jax.random.key(i)) for i in range(3)]
    )
    with pytest.raises(lx.LoraIndexError, match=f"adapter index {bad} "):
        stack.indices([0, bad])
    with pytest.raises(lx.LoraIndexError, match=f"adapter index {bad} "):
        stack.indices([0, np.int64(bad)])


def test_in_range_int64_and_unsigned_values_serve_as_given():
    """The checks refuse only what cannot be an index: valid int64 and uint8
    arrays still serve their adapters."""
    lora, (w, a, b, scale) = make_lora((5, 4), n=3, rank=2)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    ref = np.stack(
        [x[e] @ (w + scale[i] * a[i] @ b[i]) for e, i in enumerate((2, 0, 1))]
    )
    for given in (np.array([2, 0, 1], np.int64), np.array([2, 0, 1], np.uint8)):
        out = lx.quaxify(lambda W, x: x @ W)(lx.with_indices(lora, given), x)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,bad",
    [
        (np.uint8, 255),
        (np.uint8, 3),
        (np.uint16, 65535),
        (np.uint32, 2**32 - 1),
        (np.int8, 127),
        (np.int8, -128),
        (np.int32, 2**31 - 1),
    ],
)
@pytest.mark.parametrize("strategy", ["gather", "dense", "segment"])
def test_traced_values_of_every_integer_dtype_give_nan_rows(dtype, bad, strategy):
    lora, (w, a, b, scale) = make_lora((5, 4), n=3, rank=2, strategy=strategy)
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    good = 1 if np.issubdtype(dtype, np.unsignedinteger) else -1
    idx = np.array([0, bad, good], dtype)

    @jax.jit
    def run(lora, i):
        return lx.quaxify(lambda W, x: x @ W)(lora.replace(indices=i), x)

    out = np.asarray(run(lora, jnp.asarray(idx)))
    assert np.isnan(out[1]).all()
    np.testing.assert_allclose(
        out[0], x[0] @ (w + scale[0] * a[0] @ b[0]), rtol=1e-5, atol=1e-5
    )
    w_good = w if good < 0 else w + scale[good] * a[good] @ b[good]
    np.testing.assert_allclose(out[2], x[2] @ w_good, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["in_scale", "out_scale"])
def test_a_rank_zero_ia3_leaf_is_guarded_too(where):
    """An IA3-only leaf has no low-rank term to carry the guarded scale: its
    vectors are guarded themselves. A traced 7 of 3 adapters is NaN, not the
    last adapter's vector."""
    rng = np.random.default_rng(2)
    n, d_in, d_out = 3, 5, 4
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    vec = {
        "in_scale": rng.uniform(0.5, 1.5, (n, d_in, 1)).astype(np.float32),
        "out_scale": rng.uniform(0.5, 1.5, (n, 1, d_out)).astype(np.float32),
    }[where]
    lora = lx.BatchedLoraArray(
        jnp.asarray(w),
        jnp.zeros((n, d_in, 0)),
        jnp.zeros((n, 0, d_out)),
        scale=1.0,
        indices=np.zeros(3, np.int32),
        in_axes=0,
        out_axes=1,
        **{where: vec},
    )
    x = rng.standard_normal((3, d_in)).astype(np.float32)

    @jax.jit
    def run(lora, i):
        return lx.quaxify(lambda W, x: x @ W)(lora.replace(indices=i), x)

    out = np.asarray(run(lora, jnp.array([2, 7, -1], jnp.int32)))
    assert np.isnan(out[1]).all()
    h = vec[2].reshape(-1)
    want = (x[0] * h) @ w if where == "in_scale" else (x[0] @ w) * h
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[2], x[2] @ w, rtol=1e-5, atol=1e-5)
