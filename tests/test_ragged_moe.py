"""A grouped-matmul MoE layer (`lax.ragged_dot`: tokens sorted by expert, one
grouped matmul, as EasyDeL's `standard_moe`, MaxText, Levanter and SkyRL-tx compute
experts) with adapted expert weights serves one adapter for the whole call (scalar
indices), one per request `(B,)` or one per token `(B, T)`: every row equals its
request run alone with its adapter merged into the experts (float64 NumPy). The
rows carry their positions (`RowIds`) from the quaxified function's argument
through the model's sort, gathers, reshapes and scatters; the forms the libraries
use, a scanned stack of layers and an `AdapterBank` are covered, and so are the
ways it must fail: an out-of-range index or a corrupt adapter changes only its own
rows, a row mixing requests is NaN, rows that lost their positions are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lorax_arrays as lx
from tests.fast_init import random_adapters

E, D, F, T, K, B = 4, 6, 5, 7, 2, 4
RNG = np.random.default_rng(0)
PARAMS = {
    "router": RNG.normal(size=(D, E)).astype(np.float32),
    "up": RNG.normal(size=(E, D, F)).astype(np.float32) / D**0.5,
    "down": RNG.normal(size=(E, F, D)).astype(np.float32) / F**0.5,
}
RULES = [
    # Ranks 4 and 3: no factor stack seen as (E, d, n·r) has a weight's shape.
    lx.LoraRule("up", 4, stack_axes=0, in_axes=1, out_axes=2),
    lx.LoraRule("down", 3, alpha=6.0, stack_axes=0, in_axes=1, out_axes=2),
]
X = RNG.normal(size=(B, T, D)).astype(np.float32)


def _adapter(seed):
    fresh = lx.init_adapter(PARAMS, RULES, key=jax.random.key(seed))
    r = np.random.default_rng(seed)
    weights = {
        p: tuple(r.normal(size=np.shape(f)).astype(np.float32) for f in ab)
        for p, ab in fresh.weights.items()
    }
    import equinox as eqx

    return eqx.tree_at(lambda ad: ad.weights, fresh, weights)


ADAPTERS = [_adapter(1), _adapter(2), _adapter(3)]


def moe(p, x):
    """Tokens `(N, D)`: top-k routing, tokens sorted by expert, two grouped
    matmuls, unsorted and combined (EasyDeL's standard_moe, simplified)."""
    n = x.shape[0]
    logits = x @ p["router"]
    probs, experts = jax.lax.top_k(jax.nn.softmax(logits), K)  # (N, K)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat)
    tokens = jnp.repeat(x, K, axis=0)[order]  # (N*K, D), grouped by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    h = jax.nn.gelu(jax.lax.ragged_dot(tokens, p["up"], sizes))
    y = jax.lax.ragged_dot(h, p["down"], sizes)
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, K, D)
    return jnp.einsum("nkd,nk->nd", y, probs)


