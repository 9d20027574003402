"""`combine_adapters`: PEFT's `LoraModel.add_weighted_adapter` for `Adapter`s, from
the low-rank factors (the dense update of a leaf is never built)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from .adapter import Adapter
from .targeting import LeafLayout

METHODS = (
    "cat",
    "linear",
    "svd",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
)
# PEFT's methods that prune or elect signs entry by entry in the dense update.
_DENSE_METHODS = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_RANDOM = ("dare_linear", "dare_ties")
_SIGNED = ("ties", "dare_ties")
_SIGN_METHODS = ("total", "frequency")


def combine_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    method: str,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    majority_sign_method: str = "total",
) -> Adapter:
    """One adapter made from weighted adapters, as PEFT's
    `LoraModel.add_weighted_adapter` makes it.

    At each path, adapter `i` (weight `w_i`, scale `s_i`, factors `a_i: (*in, r_i)`,
    `b_i: (r_i, *out)`) stands for the update `w_i·s_i·a_i·b_i`. The methods, and
    their results (every one has scale 1: `alpha = rank`, no rsLoRA):

    - `"cat"`, rank `Σ r_i`: exactly `Σ w_i·s_i·a_i·b_i`, with
        `a = [w_1·s_1·a_1, …, w_n·s_n·a_n]` (along the rank) and `b = [b_1; …; b_n]`.
    - `"svd"`, rank `rank`: the best rank-`rank` approximation of
        `Σ w_i·s_i·a_i·b_i`.
    - `"linear"`, the adapters' common rank: `(Σ σ_i·c_i·a_i)(Σ c_i·b_i)` with
        `c_i = √abs(w_i·s_i)` and `σ_i` the sign of `w_i·s_i`. The cross terms make
        it a rough approximation of the weighted sum (PEFT says so too).
    - `"magnitude_prune"`: as `"linear"`, after each factor keeps its `density`
        largest entries by magnitude.
    - `"ties"`: TIES on the factors: each factor keeps its `density` largest
        entries, each entry's sign is elected over the adapters, and the weighted
        entries that agree with it are averaged.
    - `"dare_linear"`, `"dare_ties"`: as `"linear"` and `"ties"`, after DARE's
        pruning: each entry kept with probability `density`, then divided by it.

    The pruning methods work on the `A` side (weights `σ_i·c_i`) and the `B` side
    (weights `c_i`) separately, exactly as PEFT's; on a stacked leaf
    each stack entry is pruned on its own, as PEFT prunes each module.

    `"svd"` never builds an `in × out` matrix: with the QR decompositions
    `[a_1 … a_n] = Q_a R_a` and `[b_1; …; b_n]ᵀ = Q_b R_b`, the update is
    `Q_a (R_a D R_bᵀ) Q_bᵀ` (`D` the weights `w_i·s_i` along the ranks), so the SVD
    of the small `Σr × Σr` core gives its singular values and vectors. As PEFT
    splits them, `a` holds the singular vectors (orthonormal columns) and `b` the
    singular values times the others. A leaf whose update has rank below `rank`
    is padded with zeros.

    A path that an adapter does not adapt gets nothing from it. Where PEFT differs:

    - With one adapter PEFT ignores `combination_type` and runs `"linear"` (so
        `"svd"` with a smaller rank does not truncate); here the method asked for
        runs.
    - PEFT's combined adapter keeps `use_rslora` from the first adapter's config,
        which scales its update by `√rank` when that adapter is rsLoRA; here the
        scale is always 1, so the update is the one listed above.
    - PEFT's `svd_clamp` (off by default) is not offered: it clamps the singular
        vectors at a quantile of their signed entries, which depends on the
        arbitrary signs the SVD routine picks, so it is no function of the
        combined update. `svd_full_matrices` and `svd_driver` do not change the
        numbers.
    - PEFT's `ties_svd`, `dare_linear_svd`, `dare_ties_svd` and
        `magnitude_prune_svd` prune entries of the dense `in × out` update, which
        this function never builds: they are refused.
    - PEFT accepts DoRA adapters (reusing the first one's config, with a
        magnitude that no longer fits the factors); DoRA, IA3 and VeRA leaves are
        refused here.

    **Arguments:**

    - `adapters`: plain LoRA [`lorax_arrays.Adapter`][]s made for the same model
        (each path laid out alike where several adapt it).
    - `weights`: one finite real number per adapter; negative subtracts.
    - `method`: one of `"cat"`, `"linear"`, `"svd"`, `"ties"`, `"dare_linear"`,
        `"dare_ties"`, `"magnitude_prune"`.
    - `rank`: `"svd"` only: the rank of the result (at least 1); defaults, as in
        PEFT, to the largest rank of any adapter at any path.
    - `density`: the pruning methods only (required there): the fraction of
        entries kept, in `(0, 1]`.
    - `seed`: `"dare_linear"` and `"dare_ties"` only (required there): an int
        seeding NumPy's generator, so the same call gives the same adapter.
    - `majority_sign_method`: `"ties"` and `"dare_ties"` only: elect each entry's
        sign by the sum of the entries (`"total"`) or of their signs
        (`"frequency"`).

    **Returns:**

    An [`lorax_arrays.Adapter`][] with, at each path any adapter adapts,
    `a: (*stack, *in, rank)` and `b: (*stack, rank, *out)` in the adapters' dtype,
    `alpha = rank` and no rsLoRA (scale 1). It stacks, banks and saves like any
    other (`lx.stack_adapters`, `lx.AdapterBank.add`, `lx.save_adapter`,
    `lx.save_peft_adapter`).
    """
    adapters = list(adapters)
    weights = _check_weights(adapters, weights)
    _check_method(method, rank, density, seed, majority_sign_method)
    for i, ad in enumerate(adapters):
        ad.check_finite(f"combine_adapters: adapter {i}")
        if ad.bias_deltas:
            raise ValueError(
                f"combine_adapters: adapter {i} updates the biases "
                f"{sorted(ad.bias_deltas)} (modules trained in full, PEFT's "
                "`modules_to_save`): PEFT's add_weighted_adapter does not "
                "combine those either. Serve such adapters side by side in a "
                "stack instead."
            )
        for path in ad.paths:
            kind = ad.kind(path)
            if kind != "lora":
                raise ValueError(
                    f"combine_adapters: adapter {i} is {kind!r} at {path!r}; only "
                    "plain LoRA leaves combine (a DoRA magnitude, IA3 vector or "
                    "VeRA vector has no weighted sum of factors). Merge that "
                    "adapter into the weights with `lx.merge` instead, or combine "
                    "plain LoRA adapters."
                )
    layouts = _union_layouts(adapters)
    if method == "svd" and rank is None:
        rank = max((r for ad in adapters for r in ad.ranks), default=1)
    rng = np.random.default_rng(seed) if method in _RANDOM else None

    out_weights, out_layouts, out_ranks, lookup = {}, [], [], []
    for lay, flag in layouts:
        path = lay.path
        members = []
        for i, (ad, w) in enumerate(zip(adapters, weights)):
            if path not in ad.weights or ad.ranks[ad.paths.index(path)] == 0:
                continue
            members.append((i, w * ad.scale(path), *ad.weights[path]))
        if not members:
            continue
        dtype = jnp.result_type(*[x for m in members for x in m[2:]])
        n_in, n_out = math.prod(lay.in_shape), math.prod(lay.out_shape)
        n_stack = math.prod(lay.stack_shape)
        ws = [m[1] for m in members]
        a_s = [np.asarray(m[2], np.float64).reshape(n_stack, n_in, -1) for m in members]
        b_s = [
            np.asarray(m[3], np.float64).reshape(n_stack, -1, n_out) for m in members
        ]
        if method == "cat":
            a = np.concatenate([x * w for x, w in zip(a_s, ws)], axis=-1)
            b = np.concatenate(b_s, axis=-2)
        elif method == "svd":
            a, b = _svd(a_s, b_s, ws, rank)
        else:
            ranks = sorted({x.shape[-1] for x in a_s})
            if len(ranks) > 1:
                each = ", ".join(
                    f"adapter {m[0]}: {x.shape[-1]}" for m, x in zip(members, a_s)
                )
                raise ValueError(
                    f"combine_adapters: method {method!r} needs the adapters' ranks "
                    f"at {path!r} to be equal (as PEFT does), but they are {each}. "
                    "Use method='cat' (exact; the ranks add up) or method='svd' "
                    "(exact up to truncating to `rank`)."
                )
            # PEFT's split of each weight over the two sides: the sign on A's.
            a_w = [math.sqrt(abs(w)) * (1.0 if w >= 0 else -1.0) for w in ws]
            b_w = [math.sqrt(abs(w)) for w in ws]
            a = _merge(method, a_s, a_w, density, majority_sign_method, rng)
            b = _merge(method, b_s, b_w, density, majority_sign_method, rng)
        k = a.shape[-1]
        a = a.reshape(*lay.stack_shape, *lay.in_shape, k)
        b = b.reshape(*lay.stack_shape, k, *lay.out_shape)
        out_weights[path] = (jnp.asarray(a, dtype), jnp.asarray(b, dtype))
        out_layouts.append(lay)
        out_ranks.append(k)
        lookup.append(flag)
    calls = {ad.invocation_tokens for ad in adapters}
    if len(calls) > 1:
        raise ValueError(
            "combine_adapters: the adapters have different invocation_tokens "
            f"({sorted(calls, key=str)}): an activated LoRA (aLoRA) applies from "
            "its own invocation on, so the sum has no single start. Combine "
            "aLoRAs with the same invocation, or plain LoRAs."
        )
    return Adapter(
        weights=out_weights,
        layouts=tuple(out_layouts),
        ranks=tuple(out_ranks),
        alphas=tuple(float(k) for k in out_ranks),
        use_rslora=tuple(False for _ in out_ranks),
        lookup_only=tuple(f[0] for f in lookup),
        head_only=tuple(f[1] for f in lookup),
        invocation_tokens=calls.pop(),
    )


def _check_weights(adapters: list, weights) -> list[float]:
    if not adapters:
        raise ValueError("combine_adapters: need at least one adapter.")
    for i, ad in enumerate(adapters):
        if not isinstance(ad, Adapter):
            raise TypeError(
                f"combine_adapters: adapter {i} is a {type(ad).__name__}, not an "
                "lx.Adapter; pick one out of an AdapterStack with `stack[i]`."
            )
    try:
        weights = list(weights)
    except TypeError:
        raise TypeError(
            f"combine_adapters: weights is a {type(weights).__name__}; give a "
            "sequence of numbers, one per adapter."
        ) from None
    if len(weights) != len(adapters):
        raise ValueError(
            f"combine_adapters: {len(weights)} weights for {len(adapters)} "
            "adapters; give one weight per adapter, in the same order."
        )
    out = []
    for i, w in enumerate(weights):
        arr = np.asarray(w)
        if arr.ndim != 0 or arr.dtype.kind not in "iuf":
            raise TypeError(
                f"combine_adapters: weight {i} is {w!r}; weights are real numbers "
                "(a negative one subtracts its adapter)."
            )
        w = float(arr)
        if not math.isfinite(w):
            raise ValueError(
                f"combine_adapters: weight {i} is {w}; weights must be finite numbers."
            )
        out.append(w)
    return out


def _check_method(method, rank, density, seed, majority_sign_method) -> None:
    if method in _DENSE_METHODS:
        raise ValueError(
            f"combine_adapters: PEFT's {method!r} prunes entries of the dense "
            "in × out update of each leaf, which combine_adapters never builds. "
            f"Use {method.removesuffix('_svd')!r} (the same pruning on the "
            "factors, as PEFT's method of that name) or 'svd' (exact up to "
            "truncating to `rank`)."
        )
    if method not in METHODS:
        raise ValueError(
            f"combine_adapters: unknown method {method!r}; expected one of "
            f"{', '.join(repr(m) for m in METHODS)}."
        )
    if rank is not None:
        if method != "svd":
            raise ValueError(
                f"combine_adapters: `rank` is only for method='svd'; {method!r} "
                "decides the rank itself (the sum of the ranks for 'cat', the "
                "common rank otherwise). Drop `rank`, or use method='svd'."
            )
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(
                f"combine_adapters: rank={rank!r}; the rank of an 'svd' result is "
                "an int of at least 1 (or None: the largest rank of the adapters)."
            )
    if method in _PRUNING:
        if density is None:
            raise ValueError(
                f"combine_adapters: method {method!r} needs `density`, the "
                "fraction of entries each factor keeps, in (0, 1] (1 prunes "
                "nothing)."
            )
        if (
            isinstance(density, bool)
            or not isinstance(density, numbers.Real)
            or not 0.0 < float(density) <= 1.0
        ):
            raise ValueError(
                f"combine_adapters: density={density!r}; it is the fraction of "
                "entries each factor keeps, a number in (0, 1] (1 prunes "
                "nothing)."
            )
    elif density is not None:
        raise ValueError(
            f"combine_adapters: `density` is only for the pruning methods "
            f"{', '.join(repr(m) for m in _PRUNING)}; {method!r} prunes nothing. "
            "Drop `density`, or pick one of those."
        )
    if method in _RANDOM:
        if seed is None:
            raise ValueError(
                f"combine_adapters: method {method!r} drops entries at random; pass "
                "`seed=` (an int) so the combined adapter is reproducible: the "
                "same seed gives the same adapter."
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(
                f"combine_adapters: seed={seed!r}; the seed is a non-negative int."
            )
    elif seed is not None:
        raise ValueError(
            f"combine_adapters: `seed` is only for the random methods "
            f"{', '.join(repr(m) for m in _RANDOM)}; {method!r} is deterministic. "
            "Drop `seed`."
        )
    if majority_sign_method not in _SIGN_METHODS:
        raise ValueError(
            f"combine_adapters: majority_sign_method={majority_sign_method!r}; "
            "expected 'total' (elect each entry's sign by the sum of the entries) "
            "or 'frequency' (by the sum of their signs)."
        )
    if majority_sign_method != "total" and method not in _SIGNED:
        raise ValueError(
            f"combine_adapters: `majority_sign_method` is only for "
            f"{', '.join(repr(m) for m in _SIGNED)}; {method!r} elects no signs. "
            "Drop it."
        )


def _union_layouts(adapters: list[Adapter]) -> list[tuple[LeafLayout, bool]]:
    """Every path any adapter adapts, in order of first appearance, with its
    layout and `lookup_only` flag, which must agree between adapters."""
    seen: dict[str, tuple[int, LeafLayout, bool]] = {}
    for i, ad in enumerate(adapters):
        for lay, *flag in zip(ad.layouts, ad.lookup_only, ad.head_only):
            flag = tuple(flag)  # (lookup_only, head_only)
            if lay.path not in seen:
                seen[lay.path] = (i, lay, flag)
                continue
            j, prev, prev_flag = seen[lay.path]
            if not prev.compatible(lay):
                raise ValueError(
                    f"combine_adapters: adapter {i} lays out {lay.path!r} as shape "
                    f"{lay.shape}, in={lay.in_axes}, out={lay.out_axes}, "
                    f"stack={lay.stack_axes}, but adapter {j} has shape "
                    f"{prev.shape}, in={prev.in_axes}, out={prev.out_axes}, "
                    f"stack={prev.stack_axes}. Adapters combined must be made for "
                    "the same model with the same orientation: load them against "
                    "the same tree (with the same `orientation=` for PEFT "
                    "adapters) or make them with the same rules."
                )
            if prev_flag != flag:
                raise ValueError(
                    f"combine_adapters: at {lay.path!r} adapter {i} has "
                    f"(lookup_only, head_only)={flag} but adapter {j} has "
                    f"{prev_flag}: they apply to different reads of the leaf (all "
                    "of them, only lookups as PEFT's embedding LoRA, or only a "
                    "tied head as PEFT's lm_head LoRA on the table). Load both the "
                    "same way."
                )
    return [(lay, flag) for _, lay, flag in seen.values()]


def _svd(a_s, b_s, ws, rank):
    """The best rank-`rank` approximation of `Σ w_i·a_i·b_i` per stack entry, from
    the factors: `a (n, in, rank)` with orthonormal columns, `b (n, rank, out)`."""
    a_cat = np.concatenate(a_s, axis=-1)  # (n, in, R)
    b_cat = np.concatenate(b_s, axis=-2)  # (n, R, out)
    d = np.concatenate([np.full(x.shape[-1], w) for x, w in zip(a_s, ws)])
    n, n_in, _ = a_cat.shape
    n_out = b_cat.shape[-1]
    a = np.zeros((n, n_in, rank))
    b = np.zeros((n, rank, n_out))
    for e in range(n):
        qa, ra = np.linalg.qr(a_cat[e])  # (in, m), (m, R)
        qb, rb = np.linalg.qr(b_cat[e].T)  # (out, m'), (m', R)
        u, sv, vt = np.linalg.svd((ra * d) @ rb.T)
        k = min(rank, sv.shape[0])
        a[e, :, :k] = qa @ u[:, :k]
        b[e, :k] = sv[:k, None] * (vt[:k] @ qb.T)
    return a, b


def _merge(method, tensors, weights, density, sign_method, rng):
    """PEFT's `merge_utils` on one side's factors `(n_stack, ...)`, each adapter's
    tensor pruned per stack entry."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method in _RANDOM:
        tensors = [_random_prune(t, density, rng) for t in tensors]
    t = np.stack(tensors)  # (n_adapters, n_stack, ...)
    w = np.asarray(weights).reshape(-1, *([1] * (t.ndim - 1)))
    if method in _SIGNED:
        # PEFT elects the sign from the pruned tensors before weighting them.
        sign = np.sign(t)
        total = t.sum(0) if sign_method == "total" else sign.sum(0)
        keep = sign == np.where(total >= 0, 1.0, -1.0)
        return (t * w * keep).sum(0) / np.maximum(keep.sum(0), 1)
    return (t * w).sum(0)


def _magnitude_prune(t, density):
    """Keeps the `int(density * size)` largest entries by magnitude of each stack
    entry (PEFT's `magnitude_based_pruning` per module)."""
    if density >= 1:
        return t
    flat = t.reshape(t.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = np.zeros(flat.shape, bool)
    if k > 0:
        top = np.argsort(-np.abs(flat), axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, top, True, axis=1)
    return (flat * mask).reshape(t.shape)


def _random_prune(t, density, rng):
    """DARE: keeps each entry with probability `density`, divided by `density`."""
    if density >= 1:
        return t
    return t * (rng.random(t.shape) < density) / density
