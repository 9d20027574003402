"""Shared test helpers: random factors and an independent float64 NumPy reference.

The reference never calls into `lorax_arrays`: it builds, for every example `e`
with adapter `i = indices[e]`, the dense weight

    W_e = w + scale[i] * delta_i,
    delta_i[w axes] = sum_r a[.., i, in.., r] * b[.., i, r, out..]

(`W_e = w` where `i == -1`) with `np.einsum` in float64, and contracts activations
with it by `np.einsum` as well.

Tolerances are *relative to magnitude*: a float32 result may differ from the exact
value by about `eps * sum |x| |W|` per output element, so every comparison is
against an elementwise bound `rtol * mag` where `mag` is the same contraction of
`|x|` with `|w| + |scale| * sum_r |a| |b|` (see `abs_weight=True`).
"""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import lorax_arrays as lx

# float32 computation vs float64 reference, relative to the magnitude bound.
RTOL_F32 = 1e-4
# bfloat16 (8-bit mantissa, eps = 2**-8): w, a, b, the rank-r intermediate and the
# output are each rounded once: the worst seen over 200 random cases is ~0.9% of
# the magnitude bound, so allow 2%.
RTOL_BF16 = 2e-2

_LETTERS = string.ascii_letters


def nonzero(rng: np.random.Generator, shape, lo: float = 0.5, hi: float = 1.5):
    """float32 values with |v| in [lo, hi] and random sign: never zero."""
    mag = rng.uniform(lo, hi, size=shape)
    sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
    return (mag * sign).astype(np.float32)


def factor_shapes_ref(w_shape, in_axes, out_axes, stack_axes, n_adapters, rank):
    """`a: (*stack, n, *in, rank)`, `b: (*stack, n, rank, *out)` (orders as given)."""
    nd = len(w_shape)
    stack = tuple(w_shape[ax % nd] for ax in stack_axes)
    ins = tuple(w_shape[ax % nd] for ax in in_axes)
    outs = tuple(w_shape[ax % nd] for ax in out_axes)
    return (*stack, n_adapters, *ins, rank), (*stack, n_adapters, rank, *outs)


def random_lora(
    rng: np.random.Generator,
    w_shape,
    in_axes,
    out_axes,
    stack_axes=(),
    *,
    n_adapters: int,
    rank: int,
):
    """Random non-zero float32 `w, a, b, scale` (NumPy) for the given layout.

    `a` and `b` are sized so the low-rank term is of the same order as `w` (an
    all-zero or negligible B would hide bugs in the rewrite).
    """
    a_shape, b_shape = factor_shapes_ref(
        w_shape, in_axes, out_axes, stack_axes, n_adapters, rank
    )
    w = nonzero(rng, w_shape)
    a = nonzero(rng, a_shape)
    b = nonzero(rng, b_shape)
    scale = nonzero(rng, (n_adapters,), 0.5, 2.0)
    return w, a, b, scale


def make_lora(
    w_shape=(4, 3),
    in_axes=(0,),
    out_axes=(1,),
    stack_axes=(),
    n=3,
    rank=2,
    indices=None,
    seed=0,
    **kw,
):
    """A `BatchedLoraArray` with random non-zero factors (`random_lora`), and its
    NumPy parts `(w, a, b, scale)` for the reference."""
    rng = np.random.default_rng(seed)
    w, a, b, scale = random_lora(
        rng, w_shape, in_axes, out_axes, stack_axes, n_adapters=n, rank=rank
    )
    lora = lx.BatchedLoraArray(
        jnp.asarray(w),
        a,
        b,
        scale=scale,
        indices=indices,
        in_axes=in_axes,
        out_axes=out_axes,
        stack_axes=stack_axes,
        **kw,
    )
    return lora, (w, a, b, scale)


def random_indices(rng: np.random.Generator, shape, n_adapters: int):
    """int32 adapter indices in [-1, n_adapters)."""
    return rng.integers(-1, n_adapters, size=shape).astype(np.int32)