def _reference(i):
    out = []
    for b in range(B):
        p = {k: v.astype(np.float64) for k, v in PARAMS.items()}
        if i >= 0:
            ad = ADAPTERS[i]
            for path, (a, bb) in ad.weights.items():
                delta = np.einsum("edr,erf->edf", np.float64(a), np.float64(bb))
                p[path] = p[path] + ad.scale(path) * delta
        x = X[b].astype(np.float64)
        z = x @ p["router"]
        prob = np.exp(z - z.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        top = np.argsort(-prob, axis=-1)[:, :K]
        y = np.zeros((T, D))
        for t in range(T):
            for e in top[t]:
                h = x[t] @ p["up"][e]
                h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
                y[t] += prob[t, e] * (h @ p["down"][e])
        out.append(y)
    return np.stack(out)


@jax.jit
def _step(tree, x, i):  # the index traced, as a server passes it
    return lx.quaxify(moe)(lx.with_indices(tree, i), x)


def _serve(i):
    tree = lx.loraify(PARAMS, ADAPTERS)
    out = _step(tree, X.reshape(B * T, D), jnp.int32(i))
    return np.asarray(out).reshape(B, T, D)


@pytest.mark.parametrize("i", [0, 2])
def test_the_batch_equals_its_adapter_merged(i):
    np.testing.assert_allclose(_serve(i), _reference(i), rtol=1e-4, atol=1e-5)


def test_the_low_rank_term_is_grouped_not_dense():
    tree = lx.loraify(PARAMS, ADAPTERS, np.int32(1))
    jaxpr = jax.make_jaxpr(lx.quaxify(moe))(tree, X[0])
    ragged = [e for e in jaxpr.eqns if e.primitive.name == "ragged_dot_general"]
    assert len(ragged) == 6  # per expert weight: the base, x·A, (x·A)·B
    # No merged expert weight is built (the only (E, D, F) arrays are inputs).
    weights = {(E, D, F), (E, F, D)}
    built = [
        e
        for e in jaxpr.eqns
        if tuple(e.outvars[0].aval.shape) in weights
        and e.primitive.name != "stop_gradient"  # the frozen base weight
    ]
    assert not built, [e.primitive.name for e in built]


def test_base_and_bad_indices():
    np.testing.assert_allclose(_serve(-1), _reference(-1), rtol=1e-5, atol=1e-6)
    assert np.isnan(_serve(7)).all()  # beyond the stack: NaN, never another's
    with pytest.raises(lx.LoraIndexError):  # concrete: refused on the host
        lx.loraify(PARAMS, ADAPTERS, np.int32(7))


# -- per-request and per-token adapters ------------------------------------------

REFS = {i: _reference(i) for i in (-1, 0, 1, 2)}


def _rows_reference(idx):
    """Each token's row from the run with its request's (or token's) adapter
    merged; NaN for an index outside [-1, 3)."""
    per_token = np.broadcast_to(np.asarray(idx).reshape(B, -1), (B, T))
    out = np.full((B, T, D), np.nan)
    for b in range(B):
        for t in range(T):
            i = int(per_token[b, t])
            if i in REFS:
                out[b, t] = REFS[i][b, t]
    return out


def block(p, x):
    """`(B, T, D)` hidden states, flattened to tokens inside (as the libraries do)."""
    return moe(p, x.reshape(-1, D)).reshape(x.shape)


@jax.jit
def _rows_step(tree, x, idx):
    return lx.quaxify(block)(lx.with_indices(tree, idx), x)


def _rows_serve(idx, x=X):
    tree = lx.loraify(PARAMS, ADAPTERS, np.zeros(np.shape(idx), np.int32))
    return np.asarray(_rows_step(tree, x, jnp.asarray(idx)))


def _check_rows(got, idx):
    want = _rows_reference(idx)
    bad = np.isnan(want)
    np.testing.assert_allclose(got[~bad], want[~bad], rtol=1e-4, atol=1e-5)
    assert np.isnan(got[bad]).all()


def test_per_request_adapters_each_row_its_own():
    idx = np.array([0, 2, -1, 1], np.int32)
    _check_rows(_rows_serve(idx), idx)


def test_per_token_adapters_each_token_its_own():
    idx = np.random.default_rng(5).integers(-1, 3, (B, T)).astype(np.int32)
    _check_rows(_rows_serve(idx), idx)


def test_flattened_tokens_with_per_token_indices():
    """`(B*T, D)` tokens against `(B, T)` indices (a row-major regrouping)."""
    idx = np.random.default_rng(6).integers(-1, 3, (B, T)).astype(np.int32)
    tree = lx.loraify(PARAMS, ADAPTERS, idx)
    got = jax.jit(lx.quaxify(moe))(tree, X.reshape(B * T, D))
    _check_rows(np.asarray(got).reshape(B, T, D), idx)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(-3, 5), min_size=B * T, max_size=B * T))
def test_any_index_pattern_serves_each_row_or_nan(values):
    """Indices in and out of range, traced: valid rows equal their adapter's,
    out-of-range ones (-3, -2, 3, 4, 5) are NaN and change no other row."""
    idx = np.asarray(values, np.int32).reshape(B, T)
    _check_rows(_rows_serve(idx), idx)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int16])
