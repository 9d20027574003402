"""`lx.combine_adapters`: PEFT's `add_weighted_adapter` on `Adapter`s.

Against PEFT itself through the golden fixtures of
`tests/fixtures/make_combine_fixtures.py` (no torch here), against plain float64
NumPy definitions (which may build the dense update; the library may not), and
served in a mixed batch with the adapters it was made from.
"""

from __future__ import annotations

import json
import pathlib
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import lorax_arrays as lx
from tests.helpers import nonzero

FIXTURE = np.load(pathlib.Path(__file__).parent / "fixtures/combine/combine.npz")
COMBINED = json.loads(str(FIXTURE["names"]))
MODULES = [m.split(":") for m in FIXTURE["modules"]]
WEIGHTS = [float(w) for w in FIXTURE["weights"]]


# --- helpers -----------------------------------------------------------------


def leaf(path, ins, outs, stack=()):
    """A `LeafLayout` with the axes in the order stack, in, out."""
    ns, ni = len(stack), len(ins)
    return lx.LeafLayout(
        path,
        (*stack, *ins, *outs),
        tuple(range(ns, ns + ni)),
        tuple(range(ns + ni, ns + ni + len(outs))),
        tuple(range(ns)),
    )


def fixture_adapter(group: str, i: int) -> lx.Adapter:
    """Input adapter `i` of a fixture group; torch's `A (r, in)`, `B (out, r)` are
    `a = A.T`, `b = B.T` here (for the Embedding too)."""
    weights, layouts, ranks, alphas, rslora = {}, [], [], [], []
    for name, n_in, n_out, _ in MODULES:
        key = f"in/{group}/{i}/{name}"
        if f"{key}/A" not in FIXTURE:
            continue
        path = f"{name}/kernel"
        weights[path] = (
            jnp.asarray(FIXTURE[f"{key}/A"].T),
            jnp.asarray(FIXTURE[f"{key}/B"].T),
        )
        layouts.append(leaf(path, (int(n_in),), (int(n_out),)))
        ranks.append(int(FIXTURE[f"{key}/r"]))
        alphas.append(float(FIXTURE[f"{key}/alpha"]))
        rslora.append(bool(FIXTURE[f"{key}/rslora"]))
    return lx.Adapter(
        weights, tuple(layouts), tuple(ranks), tuple(alphas), tuple(rslora)
    )


def fixture_call(entry):
    """PEFT's `add_weighted_adapter` keywords as `combine_adapters` ones."""
    kw = {k: v for k, v in entry.items() if k not in ("name", "group")}
    method = kw.pop("combination_type")
    if "svd_rank" in kw:
        kw["rank"] = kw.pop("svd_rank")
    return method, kw


def factors(ad: lx.Adapter, path: str):
    """`a (S, in, r)`, `b (S, r, out)` in float64, stack and feature axes flat."""
    lay = ad.layouts[ad.paths.index(path)]
    a, b = (np.asarray(x, np.float64) for x in ad.weights[path])
    n_stack = int(np.prod(lay.stack_shape))
    rank = a.shape[-1]
    return a.reshape(n_stack, -1, rank), b.reshape(n_stack, rank, -1)


def delta(ad: lx.Adapter, path: str) -> np.ndarray:
    """`s·a·b` per stack entry, `(S, in, out)`, in float64."""
    a, b = factors(ad, path)
    return ad.scale(path) * (a @ b)


def weighted_sum(adapters, weights, path):
    """`Σ w_i·s_i·a_i·b_i` densely, and the matching magnitude bound."""
    total = mag = 0.0
    for ad, w in zip(adapters, weights):
        if path in ad.paths:
            a, b = factors(ad, path)
            c = w * ad.scale(path)
            total = total + c * (a @ b)
            mag = mag + abs(c) * (np.abs(a) @ np.abs(b))
    return total, mag


def assert_close(got, want, scale=None, rtol=1e-5):
    scale = np.max(np.abs(want)) if scale is None else np.max(scale)
    err = np.max(np.abs(np.asarray(got) - np.asarray(want)))
    assert err <= rtol * scale, f"max error {err:.3e} vs scale {scale:.3e}"


