"""A grouped-matmul MoE layer (`lax.ragged_dot`: tokens sorted by expert, one
grouped matmul, as EasyDeL's `standard_moe`, MaxText, Levanter and SkyRL-tx compute
experts) with adapted expert weights and one adapter for the whole call (scalar
indices: a batch grouped by adapter) is served as the grouped low-rank product,
equal to the model with that adapter merged into the experts (float64 NumPy).
Per-request adapters inside a grouped matmul are refused with the alternatives
(JAX cannot vmap `ragged_dot` over shared weights, so no per-sequence path
exists either)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx

E, D, F, T, K, B = 4, 6, 5, 7, 2, 4
RNG = np.random.default_rng(0)
PARAMS = {
    "router": RNG.normal(size=(D, E)).astype(np.float32),
    "up": RNG.normal(size=(E, D, F)).astype(np.float32) / D**0.5,
    "down": RNG.normal(size=(E, F, D)).astype(np.float32) / F**0.5,
}
RULES = [
    lx.LoraRule("up", 2, stack_axes=0, in_axes=1, out_axes=2),
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


def test_per_row_indices_are_refused_with_the_alternatives():
    tree = lx.loraify(PARAMS, ADAPTERS, np.zeros((T,), np.int32))
    with pytest.raises(lx.UnsupportedOperationError, match="scalar indices"):
        lx.quaxify(moe)(tree, X[0])