def test_index_dtypes_and_copies(dtype):
    """Indices as a user may hold them: a list, int64, unsigned (255 is out of
    range, never wrapped to -1), each a copy of the batch's."""
    idx = np.array([1, 0, 2, 1], dtype)
    want = _rows_serve(idx.astype(np.int32))
    for given_idx in (idx.tolist(), idx.copy(), jnp.asarray(idx)):
        tree = lx.loraify(PARAMS, ADAPTERS, given_idx)
        np.testing.assert_array_equal(jax.jit(lx.quaxify(block))(tree, X), want)
    if dtype == np.uint8:
        bad = np.array([1, 255, 2, 1], np.uint8)
        got = _rows_serve(bad)
        assert np.isnan(got[1]).all() and not np.isnan(np.delete(got, 1, 0)).any()


@pytest.mark.parametrize("strategy", ["segment", "gather"])
def test_a_corrupt_adapter_changes_no_other_row(strategy):
    """Adapter 1 holding NaN (in `up`'s A) and Inf (in `down`'s B), as a diverged
    adapter would in a device slot: the rows of every other request, base rows
    included, are those of the clean run."""
    import equinox as eqx

    idx = np.array([0, 1, -1, 2], np.int32)
    clean = _rows_serve(idx)
    tree = lx.loraify(PARAMS, ADAPTERS, idx)
    up, down = tree["up"], tree["down"]
    tree["up"] = eqx.tree_at(lambda w: w.a, up, up.a.at[:, 1].set(jnp.nan))
    tree["down"] = eqx.tree_at(lambda w: w.b, down, down.b.at[:, 1].set(jnp.inf))
    got = np.asarray(jax.jit(lx.quaxify(block, strategy=strategy))(tree, X))
    np.testing.assert_allclose(np.delete(got, 1, 0), np.delete(clean, 1, 0), 1e-5)
    assert not np.isfinite(got[1]).all()


@pytest.mark.parametrize("strategy", ["segment", "gather"])
def test_the_low_rank_term_is_grouped_by_expert_and_adapter(strategy):
    """Per-row, either form: the same three grouped matmuls per weight, the
    factors seen as E·n groups (`segment`: rows sorted by expert and adapter) or
    as E groups of every adapter's columns (`gather`); no dense or per-row weight
    is built. Both forms equal the reference."""
    idx = np.array([0, 1, 2, -1], np.int32)
    tree = lx.loraify(PARAMS, ADAPTERS, idx)
    f = lx.quaxify(block, strategy=strategy)
    _check_rows(np.asarray(jax.jit(f)(tree, X)), idx)
    jaxpr = jax.make_jaxpr(f)(tree, X)
    ragged = [e for e in jaxpr.eqns if e.primitive.name == "ragged_dot_general"]
    assert len(ragged) == 6
    rhs = sorted(tuple(e.invars[1].aval.shape) for e in ragged)
    n = len(ADAPTERS)
    if strategy == "segment":
        assert (E * n, D, 4) in rhs and (E * n, 4, F) in rhs  # up: rank 4
        assert (E * n, F, 3) in rhs and (E * n, 3, D) in rhs  # down: rank 3
    else:
        assert (E, D, n * 4) in rhs and (E, n * 4, F) in rhs
        assert (E, F, n * 3) in rhs and (E, n * 3, D) in rhs
    weights = {(D, F), (F, D)}  # a dense weight, whole or per row, ends so
    built = [
        e.primitive.name
        for e in jaxpr.eqns
        if tuple(e.outvars[0].aval.shape[-2:]) in weights
        and e.primitive.name != "stop_gradient"
    ]
    assert not built, built


# -- the forms the libraries write ----------------------------------------------