def dense_weight_per_example(
    w,
    a,
    b,
    scale,
    indices,
    in_axes,
    out_axes,
    stack_axes=(),
    *,
    abs_weight: bool = False,
):
    """float64 `W_e = w + scale[i] * delta_i` per example: `(*indices.shape, *w.shape)`.

    With `abs_weight=True`, returns `|w| + |scale[i]| * sum_r |a| |b|` instead: the
    magnitude against which rounding errors are measured.
    """
    w = np.asarray(w, np.float64)
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = np.asarray(scale, np.float64)
    indices = np.asarray(indices)
    if abs_weight:
        w, a, b, scale = np.abs(w), np.abs(a), np.abs(b), np.abs(scale)
    nd = w.ndim
    in_axes = [ax % nd for ax in in_axes]
    out_axes = [ax % nd for ax in out_axes]
    stack_axes = [ax % nd for ax in stack_axes]
    assert sorted(in_axes + out_axes + stack_axes) == list(range(nd))
    letter = {ax: _LETTERS[ax] for ax in range(nd)}
    n_, r_ = "Y", "Z"
    sa = "".join(letter[ax] for ax in stack_axes)
    sub_a = sa + n_ + "".join(letter[ax] for ax in in_axes) + r_
    sub_b = sa + n_ + r_ + "".join(letter[ax] for ax in out_axes)
    sub_out = n_ + "".join(letter[ax] for ax in range(nd))
    # delta[i] for every adapter i, laid out on w's axes.
    delta = np.einsum(f"{sub_a},{sub_b}->{sub_out}", a, b)
    out = np.empty(indices.shape + w.shape, np.float64)
    for e in np.ndindex(*indices.shape):
        i = int(indices[e])
        out[e] = w if i == -1 else w + scale[i] * delta[i]
    return out


def reference_dot_general(
    x, w_e, dimension_numbers, lora_is_lhs: bool, k: int, start: int = 0
):
    """float64 `dot_general(x, W)` (or `(W, x)`) with one weight per example.

    `w_e`: `(*I, *w.shape)` with `len(I) == k`; the `k` free axes of `x` from free
    axis `start` on (the leading ones by default) are the example axes that pick
    the weight. The output follows `lax.dot_general`'s layout: `(*batch, *lhs
    free, *rhs free)`.
    """
    x = np.asarray(x, np.float64)
    w_e = np.asarray(w_e, np.float64)
    (lc, rc), (lb, rb) = dimension_numbers
    wnd = w_e.ndim - k
    if lora_is_lhs:
        wc, xc, wb, xb = lc, rc, lb, rb
    else:
        wc, xc, wb, xb = rc, lc, rb, lb
    letters = iter(_LETTERS)
    x_sub = [next(letters) for _ in range(x.ndim)]
    w_sub = [None] * wnd
    for dw, dx in zip(wc, xc):
        w_sub[dw] = x_sub[dx]
    for dw, dx in zip(wb, xb):
        w_sub[dw] = x_sub[dx]
    for d in range(wnd):
        if w_sub[d] is None:
            w_sub[d] = next(letters)
    x_free = [d for d in range(x.ndim) if d not in xc and d not in xb]
    w_free = [d for d in range(wnd) if d not in wc and d not in wb]
    ex_sub = [x_sub[d] for d in x_free[start : start + k]]
    batch = [x_sub[d] for d in xb]
    xf = [x_sub[d] for d in x_free]
    wf = [w_sub[d] for d in w_free]
    out = batch + (wf + xf if lora_is_lhs else xf + wf)
    spec = f"{''.join(x_sub)},{''.join(ex_sub + w_sub)}->{''.join(out)}"
    return np.einsum(spec, x, w_e)


# A base row (`-1`) or a zero adapter adds an exact zero to the base model's own
# operations, so op by op (no `jit`) its output is the plain model's bit for bit.
# Compiled, the adapted and the plain model are two XLA programs, which XLA may
# fuse and order differently (jax 0.12 on CPU: a few float32 ulps, as between the
# plain model run eagerly and jitted): compiled rows are compared within
# BASE_ROW_ULPS ulps of each row's largest magnitude (docs/design.md, "Base rows").
BASE_ROW_ULPS = 16


def assert_base_rows(actual, base):
    """Compiled rows that must be the base model's: equal up to `BASE_ROW_ULPS`
    float32 ulps of each row's magnitude."""
    actual = np.asarray(actual, np.float64)
    base = np.asarray(base, np.float64)
    assert actual.shape == base.shape, (actual.shape, base.shape)
    assert np.all(np.isfinite(actual)), "non-finite values in a base row"
    rows = base.reshape(base.shape[0], -1)
    mag = np.abs(rows).max(axis=1).reshape((-1,) + (1,) * (base.ndim - 1))
    tol = BASE_ROW_ULPS * np.finfo(np.float32).eps * mag
    err = np.abs(actual - base)
    assert np.all(err <= tol), (
        f"base rows differ by up to {err.max():.3g} (> {BASE_ROW_ULPS} ulps of "
        "their magnitude)"
    )


