"""Helpers for the rule/adapter/model/training tests (independent of tests/helpers.py).

The end-to-end reference is always "run this row alone through the plain model with
that row's adapter merged in" (`einsum_merge(base, stack[i])`, or the base model for
`i == -1`): no `quaxify`, no BatchedLoraArray, no batching, and not `lx.merge`
either, so that a layout error shared by the library's merge and its rewrite cannot
cancel out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import lorax_arrays as lx

# float32: the batched low-rank form and the merged dense weight round differently
# (x·W + s·(x·A)·B vs x·(W + s·A⊗B)); on these tiny models (outputs O(1), fan-in
# <= 16) the difference is ~1e-6, so 2e-5 absolute + relative is a safe bound.
F32_TOL = dict(rtol=2e-5, atol=2e-5)
# bfloat16 (8-bit mantissa, eps 2**-8 ~ 4e-3): weights, factors, the rank-r
# intermediate and every layer's output are rounded; a few roundings of O(1) values
# through 2-3 layers stay below 5e-2.
BF16_TOL = dict(rtol=5e-2, atol=5e-2)
# bfloat16 keeps 8 significant bits (~0.4% per rounding); through a few layers the
# error of an output element scales with the largest intermediates, not with the
# element itself, so bf16 comparisons use an absolute tolerance of this fraction
# of the reference's largest magnitude.
BF16_REL_TO_MAX = 1e-2


def randomize(tree: Any, seed: int, std: float = 0.1) -> Any:
    """Every array leaf replaced by `std * N(0, 1)` (same shape and dtype).

    Applied to an `Adapter`, this makes B non-zero (a freshly initialised adapter
    has B = 0, which would hide every bug in the low-rank term). NumPy's generator
    keeps this cheap: no JAX compilation per new shape.
    """
    rng = np.random.default_rng(seed)

    def draw(x):
        values = rng.standard_normal(x.shape).astype(np.float32) * std
        return jnp.asarray(values).astype(x.dtype)

    return jax.tree.map(draw, tree)


def weight_delta(a, b, layout, xp=np):
    """`a ⊗ b` on the weight's own axes, by one einsum: a letter per weight axis,
    `a` carries (stack, in, r), `b` (stack, r, out). Independent of the library's
    `dense_delta` (reshape, matmul, transpose)."""
    letters = "abcdefghijklmnopqstuvwxyz"[: len(layout.shape)]
    ax = lambda axes: "".join(letters[i] for i in axes)  # noqa: E731
    st, ins, outs = ax(layout.stack_axes), ax(layout.in_axes), ax(layout.out_axes)
    return xp.einsum(f"{st}{ins}r,{st}r{outs}->{letters}", a, b)


def einsum_merge(base: Any, adapter: lx.Adapter, xp=jnp) -> Any:
    """`base` with `w + scale · a ⊗ b` at every adapted path, written with one
    einsum per leaf: the reference merge. `xp=np` merges in float64 NumPy; `jnp`
    keeps it differentiable (for gradient references)."""
    from lorax_arrays._core.paths import path_str

    layouts = {lay.path: lay for lay in adapter.layouts}
    found = set()

    def fold(keypath, leaf):
        path = path_str(keypath)
        if path not in layouts:
            return leaf
        found.add(path)
        a, b = adapter.weights[path]
        if xp is np:
            a, b, w = (np.asarray(x, np.float64) for x in (a, b, leaf))
            return (
                w + adapter.scale(path) * weight_delta(a, b, layouts[path], np)
            ).astype(np.asarray(leaf).dtype)
        d = weight_delta(
            a.astype(jnp.float32), b.astype(jnp.float32), layouts[path], jnp
        )
        return (leaf + adapter.scale(path) * d).astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(fold, base)
    missing = set(layouts) - found
    assert not missing, f"einsum_merge: no leaf at {sorted(missing)}"
    return out


def merged_or_base(base: Any, stack: lx.AdapterStack, i: int, cache: dict) -> Any:
    """`base` with adapter `i` merged by float64 NumPy (`einsum_merge`), or `base`
    itself for `i == -1` (memoised)."""
    i = int(i)
    if i not in cache:
        cache[i] = base if i < 0 else einsum_merge(base, stack[i], xp=np)
    return cache[i]


def per_row_reference(
    base: Any,
    stack: lx.AdapterStack,
    indices: Any,
    run_one: Callable[[Any, Any], Any],
    xs: Any,
) -> np.ndarray:
    """`run_one(model_e, xs[e])` for every leading index `e` of `indices`.

    `indices` may be `(B,)` (one adapter per example) or `(B, T)` (one per token:
    `xs[b, t]` is then run alone, so the model must not mix tokens).
    """
    indices = np.asarray(indices)
    cache: dict = {}
    rows = []
    for e in np.ndindex(*indices.shape):
        model = merged_or_base(base, stack, indices[e], cache)
        rows.append(np.asarray(jnp.asarray(run_one(model, xs[e]), jnp.float32)))
    return np.stack(rows).reshape(indices.shape + rows[0].shape)


def assert_close(actual: Any, expected: Any, *, rtol: float, atol: float) -> None:
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def assert_adapters_matter(
    reference: Any, base_out: Any, indices: Any, *, atol: float, factor: float = 10
) -> None:
    """Rows that use an adapter differ visibly from the base model's output.

    Guards the comparison: if adapters changed the output by less than the
    tolerance, a batched forward that ignored them would pass.
    """
    indices = np.asarray(indices)
    reference = np.asarray(reference, np.float32)
    base_out = np.asarray(base_out, np.float32)
    diff = np.abs(reference - base_out).reshape(indices.shape + (-1,)).max(-1)
    assert np.all(diff[indices >= 0] > factor * atol), diff
    assert np.all(diff[indices < 0] <= atol), diff


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Every floating-point array leaf cast to `dtype`."""

    def cast(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def vmap_styles(call: Callable):
    """Both Equinox batching styles for `call(model, x)`, jit-compiled once:
    `quaxify` outside `jax.vmap` (`f(served, xs)`: the model holds `(B,)` indices)
    and inside it (`f(served, xs, idx)`: each example's scalar index travels with
    it)."""

    @eqx.filter_jit
    def quaxify_outside_vmap(model, xs):
        return lx.quaxify(jax.vmap(call, in_axes=(None, 0)))(model, xs)

    @eqx.filter_jit
    def quaxify_inside_vmap(model, xs, idx):
        def one(m, x, i):
            return lx.quaxify(call)(lx.with_indices(m, i), x)

        return jax.vmap(one, in_axes=(None, 0, 0))(model, xs, idx)

    return quaxify_outside_vmap, quaxify_inside_vmap


# --- a Gemma-style attention block (tests/test_fused_qkv.py, test_peft.py) -------


def softmax(z, xp):
    z = z - z.max(axis=-1, keepdims=True)
    e = xp.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def causal_attention(q, k, v, xp):
    """q `(B, T, N, H)`, k, v `(B, T, K, H)`: causal GQA attention, `(B, T, N, H)`."""
    rep = q.shape[2] // k.shape[2]
    k, v = xp.repeat(k, rep, axis=2), xp.repeat(v, rep, axis=2)
    logits = xp.einsum("BTNH,BSNH->BNTS", q, k) * q.shape[-1] ** -0.5
    causal = np.tril(np.ones((q.shape[1], q.shape[1]), bool))
    logits = xp.where(causal, logits, -1e30)
    return xp.einsum("BNTS,BSNH->BTNH", softmax(logits, xp), v)


def gemma_attention(p, x):
    """Gemma's attention projections, as its code writes them: `qkv_einsum` (MHA)
    or `q_einsum` + `kv_einsum` (GQA), then `attn_vec_einsum`."""
    if "qkv_einsum" in p:
        q, k, v = jnp.einsum("BTD,SNDH->SBTNH", x, p["qkv_einsum"]["w"])
    else:
        q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
        k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p["kv_einsum"]["w"])
    enc = causal_attention(q, k, v, jnp)
    return x + jnp.einsum("BTNH,NHD->BTD", enc, p["attn_vec_einsum"]["w"])


def gemma_stack(p, x):
    """Layers scanned over the leading axis of every weight."""
    return jax.lax.scan(lambda h, lp: (gemma_attention(lp, h), None), x, p)[0]