def moe_forms(p, x, unsort, combine, take):
    """`moe` written each way the libraries do: the tokens selected by indexing or
    by `jnp.take(x, order // K)` (MaxText's permute), unsorted by a scatter or by
    a gather with the inverse order (MaxText's unpermute), combined by an einsum
    or by a scatter-add into each token's row; with a sharding constraint and a
    checkpoint name on the way."""
    from jax.ad_checkpoint import checkpoint_name

    n = x.shape[0]
    x = checkpoint_name(x, "moe_in")
    logits = x @ p["router"]
    probs, experts = jax.lax.top_k(jax.nn.softmax(logits), K)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat)
    if take:
        tokens = jnp.take(x, order // K, axis=0)
    else:
        tokens = jnp.repeat(x, K, axis=0)[order]
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    h = jax.nn.gelu(jax.lax.ragged_dot(tokens, p["up"], sizes))
    y = jax.lax.ragged_dot(h, p["down"], sizes)
    if unsort == "scatter":
        y = jnp.zeros_like(y).at[order].set(y)
    else:
        y = jnp.take(y, jnp.argsort(order), axis=0)
    if combine == "einsum":
        return jnp.einsum("nkd,nk->nd", y.reshape(n, K, D), probs)
    weighted = y * probs.reshape(-1)[:, None]
    return jnp.zeros((n, D), y.dtype).at[jnp.arange(n * K) // K].add(weighted)


@pytest.mark.parametrize(
    "unsort,combine,take",
    [("scatter", "einsum", False), ("gather", "scatter_add", True)],
)
def test_the_forms_the_libraries_write(unsort, combine, take):
    idx = np.random.default_rng(7).integers(-1, 3, (B, T)).astype(np.int32)
    tree = lx.loraify(PARAMS, ADAPTERS, idx)

    def f(p, x):
        return moe_forms(p, x.reshape(-1, D), unsort, combine, take).reshape(x.shape)

    _check_rows(np.asarray(jax.jit(lx.quaxify(f))(tree, X)), idx)


def test_a_scanned_stack_of_moe_layers():
    """Two layers stacked and run by `lax.scan` (MaxText's scanned decoder): the
    hidden state, carried from layer to layer, keeps its rows' positions."""
    stacked = {k: np.stack([v, v[::-1].copy()]) for k, v in PARAMS.items()}
    rules = [
        lx.LoraRule("up", 2, stack_axes=(0, 1), in_axes=2, out_axes=3),
        lx.LoraRule("down", 3, alpha=6.0, stack_axes=(0, 1), in_axes=2, out_axes=3),
    ]
    adapters = random_adapters(stacked, [rules, rules], seed=11, std=1.0)
    idx = np.array([1, -1, 0, 1], np.int32)

    def layers(p, x):
        def body(h, layer):
            return h + moe(layer, h.reshape(-1, D)).reshape(h.shape), None

        return jax.lax.scan(body, x, p)[0]

    got = np.asarray(jax.jit(lx.quaxify(layers))(lx.loraify(stacked, adapters, idx), X))
    for b in range(B):
        p = {k: v.astype(np.float64) for k, v in stacked.items()}
        if idx[b] >= 0:
            ad = adapters[idx[b]]
            for path, (a, bb) in ad.weights.items():
                delta = np.einsum("ledr,lerf->ledf", np.float64(a), np.float64(bb))
                p[path] = p[path] + ad.scale(path) * delta
        h = X[b : b + 1]
        for layer in range(2):
            params = {k: jnp.asarray(v[layer], jnp.float32) for k, v in p.items()}
            h = h + np.asarray(block(params, jnp.asarray(h)))
        np.testing.assert_allclose(got[b], h[0], rtol=2e-4, atol=2e-5)


def test_served_from_an_adapter_bank():
    bank = lx.AdapterBank(PARAMS, RULES, slots=3)
    for name, ad in zip(("a", "b", "c"), ADAPTERS):
        bank.add(name, ad)
    idx = bank.indices(["c", None, "a", "b"])
    step = jax.jit(lambda served, x: lx.quaxify(block)(lx.loraify(PARAMS, served), x))
    got = np.asarray(step(bank.served(idx), X))
    _check_rows(got, np.array([2, -1, 0, 1]))


# -- the ways it must fail ---------------------------------------------------------


def test_rows_without_positions_are_refused():
    tree = lx.loraify(PARAMS, ADAPTERS, np.array([0, 1, 2, 0], np.int32))
    with pytest.raises(lx.UnsupportedOperationError, match="these rows do not carry"):
        lx.quaxify(block, rows=False)(tree, X)
    # Hidden inside a pytree, the activation is not an argument the call tags.
    with pytest.raises(lx.UnsupportedOperationError, match="pass the hidden states"):
        lx.quaxify(lambda t, d: block(t, d["x"]))(tree, {"x": X})
    # (B*T, D) tokens against (B,) indices: how they were flattened is not guessed.
    with pytest.raises(lx.UnsupportedOperationError, match="per-token indices"):
        lx.quaxify(moe)(tree, X.reshape(B * T, D))


def test_a_row_mixing_requests_is_nan():
    """Every row replaced by the batch's mean is for no one request: NaN, never
    one request's adapter; a request's own rows minus that mean are still its."""
    idx = np.array([0, 1, 2, 1], np.int32)
    tree = lx.loraify(PARAMS, ADAPTERS, idx)
    mean = lambda x: jnp.broadcast_to(x.mean(0), x.shape)  # noqa: E731
    got = jax.jit(lx.quaxify(lambda t, x: block(t, mean(x))))(tree, X)
    assert np.isnan(np.asarray(got)).all()
    centred = np.asarray(X - X.mean(0))
    got = jax.jit(lx.quaxify(lambda t, x: block(t, x - x.mean(0))))(tree, X)
    want = np.asarray(_rows_step(tree, centred, jnp.asarray(idx)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gradients_per_request_equal_each_request_alone():
    """Training through the per-row path: the gradient of a batch's loss for each
    adapter's factors equals the sum, over the requests using it, of the gradient
    of that request's loss served alone with its adapter (the scalar path, checked
    against NumPy above); base rows give none."""
    idx = np.array([0, 2, -1, 0], np.int32)

    def loss(tree, x):
        return (lx.quaxify(block)(tree, x) ** 2).sum()

    grad = jax.jit(jax.grad(loss, allow_int=True))
    got = grad(lx.loraify(PARAMS, ADAPTERS, idx), X)
    want = {p: [np.zeros(np.shape(got[p].a)), np.zeros(np.shape(got[p].b))]
            for p in ("up", "down")}  # fmt: skip
    for b, i in enumerate(idx):
        if i < 0:
            continue
        alone = grad(lx.loraify(PARAMS, ADAPTERS, np.int32(i)), X[b : b + 1])
        for p in want:
            want[p][0] += np.asarray(alone[p].a)
            want[p][1] += np.asarray(alone[p].b)
    for p in want:
        for g, w in zip((got[p].a, got[p].b), want[p]):
            assert np.abs(w).max() > 0
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    assert not np.asarray(got["up"].a)[:, 1].any()  # adapter 1: no request


def test_tenants_on_expert_weights_train_as_if_alone():
    """`lx.AdapterTrainer` with tenants adapting the experts of a grouped-matmul
    layer, one per request: after three Adam steps each tenant's adapter equals
    the one trained by a trainer that holds it alone, on its own rows only."""
    import optax

    rng = np.random.default_rng(8)
    y = rng.normal(size=X.shape).astype(np.float32)
    names = ["a", "b", None, "a"]

    def loss_fn(tree, batch):  # one loss per request
        x, target = batch
        return jnp.mean((block(tree, x) - target) ** 2, axis=(1, 2))

    def trained(tenants, rows):
        trainer = lx.AdapterTrainer(PARAMS, RULES, slots=2, optimizer=optax.adam(1e-2))
        for name in tenants:
            trainer.add(name, ADAPTERS["ab".index(name)])
        rows = np.asarray(rows)
        for _ in range(3):
            trainer.step(loss_fn, (X[rows], y[rows]), [names[r] for r in rows])
        return trainer

    together = trained("ab", [0, 1, 2, 3])
    for name, rows in (("a", [0, 3]), ("b", [1])):
        alone = trained(name, rows).adapter(name)
        got = together.adapter(name)
        for path, (a, b) in alone.weights.items():
            moved = np.abs(
                np.asarray(a) - np.asarray(ADAPTERS["ab".index(name)].weights[path][0])
            )
            assert moved.max() > 1e-4  # it trained
            np.testing.assert_allclose(got.weights[path][0], a, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got.weights[path][1], b, rtol=1e-4, atol=1e-5)


def test_a_while_loop_of_moe_layers():
    """`lax.while_loop` over a per-row MoE layer: the carried hidden state keeps
    its rows' positions from step to step (quax traces the body until the
    carry's type settles)."""
    idx = np.array([0, 2, -1, 1], np.int32)
    tree = lx.loraify(PARAMS, ADAPTERS, idx)

    def looped(p, x):
        def body(carry):
            i, h = carry
            return i + 1, h + block(p, h)

        return jax.lax.while_loop(lambda c: c[0] < 2, body, (0, x))[1]

    got = np.asarray(jax.jit(lx.quaxify(looped))(tree, X))
    h = X
    for _ in range(2):
        h = h + _rows_serve(idx, jnp.asarray(h))
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)