def assert_close_to_reference(actual, expected, magnitude, rtol: float = RTOL_F32):
    """Elementwise `|actual - expected| <= rtol * magnitude` (+ a float32 floor)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    magnitude = np.asarray(magnitude, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), "non-finite values in the result"
    tol = rtol * magnitude + 1e-30
    err = np.abs(actual - expected)
    bad = err > tol
    if np.any(bad):
        worst = np.unravel_index(np.argmax(err / tol), err.shape)
        raise AssertionError(
            f"{int(bad.sum())}/{bad.size} elements differ beyond rtol={rtol} of the "
            f"magnitude bound; worst at {worst}: actual={actual[worst]!r}, "
            f"expected={expected[worst]!r}, |err|={err[worst]:.3g}, "
            f"tol={tol[worst]:.3g}"
        )


def check_dot(
    x,
    w,
    a,
    b,
    scale,
    indices,
    in_axes,
    out_axes,
    stack_axes,
    dn,
    lora_is_lhs,
    actual,
    rtol=RTOL_F32,
    x_for_ref=None,
    start=0,
):
    """Compare `actual` with the reference `dot_general` for this layout (the
    example axes from free axis `start` of x on)."""
    indices = np.asarray(indices)
    k = indices.ndim
    xr = x if x_for_ref is None else x_for_ref
    w_e = dense_weight_per_example(
        w, a, b, scale, indices, in_axes, out_axes, stack_axes
    )
    w_abs = dense_weight_per_example(
        w, a, b, scale, indices, in_axes, out_axes, stack_axes, abs_weight=True
    )
    expected = reference_dot_general(xr, w_e, dn, lora_is_lhs, k, start)
    mag = reference_dot_general(
        np.abs(np.asarray(xr, np.float64)), w_abs, dn, lora_is_lhs, k, start
    )
    assert_close_to_reference(actual, expected, mag, rtol)


def walk_eqns(jaxpr):
    """Every equation of a (closed) jaxpr, recursing into sub-jaxprs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jex_core.jaxprs_in_params(eqn.params):
            yield from walk_eqns(sub)


def largest_intermediate(closed_jaxpr) -> int:
    """The element count of the largest value any equation produces."""
    sizes = [0]
    for eqn in walk_eqns(closed_jaxpr):
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            sizes.append(int(np.prod(shape, dtype=np.int64)))
    return max(sizes)


def draw_roles(draw, ndim: int) -> list[str]:
    """Inside an `st.composite`: a role ("in", "out" or "stack") for every axis of
    an `ndim`-D weight, with at least one in- and one out-axis, in random order."""
    extra = draw(
        st.lists(
            st.sampled_from(["in", "out", "stack"]),
            min_size=ndim - 2,
            max_size=ndim - 2,
        )
    )
    return draw(st.permutations(["in", "out", *extra]))


def draw_axes(draw, roles: list[str]) -> tuple[tuple[int, ...], ...]:
    """Inside an `st.composite`: the `(in_axes, out_axes, stack_axes)` of axes with
    these roles, each group in random order and each axis randomly spelled negative."""
    ndim = len(roles)

    def axes_of(role):
        axes = draw(st.permutations([ax for ax in range(ndim) if roles[ax] == role]))
        negate = draw(st.lists(st.booleans(), min_size=len(axes), max_size=len(axes)))
        return tuple(ax - ndim if neg else ax for ax, neg in zip(axes, negate))

    return axes_of("in"), axes_of("out"), axes_of("stack")


# --- dot_general cases, shared by the property tests of every rewrite -----------


@dataclasses.dataclass(frozen=True)
class DotCase:
    """One drawn `dot_general` case (see `dot_cases`): shapes, layout and seed."""

    w_shape: tuple[int, ...]
    in_axes: tuple[int, ...]  # as passed to the constructor (may be negative)
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...]
    n_adapters: int
    rank: int
    idx_shape: tuple[int, ...]
    x_shape: tuple[int, ...]
    dimension_numbers: tuple
    lora_is_lhs: bool
    seed: int
    vmap_axis: int | None = None  # where the example axis sits, under jax.vmap

    def arrays(self):
        rng = np.random.default_rng(self.seed)
        w, a, b, scale = random_lora(
            rng,
            self.w_shape,
            self.in_axes,
            self.out_axes,
            self.stack_axes,
            n_adapters=self.n_adapters,
            rank=self.rank,
        )
        if self.vmap_axis is None:
            idx = random_indices(rng, self.idx_shape, self.n_adapters)
            x = rng.standard_normal(self.x_shape).astype(np.float32)
        else:
            (n_ex,) = self.idx_shape
            idx = random_indices(rng, (n_ex,), self.n_adapters)
            shape = list(self.x_shape)
            shape.insert(self.vmap_axis, n_ex)
            x = rng.standard_normal(shape).astype(np.float32)
        return w, a, b, scale, idx, x

    def check(self, x, w, a, b, scale, idx, out):
        """`out` against the reference `dot_general` for this case's layout."""
        check_dot(
            x,
            w,
            a,
            b,
            scale,
            idx,
            self.in_axes,
            self.out_axes,
            self.stack_axes,
            self.dimension_numbers,
            self.lora_is_lhs,
            out,
        )

    def lora(self, w, a, b, scale, idx, **kw):
        return lx.BatchedLoraArray(
            jnp.asarray(w),
            a,
            b,
            scale=scale,
            indices=idx,
            in_axes=self.in_axes,
            out_axes=self.out_axes,
            stack_axes=self.stack_axes,
            **kw,
        )


