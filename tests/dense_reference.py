"""Per-example dense references for whole functions (control flow, embeddings).

An `Adapted` weight holds random non-zero float32 NumPy `w, a, b, scale` and a
layout. The references never call into `lorax_arrays`: every example's merged weight
`W_e = w + scale[i] * delta_i` is built in plain JAX from `a` and `b`
(`Adapted.dense_jax`, checked against the float64 NumPy `Adapted.dense_np`, i.e.
`tests.helpers.dense_weight_per_example`, by the test modules), and the *plain*
function runs on each example alone (`jax.vmap` over examples, the function seeing
a batch of one). `jax.vjp` of that gives the reference gradients w.r.t. the factors.
"""

from __future__ import annotations

import dataclasses
import functools as ft
import string
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lorax_arrays as lx
from tests.helpers import dense_weight_per_example, nonzero
from tests.model_helpers import assert_adapters_matter, assert_close

# float32 throughout, outputs O(1): the batched low-rank form and the merged dense
# weight round differently (~1e-6); 1e-4 leaves room for a few layers of that.
TOL = dict(rtol=1e-4, atol=1e-4)


@dataclasses.dataclass(frozen=True, eq=False)
class Adapted:
    """A base weight with `n_adapters` random non-zero LoRA adapters."""

    w: np.ndarray
    a: np.ndarray
    b: np.ndarray
    scale: np.ndarray
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()
    allow_materialise: bool = False

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        w_shape: tuple[int, ...],
        in_axes: tuple[int, ...],
        out_axes: tuple[int, ...],
        stack_axes: tuple[int, ...] = (),
        *,
        n_adapters: int = 3,
        rank: int = 2,
    ) -> Adapted:
        """`w`, `a`, `b` with entries of magnitude in [0.5, 1.5] / sqrt(fan-in): the
        low-rank term is of the same order as `w` (never zero)."""
        fan_in = int(np.prod([w_shape[ax] for ax in in_axes]))
        stack = tuple(w_shape[ax] for ax in stack_axes)
        ins = tuple(w_shape[ax] for ax in in_axes)
        outs = tuple(w_shape[ax] for ax in out_axes)
        w = nonzero(rng, w_shape) / np.float32(np.sqrt(fan_in))
        a = nonzero(rng, (*stack, n_adapters, *ins, rank)) / np.float32(np.sqrt(fan_in))
        b = nonzero(rng, (*stack, n_adapters, rank, *outs)) / np.float32(np.sqrt(rank))
        scale = nonzero(rng, (n_adapters,), 0.5, 2.0)
        return cls(w, a, b, scale, in_axes, out_axes, stack_axes)

    @property
    def n_adapters(self) -> int:
        return self.a.shape[len(self.stack_axes)]

    def lora(self, indices: Any, a: Any = None, b: Any = None, **kw: Any):
        """The `BatchedLoraArray` (with factors `a`, `b` if given, e.g. tracers)."""
        return lx.BatchedLoraArray(
            jnp.asarray(self.w),
            self.a if a is None else a,
            self.b if b is None else b,
            scale=self.scale,
            indices=indices,
            in_axes=self.in_axes,
            out_axes=self.out_axes,
            stack_axes=self.stack_axes,
            allow_materialise=self.allow_materialise,
            **kw,
        )

    def dense_np(self, indices: Any) -> jax.Array:
        """`(*indices.shape, *w.shape)`: each example's merged weight, built in
        float64 NumPy and cast to float32."""
        w_e = dense_weight_per_example(
            self.w,
            self.a,
            self.b,
            self.scale,
            np.asarray(indices),
            self.in_axes,
            self.out_axes,
            self.stack_axes,
        )
        return jnp.asarray(w_e.astype(np.float32))

    def dense_jax(self, indices: Any, a: Any, b: Any) -> jax.Array:
        """Like `dense_np`, in plain (differentiable) JAX from the factors `a`, `b`."""
        nd = self.w.ndim
        letter = {ax: string.ascii_lowercase[ax] for ax in range(nd)}
        stack = "".join(letter[ax % nd] for ax in self.stack_axes)
        ins = "".join(letter[ax % nd] for ax in self.in_axes)
        outs = "".join(letter[ax % nd] for ax in self.out_axes)
        spec = f"{stack}N{ins}R,{stack}NR{outs}->N{string.ascii_lowercase[:nd]}"
        delta = jnp.einsum(spec, a, b)  # (n_adapters, *w.shape)
        idx = jnp.asarray(indices)
        safe = jnp.clip(idx, 0, self.n_adapters - 1)
        s = jnp.where(idx >= 0, jnp.asarray(self.scale)[safe], 0.0)
        s = s.reshape(s.shape + (1,) * nd)
        return jnp.asarray(self.w) + s * delta[safe]


def per_example(f: Callable, n_axes: int = 1) -> Callable:
    """`f(params, x, *rest)` run on each example alone (a batch of one) with that
    example's own params. `params` leaves and `x` carry `n_axes` leading example
    axes (`(B,)` per example, `(B, T)` per token); `rest` is shared."""

    def run(params, x, *rest):
        def one(p, xe):
            out = f(p, xe.reshape((1,) * n_axes + xe.shape), *rest)
            return out.reshape(out.shape[n_axes:])

        for _ in range(n_axes):
            one = jax.vmap(one)
        return one(params, x)

    return run