def best_rank_k(m: np.ndarray, k: int):
    """The rank-`k` truncated SVD of each `(in, out)` matrix of `m`, and its
    singular values."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[..., :k] * s[..., None, :k]) @ vt[..., :k, :], s


# --- against PEFT ----------------------------------------------------------------


@pytest.mark.parametrize("entry", COMBINED, ids=[e["name"] for e in COMBINED])
def test_matches_peft_add_weighted_adapter(entry):
    adapters = [fixture_adapter(entry["group"], i) for i in range(3)]
    method, kw = fixture_call(entry)
    out = lx.combine_adapters(adapters, WEIGHTS, method=method, **kw)
    assert out.paths == tuple(f"{m[0]}/kernel" for m in MODULES)
    for name, *_ in MODULES:
        path, key = f"{name}/kernel", f"out/{entry['name']}/{name}"
        # PEFT's combined adapter has lora_alpha = r: scale 1, as ours.
        assert out.scale(path) == 1.0 == float(FIXTURE[f"{key}/scaling"])
        assert out.weights[path][0].dtype == jnp.float32
        assert_close(delta(out, path)[0], FIXTURE[f"{key}/delta"])
        peft_rank = FIXTURE[f"{key}/A"].shape[0]
        if method == "cat":
            # PEFT sizes every module at the config's Σr, zero past the adapters
            # that target it; ours has exactly the ranks of those adapters.
            k = out.ranks[out.paths.index(path)]
            a, b = factors(out, path)
            assert_close(a[0], FIXTURE[f"{key}/A"][:k].T)
            assert_close(b[0], FIXTURE[f"{key}/B"][:, :k].T)
            assert not FIXTURE[f"{key}/A"][k:].any()
        elif method != "svd":
            assert out.ranks[out.paths.index(path)] == peft_rank
            a, b = factors(out, path)
            assert_close(a[0], FIXTURE[f"{key}/A"].T)
            assert_close(b[0], FIXTURE[f"{key}/B"].T)
        else:
            assert out.ranks[out.paths.index(path)] == peft_rank


def test_cat_where_an_adapter_lacks_a_path():
    # Adapter 1 of the `mixed` group does not target `proj`: it adds nothing there.
    adapters = [fixture_adapter("mixed", i) for i in range(3)]
    assert "proj/kernel" not in adapters[1].paths
    out = lx.combine_adapters(adapters, WEIGHTS, method="cat")
    assert out.ranks == (9, 9, 6, 9)
    want, _ = weighted_sum(
        [adapters[0], adapters[2]], [WEIGHTS[0], WEIGHTS[2]], "proj/kernel"
    )
    assert_close(delta(out, "proj/kernel"), want)


def test_svd_of_fixtures_is_the_best_rank_k_approximation():
    adapters = [fixture_adapter("mixed", i) for i in range(3)]
    for k in (1, 3, 4, 7):
        out = lx.combine_adapters(adapters, WEIGHTS, method="svd", rank=k)
        for path in out.paths:
            dense, _ = weighted_sum(adapters, WEIGHTS, path)
            want, _ = best_rank_k(dense, k)
            assert_close(delta(out, path), want)
            # PEFT's split: `a` holds orthonormal singular vectors.
            a, _ = factors(out, path)
            live = np.abs(a[0]).sum(0) > 0
            gram = a[0][:, live].T @ a[0][:, live]
            np.testing.assert_allclose(gram, np.eye(live.sum()), atol=1e-6)


# --- against NumPy definitions ------------------------------------------------------


@st.composite
def adapter_sets(draw, equal_ranks=False):
    """2-3 adapters on one leaf (possibly stacked, possibly 2-D in-features) and on
    a second leaf only some of them adapt, with random weights."""
    n = draw(st.integers(2, 3))
    stack = draw(st.sampled_from([(), (2,)]))
    ins = draw(st.sampled_from([(5,), (2, 3), (9,)]))
    outs = draw(st.sampled_from([(4,), (7,), (3, 2)]))
    r0 = draw(st.integers(1, 4))
    ranks = (
        [r0] * n
        if equal_ranks
        else draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    )
    weights = draw(
        st.lists(
            st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3),
            min_size=n,
            max_size=n,
        )
    )
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    main, side = leaf("main", ins, outs, stack), leaf("side", (6,), (5,))
    adapters = []
    for i, r in enumerate(ranks):
        lays = [main] if i == 1 else [main, side]
        w = {}
        for lay in lays:
            w[lay.path] = (
                jnp.asarray(nonzero(rng, (*lay.stack_shape, *lay.in_shape, r))),
                jnp.asarray(nonzero(rng, (*lay.stack_shape, r, *lay.out_shape))),
            )
        adapters.append(
            lx.Adapter(
                w,
                tuple(lays),
                tuple(r for _ in lays),
                tuple(float(rng.uniform(0.5, 8.0)) for _ in lays),
                tuple(bool(rng.integers(2)) for _ in lays),
            )
        )
    return adapters, weights


@given(adapter_sets())
def test_cat_is_the_exact_weighted_sum(case):
    adapters, weights = case
    out = lx.combine_adapters(adapters, weights, method="cat")
    for path in ("main", "side"):
        want, mag = weighted_sum(adapters, weights, path)
        assert_close(delta(out, path), want, mag)
        have = [ad.ranks[ad.paths.index(path)] for ad in adapters if path in ad.paths]
        assert out.ranks[out.paths.index(path)] == sum(have)
        assert (
            out.layouts[out.paths.index(path)]
            == adapters[0].layouts[adapters[0].paths.index(path)]
        )


@given(adapter_sets(equal_ranks=True))
def test_linear_is_peft_s_sum_of_split_factors(case):
    adapters, weights = case
    out = lx.combine_adapters(adapters, weights, method="linear")
    for path in ("main", "side"):
        a_sum = b_sum = a_mag = b_mag = 0.0
        for ad, w in zip(adapters, weights):
            if path not in ad.paths:
                continue
            c = w * ad.scale(path)
            a, b = factors(ad, path)
            a_sum = a_sum + np.sign(c) * np.sqrt(abs(c)) * a
            b_sum = b_sum + np.sqrt(abs(c)) * b
            a_mag, b_mag = (
                a_mag + np.sqrt(abs(c)) * abs(a),
                b_mag + np.sqrt(abs(c)) * abs(b),
            )
        got_a, got_b = factors(out, path)
        assert_close(got_a, a_sum, a_mag)
        assert_close(got_b, b_sum, b_mag)
        assert_close(delta(out, path), a_sum @ b_sum, a_mag @ b_mag)


@given(adapter_sets(), st.integers(1, 6))
def test_svd_is_the_best_rank_k_approximation(case, k):
    adapters, weights = case
    out = lx.combine_adapters(adapters, weights, method="svd", rank=k)
    for path in ("main", "side"):
        dense, mag = weighted_sum(adapters, weights, path)
        got = delta(out, path)
        want, s = best_rank_k(dense, k)
        assert out.ranks[out.paths.index(path)] == k
        assert np.linalg.matrix_rank(got[0], tol=1e-4 * s[0, 0]) <= k
        # Eckart-Young: the error is what the dropped singular values leave
        # (unique even where singular values tie at the cut).
        err = np.linalg.norm(got - dense, axis=(-2, -1))
        best = np.sqrt((s[..., k:] ** 2).sum(-1))
        np.testing.assert_allclose(err, best, atol=1e-5 * np.max(mag) * 10)
        gap = s[..., k - 1] - s[..., k] if k < s.shape[-1] else s[..., -1]
        if np.all(gap > 1e-2 * s[..., 0]):
            assert_close(got, want, mag)


@pytest.mark.parametrize("method", ["svd", "cat", "ties"])
def test_never_builds_the_dense_update(method):
    # A 6000 × 5000 leaf: its dense update is 240 MB of float64; the factors are
    # 6000 × 7. NumPy reports its allocations to tracemalloc.
    rng = np.random.default_rng(0)
    lay = leaf("big", (6000,), (5000,))
    ranks = (4, 4) if method == "ties" else (4, 3)
    adapters = [
        lx.Adapter(
            {
                "big": (
                    jnp.asarray(nonzero(rng, (6000, r))),
                    jnp.asarray(nonzero(rng, (r, 5000))),
                )
            },
            (lay,),
            (r,),
            (2.0,),
            (False,),
        )
        for r in ranks
    ]
    kw = {"svd": {"rank": 7}, "ties": {"density": 0.5}}.get(method, {})
    tracemalloc.start()
    try:
        out = lx.combine_adapters(adapters, [0.5, -1.0], method=method, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16e6, f"peak {peak / 1e6:.0f} MB: the dense update was built"
    if method == "ties":
        return
    # Spot-check a few entries of the (exact, rank 7) update against the factors.
    a, b = (np.asarray(x, np.float64) for x in out.weights["big"])
    rows, cols = rng.integers(0, 6000, 5), rng.integers(0, 5000, 5)
    want = sum(
        w
        * ad.scale("big")
        * np.einsum(
            "ir,ri->i",
            np.asarray(ad.weights["big"][0], np.float64)[rows],
            np.asarray(ad.weights["big"][1], np.float64)[:, cols],
        )
        for ad, w in zip(adapters, [0.5, -1.0])
    )
    got = np.einsum("ir,ri->i", a[rows], b[:, cols])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- the pruning methods, by their definitions -----------------------------------


def single(rng, lay, r, alpha=None):
    a = nonzero(rng, (*lay.stack_shape, *lay.in_shape, r))
    b = nonzero(rng, (*lay.stack_shape, r, *lay.out_shape))
    return lx.Adapter(
        {lay.path: (jnp.asarray(a), jnp.asarray(b))},
        (lay,),
        (r,),
        (float(r) if alpha is None else alpha,),
        (False,),
    )


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 1.0])
def test_magnitude_prune_keeps_the_largest_entries_per_stack_entry(density):
    rng = np.random.default_rng(1)
    lay = leaf("w", (8,), (6,), stack=(3,))
    ad = single(rng, lay, 4)  # scale 1: weight 1 leaves each factor as it is
    out = lx.combine_adapters([ad], [1.0], method="magnitude_prune", density=density)
    for got, orig in zip(factors(out, "w"), factors(ad, "w")):
        for g, o in zip(got, orig):  # each stack entry is one PEFT module
            k = int(density * o.size)
            assert np.count_nonzero(g) == k
            kept = g != 0
            np.testing.assert_allclose(g[kept], o[kept], rtol=1e-6)
            if k < o.size:
                assert np.abs(o[kept]).min() >= np.abs(o[~kept]).max()


def test_ties_elects_signs_and_averages_agreeing_entries():
    # Rank 1, scale 1, weights 1: the A side is the entries themselves. Entry 0:
    # total 5 - 1 - 1 = 3 elects +, so 5 alone; by frequency (+1 -1 -1) it is -,
    # the mean of -1 and -1. Entry 1: all agree. Entry 2: only one non-zero.
    lay = leaf("w", (3,), (2,))
    cols = [[5.0, 2.0, 0.0], [-1.0, 4.0, 0.0], [-1.0, 3.0, -2.0]]
    adapters = [
        lx.Adapter(
            {"w": (jnp.asarray(np.array(c)[:, None]), jnp.ones((1, 2)))},
            (lay,),
            (1,),
            (1.0,),
            (False,),
        )
        for c in cols
    ]
    kw = dict(method="ties", density=1.0)
    total = lx.combine_adapters(adapters, [1.0] * 3, **kw)
    freq = lx.combine_adapters(
        adapters, [1.0] * 3, majority_sign_method="frequency", **kw
    )
    np.testing.assert_allclose(np.asarray(total.weights["w"][0])[:, 0], [5, 3, -2])
    np.testing.assert_allclose(np.asarray(freq.weights["w"][0])[:, 0], [-1, 3, -2])
    # The B side: all ones agree; their mean is 1.
    np.testing.assert_allclose(np.asarray(total.weights["w"][1]), np.ones((1, 2)))
    # Negative weights: the sign is elected before weighting (as PEFT does), so
    # entry 0 keeps adapter 0 alone, now -5, and entry 1 is (-2 + 4 + 3) / 3.
    neg = lx.combine_adapters(adapters, [-1.0, 1.0, 1.0], **kw)
    got = np.asarray(neg.weights["w"][0])[:, 0]
    np.testing.assert_allclose(got, [-5, 5 / 3, -2], rtol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_a_density_fraction_rescaled(method):
    rng = np.random.default_rng(2)
    lay = leaf("w", (64,), (48,))
    ad = single(rng, lay, 8)
    density = 0.3
    out = lx.combine_adapters([ad], [1.0], method=method, density=density, seed=7)
    for got, orig in zip(factors(out, "w"), factors(ad, "w")):
        kept = got != 0
        # Each entry kept with probability 0.3, then divided by it.
        n = kept.size
        assert abs(kept.sum() - density * n) < 5 * np.sqrt(n * density * (1 - density))
        np.testing.assert_allclose(got[kept], orig[kept] / density, rtol=1e-5)
    again = lx.combine_adapters([ad], [1.0], method=method, density=density, seed=7)
    other = lx.combine_adapters([ad], [1.0], method=method, density=density, seed=8)
    assert again.fingerprint() == out.fingerprint()
    assert other.fingerprint() != out.fingerprint()


def test_dare_with_density_one_is_linear_and_ties():
    adapters = [fixture_adapter("equal", i) for i in range(3)]
    for dare, plain, kw in [
        ("dare_linear", "linear", {}),
        ("dare_ties", "ties", {"density": 1.0}),
    ]:
        got = lx.combine_adapters(adapters, WEIGHTS, method=dare, density=1.0, seed=0)
        want = lx.combine_adapters(adapters, WEIGHTS, method=plain, **kw)
        for path in want.paths:
            for g, w in zip(got.weights[path], want.weights[path]):
                np.testing.assert_array_equal(g, w)


def test_dare_ties_is_ties_on_dare_pruned_factors():
    # With one adapter, the election keeps every non-zero entry: dare_ties and
    # dare_linear draw the same masks from the same seed and agree.
    rng = np.random.default_rng(3)
    ad = single(rng, leaf("w", (10,), (7,), stack=(2,)), 3, alpha=6.0)
    kw = dict(density=0.6, seed=11)
    ties = lx.combine_adapters([ad], [0.8], method="dare_ties", **kw)
    lin = lx.combine_adapters([ad], [0.8], method="dare_linear", **kw)
    for g, w in zip(ties.weights["w"], lin.weights["w"]):
        np.testing.assert_allclose(g, w, rtol=1e-6)


# --- the result is an ordinary adapter -------------------------------------------


def tree():
    rng = np.random.default_rng(4)
    return {
        name: {"kernel": jnp.asarray(nonzero(rng, (int(n_in), int(n_out))))}
        for name, n_in, n_out, _ in MODULES
    }


def test_served_in_a_mixed_batch_with_its_inputs():
    adapters = [fixture_adapter("mixed", i) for i in range(3)]
    combined = lx.combine_adapters(adapters, WEIGHTS, method="svd", rank=3)
    cat = lx.combine_adapters(adapters, WEIGHTS, method="cat")
    every = [*adapters, combined, cat]
    stack = lx.stack_adapters(every)
    params = tree()
    idx = [0, 3, -1, 1, 4, 2, 3]
    rng = np.random.default_rng(5)
    xs = {name: nonzero(rng, (len(idx), int(n_in))) for name, n_in, *_ in MODULES}

    def forward(p, xs):
        return {name: xs[name] @ p[name]["kernel"] for name in p}

    got = jax.jit(lx.quaxify(forward))(
        lx.loraify(params, stack, jnp.asarray(idx, jnp.int32)), xs
    )
    for name, *_ in MODULES:
        path = f"{name}/kernel"
        w = np.asarray(params[name]["kernel"], np.float64)
        for row, i in enumerate(idx):
            ad = every[i] if i >= 0 else None
            dw = delta(ad, path)[0] if ad is not None and path in ad.paths else 0.0
            want = xs[name][row].astype(np.float64) @ (w + dw)
            scale = np.abs(xs[name][row]) @ (np.abs(w) + np.abs(dw))
            assert_close(np.asarray(got[name][row]), want, scale, rtol=1e-4)
    # cat is exact: serving it equals serving the weighted inputs' sum.
    want = sum(
        w * (xs["up"].astype(np.float64) @ delta(ad, "up/kernel")[0])
        for ad, w in zip(adapters, WEIGHTS)
    ) + xs["up"].astype(np.float64) @ np.asarray(params["up"]["kernel"], np.float64)
    rows = [r for r, i in enumerate(idx) if i == 4]
    assert_close(np.asarray(got["up"])[rows], want[rows], rtol=1e-4)


def test_saves_loads_and_banks(tmp_path):
    adapters = [fixture_adapter("mixed", i) for i in range(3)]
    combined = lx.combine_adapters(adapters, WEIGHTS, method="cat")
    params = tree()
    lx.save_adapter(tmp_path / "orbax", combined)
    again = lx.load_adapter(tmp_path / "orbax", tree=params)
    assert again.fingerprint() == combined.fingerprint()
    lx.save_peft_adapter(tmp_path / "peft", combined)
    back = lx.load_peft_adapter(tmp_path / "peft", params)
    for path in combined.paths:
        assert_close(delta(back, path), delta(combined, path))
    bank = lx.AdapterBank(params, lx.LoraRule("kernel", rank=9), slots=2)
    bank.add("combined", combined)
    idx = bank.indices(["combined", None])
    x = jnp.ones((2, 12))
    y = lx.quaxify(lambda p, x: x @ p["up"]["kernel"])(lx.loraify(params, bank, idx), x)
    w = np.asarray(params["up"]["kernel"], np.float64)
    want = np.ones(12) @ (w + delta(combined, "up/kernel")[0])
    assert_close(np.asarray(y[0]), want, rtol=1e-4)
    assert_close(np.asarray(y[1]), np.ones(12) @ w, rtol=1e-4)


# --- errors ------------------------------------------------------------------------


@pytest.fixture
def pair():
    return [fixture_adapter("mixed", 0), fixture_adapter("mixed", 2)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weights=[1.0]), ValueError, "1 weights for 2 adapters; give one weight"),
        (
            dict(weights=[1.0, np.nan]),
            ValueError,
            "weight 1 is nan; weights must be finite",
        ),
        (dict(weights=[np.inf, 1.0]), ValueError, "weight 0 is inf"),
        (dict(weights=[1.0, "2"]), TypeError, "weight 1 is '2'; weights are real"),
        (dict(weights=0.5), TypeError, "weights is a float; give a sequence"),
        (
            dict(method="mean"),
            ValueError,
            "unknown method 'mean'; expected one of 'cat', 'linear', 'svd'",
        ),
        (
            dict(method="ties_svd", density=0.5),
            ValueError,
            "dense in × out update.*never builds.*Use 'ties'",
        ),
        (
            dict(method="cat", rank=4),
            ValueError,
            r"`rank` is only for method='svd'.*Drop `rank`",
        ),
        (
            dict(method="svd", rank=0),
            ValueError,
            "rank=0; the rank of an 'svd' result is an int of at least 1",
        ),
        (dict(method="svd", rank=2.5), ValueError, "rank=2.5"),
        (dict(method="ties"), ValueError, "'ties' needs `density`, the fraction"),
        (dict(method="ties", density=0.0), ValueError, r"density=0.0; .* in \(0, 1\]"),
        (dict(method="dare_linear", density=1.5, seed=0), ValueError, r"density=1.5"),
        (
            dict(method="svd", density=0.5),
            ValueError,
            "`density` is only for the pruning methods",
        ),
        (
            dict(method="dare_ties", density=0.5),
            ValueError,
            "drops entries at random; pass `seed=`.*same seed gives the same adapter",
        ),
        (
            dict(method="dare_ties", density=0.5, seed=-1),
            ValueError,
            "non-negative int",
        ),
        (
            dict(method="ties", density=0.5, seed=0),
            ValueError,
            "`seed` is only for the random methods.*deterministic",
        ),
        (
            dict(method="ties", density=0.5, majority_sign_method="max"),
            ValueError,
            "majority_sign_method='max'; expected 'total'",
        ),
        (
            dict(method="linear", majority_sign_method="frequency"),
            ValueError,
            "`majority_sign_method` is only for 'ties', 'dare_ties'",
        ),
        (
            dict(method="linear"),
            ValueError,
            r"'linear' needs the adapters' ranks at 'up/kernel' to be equal "
            r".*adapter 0: 2, adapter 1: 4.*method='cat'",
        ),
    ],
)
def test_argument_errors(pair, kwargs, error, match):
    call = dict(weights=[0.5, 0.5], method="cat") | kwargs
    with pytest.raises(error, match=match):
        lx.combine_adapters(pair, **call)


def test_adapter_errors(pair):
    with pytest.raises(ValueError, match="need at least one adapter"):
        lx.combine_adapters([], [], method="cat")
    stack = lx.stack_adapters(pair)
    with pytest.raises(TypeError, match="adapter 0 is a AdapterStack.*stack\\[i\\]"):
        lx.combine_adapters([stack], [1.0], method="cat")
    bad = jax.tree.map(lambda x: x.at[0, 0].set(jnp.nan), pair[1])
    with pytest.raises(lx.NonFiniteAdapterError, match="combine_adapters: adapter 1"):
        lx.combine_adapters([pair[0], bad], [1.0, 1.0], method="cat")


@pytest.mark.parametrize("variant", ["dora", "ia3", "ia3_feedforward", "vera"])
def test_variants_are_refused_naming_adapter_path_and_kind(pair, variant):
    params = tree()
    rank = 0 if variant.startswith("ia3") else 2
    other = lx.init_adapter(
        params,
        lx.LoraRule("up/kernel", rank=rank, variant=variant),
        key=jax.random.key(0),
    )
    kind = {"ia3_feedforward": "ia3"}.get(variant, variant)
    with pytest.raises(
        ValueError, match=f"adapter 1 is '{kind}' at 'up/kernel'; only plain LoRA"
    ):
        lx.combine_adapters([pair[0], other], [1.0, 1.0], method="cat")


def test_layout_and_lookup_mismatches_are_refused():
    rng = np.random.default_rng(6)
    in_out = single(rng, leaf("w", (8,), (8,)), 2)
    out_in = single(rng, lx.LeafLayout("w", (8, 8), (1,), (0,), ()), 2)
    with pytest.raises(
        ValueError, match="adapter 1 lays out 'w' as shape.*same orientation"
    ):
        lx.combine_adapters([in_out, out_in], [1.0, 1.0], method="cat")
    lookup = lx.Adapter(
        in_out.weights, in_out.layouts, in_out.ranks, in_out.alphas, (False,), (True,)
    )
    with pytest.raises(
        ValueError,
        match=r"at 'w' adapter 1 has \(lookup_only, head_only\)=\(True, False\)",
    ):
        lx.combine_adapters([in_out, lookup], [1.0, 1.0], method="svd")
    # Agreeing lookup flags carry over.
    both = lx.combine_adapters([lookup, lookup], [1.0, 1.0], method="svd")
    assert both.lookup_only == (True,)
    # So do head-only flags and an aLoRA's invocation; different invocations
    # are refused (the sum would have no single start).
    head = lx.Adapter(
        in_out.weights,
        in_out.layouts,
        in_out.ranks,
        in_out.alphas,
        (False,),
        head_only=(True,),
    )
    assert lx.combine_adapters([head, head], [1.0, 1.0], method="cat").head_only == (
        True,
    )

    def alora(tokens):
        return lx.Adapter(
            in_out.weights,
            in_out.layouts,
            in_out.ranks,
            in_out.alphas,
            (False,),
            invocation_tokens=tokens,
        )

    same = lx.combine_adapters([alora([3, 4]), alora([3, 4])], [1.0, 1.0], method="cat")
    assert same.invocation_tokens == (3, 4)
    with pytest.raises(ValueError, match="different invocation_tokens"):
        lx.combine_adapters([alora([3, 4]), alora([5])], [1.0, 1.0], method="cat")
    with pytest.raises(ValueError, match="different invocation_tokens"):
        lx.combine_adapters([alora([3, 4]), in_out], [1.0, 1.0], method="cat")