@st.composite
def dot_cases(draw, idx_ndims=(0, 1, 2), vmapped=False):
    """A random `dot_general` of a `BatchedLoraArray` with an activation: any
    roles of the weight's axes, indices of `idx_ndims` dimensions, the activation's
    axes in any order, the LoRA on either side (`vmapped`: one index per example
    under `jax.vmap`, the example axis at `vmap_axis`)."""
    ndim = draw(st.integers(2, 4))
    roles = draw_roles(draw, ndim)
    w_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    in_axes, out_axes, stack_axes = draw_axes(draw, roles)
    n_adapters = draw(st.integers(1, 5))
    rank = draw(st.integers(1, 6))
    k = draw(st.sampled_from(idx_ndims))
    idx_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=k, max_size=k)))
    extra = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))

    # The activation's axes, in a random order: one per contracted in-axis, one per
    # stack (batch) axis, and the free axes (indexed ones first, then extras).
    tokens = [("c", ax % ndim) for ax in in_axes]
    tokens += [("b", ax % ndim) for ax in stack_axes]
    tokens += [("f", None)] * (k + len(extra))
    tokens = draw(st.permutations(tokens))
    free_sizes = iter(idx_shape + tuple(extra))
    x_shape, x_pos = [], {}
    for pos, (kind, w_ax) in enumerate(tokens):
        if kind == "f":
            x_shape.append(next(free_sizes))
        else:
            x_shape.append(w_shape[w_ax])
            x_pos[w_ax] = pos
    c_w = draw(st.permutations([ax % ndim for ax in in_axes]))
    b_w = draw(st.permutations([ax % ndim for ax in stack_axes]))
    c_x = tuple(x_pos[ax] for ax in c_w)
    b_x = tuple(x_pos[ax] for ax in b_w)
    lora_is_lhs = draw(st.booleans())
    if lora_is_lhs:
        dn = ((tuple(c_w), c_x), (tuple(b_w), b_x))
    else:
        dn = ((c_x, tuple(c_w)), (b_x, tuple(b_w)))
    vmap_axis = None
    if vmapped:
        idx_shape = (draw(st.integers(1, 4)),)
        vmap_axis = draw(st.integers(0, len(x_shape)))
    return DotCase(
        w_shape=w_shape,
        in_axes=in_axes,
        out_axes=out_axes,
        stack_axes=stack_axes,
        n_adapters=n_adapters,
        rank=rank,
        idx_shape=idx_shape,
        x_shape=tuple(x_shape),
        dimension_numbers=dn,
        lora_is_lhs=lora_is_lhs,
        seed=draw(st.integers(0, 2**31 - 1)),
        vmap_axis=vmap_axis,
    )


def dot_fn(case: DotCase):
    """`dot_general(W, x)` or `dot_general(x, W)` with the case's dimension numbers."""
    dn = case.dimension_numbers
    if case.lora_is_lhs:
        return lambda W, x: jax.lax.dot_general(W, x, dn)
    return lambda W, x: jax.lax.dot_general(x, W, dn)


# Every way the low-rank term is computed: a strategy, or segment with its kernel.
STRATEGY_VARIANTS = ["gather", "dense", "segment:tiled", "segment:ragged"]


def reference_with_nan_rows(case: DotCase, x, w, a, b, scale, idx, bad):
    """The reference output, NaN wherever a bad example contributes."""
    good_idx = np.where(bad, -1, idx)
    args = (case.in_axes, case.out_axes, case.stack_axes)
    w_e = dense_weight_per_example(w, a, b, scale, good_idx, *args)
    w_e[bad] = np.nan
    w_abs = dense_weight_per_example(w, a, b, scale, good_idx, *args, abs_weight=True)
    dn, lhs, k = case.dimension_numbers, case.lora_is_lhs, idx.ndim
    expected = reference_dot_general(x, w_e, dn, lhs, k)
    mag = reference_dot_general(np.abs(np.asarray(x, np.float64)), w_abs, dn, lhs, k)
    return expected, mag