def vmap_outside(f: Callable) -> Callable:
    """The Equinox way round: `jax.vmap` outside, each example's (or token's) scalar
    index set with `lx.with_indices` before `lx.quaxify(f)`, which sees a batch of
    one. The indices are taken from the adapted leaves of `params`."""

    def run(params, x, *rest):
        is_lora = lambda v: isinstance(v, lx.BatchedLoraArray)  # noqa: E731
        loras = [v for v in jax.tree.leaves(params, is_leaf=is_lora) if is_lora(v)]
        n_axes = loras[0].indices.ndim

        def one(xe, i):
            p_e = lx.with_indices(params, i)
            out = lx.quaxify(f)(p_e, xe.reshape((1,) * n_axes + xe.shape), *rest)
            return out.reshape(out.shape[n_axes:])

        for _ in range(n_axes):
            one = jax.vmap(one)
        return one(x, loras[0].indices)

    return run


def random_like(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """A fixed random cotangent (so a loss weights every output differently)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), "float32")


def assert_grads_close(grads: Any, ref: Any, rtol: float = 1e-4) -> None:
    """Leafwise `|g - g_ref| <= rtol * max|g_ref|`, and every reference is non-zero."""
    for path, g_ref in jax.tree_util.tree_leaves_with_path(ref):
        g = _at(grads, path)
        scale = float(np.max(np.abs(g_ref)))
        assert scale > 1e-3, f"reference gradient at {path} is ~0: test too weak"
        np.testing.assert_allclose(
            np.asarray(g),
            np.asarray(g_ref),
            rtol=rtol,
            atol=rtol * scale,
            err_msg=f"gradient at {jax.tree_util.keystr(path)}",
        )


def _at(tree: Any, path: Any) -> Any:
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", None))]
    return tree


def _factors(weights: dict[str, Adapted]) -> dict:
    return {k: (jnp.asarray(wt.a), jnp.asarray(wt.b)) for k, wt in weights.items()}


class Checker:
    """Compares `transform(f)(adapted params, x, *rest)` (default
    `lx.quaxify(f)`) with the per-example dense reference, forward and gradients
    w.r.t. every weight's `a` and `b` (of `sum(out * fixed random cotangent)`).

    Each side is compiled once, as one `jit` of the output and its `vjp`, so calls
    with new `rest` values (a cond's predicate, a switch's index) or new indices of
    the same shape reuse the compiled code.
    """

    def __init__(
        self,
        f: Callable,
        weights: dict[str, Adapted],
        *,
        transform: Callable[[Callable], Callable] = lx.quaxify,
        tol: dict = TOL,
        forward_mode: bool = False,
    ):
        self.f, self.weights, self.transform, self.tol = f, weights, transform, tol
        self.forward_mode = forward_mode
        self._lora = jax.jit(ft.partial(self._value_and_grads, True))
        self._dense = jax.jit(ft.partial(self._value_and_grads, False))

    def _value_and_grads(self, lora: bool, fac, idx, x, ct, *rest):
        n_axes = idx.ndim
        if lora:
            fq = self.transform(self.f)

            def fn(fa):
                lp = {k: wt.lora(idx, *fa[k]) for k, wt in self.weights.items()}
                return fq(lp, x, *rest)
        else:

            def fn(fa):
                dense = {k: wt.dense_jax(idx, *fa[k]) for k, wt in self.weights.items()}
                return per_example(self.f, n_axes)(dense, x, *rest)

        if self.forward_mode:  # e.g. while_loop: no reverse-mode derivative in JAX
            loss = lambda fa: jnp.sum(fn(fa) * ct)  # noqa: E731
            return fn(fac), jax.jacfwd(loss)(fac)
        out, vjp = jax.vjp(fn, fac)
        (grads,) = vjp(ct)
        return out, grads

    def reference(self, x: Any, indices: Any, *rest: Any):
        """`(out, grads)` of the plain per-example function."""
        idx = jnp.asarray(np.asarray(indices, np.int32))
        shape = jax.eval_shape(
            per_example(self.f, idx.ndim),
            {k: wt.dense_np(indices) for k, wt in self.weights.items()},
            x,
            *rest,
        ).shape
        ct = random_like(0, shape)
        return self._dense(_factors(self.weights), idx, x, ct, *rest), ct

    def __call__(self, x: Any, indices: Any, *rest: Any) -> jax.Array:
        idx_np = np.asarray(indices, np.int32)
        idx = jnp.asarray(idx_np)
        (ref, g_ref), ct = self.reference(x, idx_np, *rest)
        (base, _), _ = self.reference(x, -np.ones_like(idx_np), *rest)
        assert_adapters_matter(ref, base, idx_np, atol=self.tol["atol"])
        out, g = self._lora(_factors(self.weights), idx, x, ct, *rest)
        assert_close(out, ref, **self.tol)
        assert_grads_close(g, g_ref)
        return out


def check_against_reference(
    f: Callable, weights: dict[str, Adapted], x: Any, indices: Any, *rest: Any, **kw
) -> jax.Array:
    """One-off `Checker(f, weights, **kw)(x, indices, *rest)`."""
    return Checker(f, weights, **kw)(x, indices, *rest)
