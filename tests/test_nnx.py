"""Flax NNX models served and trained with per-row adapters.

Every case is checked against an independent reference: the same NNX model with
each adapter's `W + s·A B` computed in NumPy (float64) and written into a clone of
the module with `nnx.update`, run one row at a time; base rows (index -1) run the
base module. `lx.merge` is never the reference. The adapters have random non-zero
A *and* B and different ranks (so different scales), and every batch mixes them
with base rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import errors as flax_errors, nnx

import lorax_arrays as lx
from tests.helpers import nonzero
from tests.model_helpers import weight_delta

# `Module.sow` outside `nnx.capture` warns (DeprecationWarning) in Flax 0.12.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

D, HEADS, VOCAB, LAYERS = 8, 2, 13, 2
RANKS = (2, 4)
ALPHA = 4.0  # scales 2 and 1
IDX = np.array([0, 1, -1, 1])  # two adapters and a base row in one batch
TOL = dict(rtol=2e-4, atol=2e-4)


# --- the reference -----------------------------------------------------------


def random_adapter(module, rules, seed: int) -> lx.Adapter:
    """An adapter for `rules` on `module` with random non-zero A and B (NumPy)."""
    template = lx.init_adapter(module, rules, key=jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)

    weights = {
        path: (nonzero(rng, a.shape, 0.2, 0.5), nonzero(rng, b.shape, 0.2, 0.5))
        for path, (a, b) in template.weights.items()
    }
    return lx.Adapter(
        weights=weights,
        layouts=template.layouts,
        ranks=template.ranks,
        alphas=template.alphas,
        use_rslora=template.use_rslora,
    )


def np_delta(a, b, layout) -> np.ndarray:
    """`sum_r a[.., in.., r] b[.., r, out..]` in float64, in the weight's axis order."""
    return weight_delta(np.asarray(a, np.float64), np.asarray(b, np.float64), layout)


def np_merged(module, adapter: lx.Adapter, rank: int):
    """A clone of `module` with `w + (ALPHA / rank) · a b` (NumPy) at every path."""
    layouts = {lay.path: lay for lay in adapter.layouts}
    updates = []
    for path, var in nnx.to_flat_state(nnx.state(module)):
        key = "/".join(map(str, path)) + "/value"
        if key in adapter.weights:
            a, b = adapter.weights[key]
            w = np.asarray(var[...], np.float64)
            merged = w + (ALPHA / rank) * np_delta(a, b, layouts[key])
            updates.append((path, jnp.asarray(merged.astype(np.float32))))
    assert len(updates) == len(adapter.weights)
    ref = nnx.clone(module)
    nnx.update(ref, nnx.from_flat_state(updates))
    return ref


def reference(module, adapters, idx, x, call=lambda m, x: m(x)):
    """Row `e` of the batch through the NumPy-merged model of adapter `idx[e]`."""
    models = [np_merged(module, ad, r) for ad, r in zip(adapters, RANKS)]
    # Plain NNX under `jax.jit` (for speed: one compilation for all rows), which
    # works on a copy of each model, so a model that sows does not accumulate.
    run = jax.jit(call)
    rows = [
        run(module if i < 0 else models[i], x[e : e + 1])[0]
        for e, i in enumerate(np.asarray(idx))
    ]
    return np.stack([np.asarray(r) for r in rows])


def check(served_out, module, adapters, idx, x, call=lambda m, x: m(x)):
    want = reference(module, adapters, idx, x, call)
    np.testing.assert_allclose(np.asarray(served_out), want, **TOL)
    # Not vacuous: every adapter moves its rows well beyond the tolerance.
    base = np.asarray(call(nnx.clone(module), x))
    for e, i in enumerate(np.asarray(idx)):
        moved = np.abs(want[e] - base[e]).max()
        assert (moved > 1e-2) if i >= 0 else (moved < 1e-5), (e, i, moved)


def serve(module, rules, idx=IDX):
    """Two random adapters of ranks RANKS, stacked and put into `module`."""
    adapters = [random_adapter(module, rules(r), seed) for seed, r in enumerate(RANKS)]
    stack = lx.stack_adapters(adapters)
    return lx.loraify(module, stack, jnp.asarray(idx)), adapters


def call_model(m, x):
    return m(x)


forward = lx.quaxify(call_model)


# --- layers ------------------------------------------------------------------


def kernel_rules(rank):
    return [lx.LoraRule(r"kernel", rank=rank, alpha=ALPHA)]


def test_match_rules_paths_end_in_value():
    layer = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    table = lx.match_rules(layer, kernel_rules(2))
    assert [m.path for m in table] == ["kernel/value"]
    assert "kernel/value" in str(table)


@pytest.mark.parametrize("jit", [None, jax.jit, nnx.jit])
def test_linear(jit):
    layer = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    served, adapters = serve(layer, kernel_rules)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, D))
    f = forward if jit is None else jit(forward)
    check(f(served, x), layer, adapters, IDX, x)


def test_linear_per_token_indices():
    layer = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    idx = np.array([[0, -1, 1], [1, 1, -1]])
    served, adapters = serve(layer, kernel_rules, idx)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, D))
    out = np.asarray(jax.jit(forward)(served, x))
    # Token by token: each token is a row of its own.
    flat = out.reshape(6, 5)
    check(flat, layer, adapters, idx.reshape(-1), x.reshape(6, D))


def test_einsum_multi_axis_kernel():
    layer = nnx.Einsum("btd,dnh->btnh", (D, HEADS, 4), (HEADS, 4), rngs=nnx.Rngs(0))

    def rules(rank):
        return [
            lx.LoraRule(
                r"kernel", rank=rank, alpha=ALPHA, in_axes=(0,), out_axes=(1, 2)
            )
        ]

    served, adapters = serve(layer, rules)
    assert adapters[0].weights["kernel/value"][1].shape == (RANKS[0], HEADS, 4)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, D))
    check(jax.jit(forward)(served, x), layer, adapters, IDX, x)


def attention_rules(rank, stack=()):
    s = len(stack)
    up = lambda axes: tuple(ax + s for ax in axes)  # noqa: E731
    return [
        lx.LoraRule(
            r"(query|key|value)/kernel",
            rank=rank,
            alpha=ALPHA,
            in_axes=up((0,)),
            out_axes=up((1, 2)),
            stack_axes=stack,
        ),
        lx.LoraRule(
            r"out/kernel",
            rank=rank,
            alpha=ALPHA,
            in_axes=up((0, 1)),
            out_axes=up((2,)),
            stack_axes=stack,
        ),
    ]


def test_multi_head_attention():
    mha = nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=D, decode=False, rngs=nnx.Rngs(0)
    )
    served, adapters = serve(mha, attention_rules)
    assert len(adapters[0].weights) == 4
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, D))

    def causal(m, x):
        return m(x, mask=nnx.make_causal_mask(x[..., 0]))

    out = jax.jit(lx.quaxify(causal))(served, x)
    check(out, mha, adapters, IDX, x, causal)


@pytest.mark.parametrize("how", ["lookup", "attend"])
def test_embed(how):
    embed = nnx.Embed(VOCAB, D, rngs=nnx.Rngs(0))

    def rules(rank):
        return [lx.LoraRule(r"embedding", rank=rank, alpha=ALPHA)]

    served, adapters = serve(embed, rules)
    tokens = jnp.array([[1, 5, 12], [0, 3, 3], [7, 7, 2], [11, 4, 9]])
    if how == "lookup":
        call = call_model
    else:  # a tied output head, `h @ E.T`, after the lookup
        call = lambda m, t: m.attend(m(t))  # noqa: E731
    check(jax.jit(lx.quaxify(call))(served, tokens), embed, adapters, IDX, tokens, call)


# --- a decoder ---------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=D, decode=False, rngs=rngs
        )
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.attn(h, mask=nnx.make_causal_mask(x[..., 0]))
        x = x + self.down(jax.nn.gelu(self.up(x)))
        self.sow(nnx.Intermediate, "resid", x)
        return x


class LoopDecoder(nnx.Module):
    """Embed, a list of blocks (each through `nnx.remat`), a tied head."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = nnx.remat(Block.__call__)(block, x)
        return self.embed.attend(x)


class ScanDecoder(nnx.Module):
    """Embed, a stack of blocks built by `nnx.vmap`, run by `nnx.scan` (each
    step through `nnx.remat`), a tied head."""

    def __init__(self, rngs, remat=True):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.remat = remat

    def __call__(self, tokens):
        x = self.embed(tokens)

        def step(x, block):
            return block(x)

        if self.remat:
            step = nnx.remat(step)
        x = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        return self.embed.attend(x)


def decoder_rules(rank, stacked=False):
    stack = (0,) if stacked else ()
    return [
        *attention_rules(rank, stack),
        lx.LoraRule(r"(up|down)/kernel", rank=rank, alpha=ALPHA, stack_axes=stack),
        lx.LoraRule(r"embed/embedding", rank=rank, alpha=ALPHA),
    ]


TOKENS = jnp.array([[1, 5, 12, 0], [0, 3, 3, 8], [7, 7, 2, 1], [11, 4, 9, 6]])


def test_loop_decoder_with_remat_sows_every_layer():
    model = LoopDecoder(nnx.Rngs(0))
    served, adapters = serve(model, decoder_rules)
    assert len(adapters[0].weights) == 1 + 6 * LAYERS
    check(nnx.jit(forward)(served, TOKENS), model, adapters, IDX, TOKENS)
    # Each block sowed inside `nnx.remat`; the values reached the served module.
    for e, i in enumerate(IDX):
        ref = nnx.clone(model) if i < 0 else np_merged(model, adapters[i], RANKS[i])
        ref(TOKENS[e : e + 1])  # plain NNX, eager: sows into `ref`
        for blk, ref_blk in zip(served.blocks, ref.blocks):
            np.testing.assert_allclose(
                blk.resid.get_value()[0][e], ref_blk.resid.get_value()[0][0], **TOL
            )


@pytest.mark.parametrize(
    "remat, jit", [(True, None), (True, jax.jit), (True, nnx.jit), (False, nnx.jit)]
)
def test_scan_decoder(remat, jit):
    model = ScanDecoder(nnx.Rngs(0), remat=remat)
    rules = lambda r: decoder_rules(r, stacked=True)  # noqa: E731
    served, adapters = serve(model, rules)
    lay = {m.path: m.layout for m in lx.match_rules(model, rules(2))}
    assert lay["blocks/attn/query/kernel/value"].stack_axes == (0,)
    assert lay["blocks/attn/out/kernel/value"].in_axes == (1, 2)
    weights = {p: v.get_raw_value() for p, v in nnx.to_flat_state(nnx.state(served))}
    f = forward if jit is None else jit(forward)
    check(f(served, TOKENS), model, adapters, IDX, TOKENS)
    if jit is None:
        # nnx.scan hands the scanned layers back: the adapted weights come back as
        # the very same arrays, not restacked copies (so nothing is written back).
        after = {p: v.get_raw_value() for p, v in nnx.to_flat_state(nnx.state(served))}
        for p, w in weights.items():
            if isinstance(w, lx.BatchedLoraArray):
                assert after[p] is w, p


def test_scan_decoder_gradients_reach_every_layer():
    model = ScanDecoder(nnx.Rngs(0))
    adapter = random_adapter(model, decoder_rules(2, stacked=True), 0)

    def loss(adapter):
        served = lx.loraify(model, adapter, jnp.zeros(4, jnp.int32))
        return jnp.sum(forward(served, TOKENS) ** 2)

    def ref_loss(adapter):
        # The same model with the adapter merged in JAX, differentiable.
        layouts = {lay.path: lay for lay in adapter.layouts}
        updates = []
        for path, var in nnx.to_flat_state(nnx.state(model)):
            key = "/".join(map(str, path)) + "/value"
            if key in adapter.weights:
                lay = layouts[key]
                a, b = adapter.weights[key]
                letters = "stuvw"[: len(lay.stack_axes)]
                ins = "ijk"[: len(lay.in_axes)]
                outs = "opq"[: len(lay.out_axes)]
                d = jnp.einsum(
                    f"{letters}{ins}r,{letters}r{outs}->{letters}{ins}{outs}", a, b
                )
                order = (*lay.stack_axes, *lay.in_axes, *lay.out_axes)
                d = jnp.transpose(d, np.argsort(order))
                updates.append((path, var[...] + (ALPHA / 2) * d))
        ref = nnx.clone(model)
        nnx.update(ref, nnx.from_flat_state(updates))
        return jnp.sum(ref(TOKENS) ** 2)

    got = jax.jit(jax.grad(loss))(adapter)
    want = jax.jit(jax.grad(ref_loss))(adapter)
    for path, (ga, gb) in got.weights.items():
        wa, wb = want.weights[path]
        np.testing.assert_allclose(ga, wa, rtol=2e-3, atol=2e-3 * np.abs(wa).max())
        np.testing.assert_allclose(gb, wb, rtol=2e-3, atol=2e-3 * np.abs(wb).max())
        if path.startswith("blocks/"):  # every layer of the stack gets a gradient
            assert all(np.abs(ga[layer]).max() > 0 for layer in range(LAYERS)), path


# --- sow, state written back -------------------------------------------------


class Sower(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.up(x))
        self.sow(nnx.Intermediate, "hidden", h)
        return self.down(h)


def sown_reference(module, adapters, x):
    """The hidden activations each row's reference model sows."""

    def call(m, x):
        m(x)
        return nnx.pop(m, nnx.Intermediate)["hidden"].get_value()[0]

    return reference(module, adapters, IDX, x, call)


@pytest.mark.parametrize("style", ["function", "module", "method", "nnx.jit"])
def test_sow_is_written_back(style):
    model = Sower(nnx.Rngs(0))
    served, adapters = serve(model, kernel_rules)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, D))
    if style == "function":
        out = forward(served, x)
    elif style == "module":
        out = lx.quaxify(served)(x)
    elif style == "method":
        out = lx.quaxify(served.__call__)(x)
    else:
        out = nnx.jit(forward)(served, x)
    check(out, model, adapters, IDX, x)
    (hidden,) = nnx.pop(served, nnx.Intermediate)["hidden"].get_value()
    np.testing.assert_allclose(hidden, sown_reference(model, adapters, x), **TOL)
    assert not hasattr(model, "hidden")  # the base module is untouched


def test_sow_returned_from_the_function():
    model = Sower(nnx.Rngs(0))
    served, adapters = serve(model, kernel_rules)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, D))

    @jax.jit
    @lx.quaxify
    def run(m, x):
        y = m(x)
        return y, nnx.pop(m, nnx.Intermediate)

    out, inter = run(served, x)
    check(out, model, adapters, IDX, x)
    np.testing.assert_allclose(
        inter["hidden"].get_value()[0], sown_reference(model, adapters, x), **TOL
    )
    assert not hasattr(served, "hidden")  # popped inside: nothing to write back


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_sow_with_nnx_capture(where):
    model = Sower(nnx.Rngs(0))
    served, adapters = serve(model, kernel_rules)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, D))
    if where == "inside":
        run = jax.jit(lx.quaxify(nnx.capture(call_model, nnx.Intermediate)))
    else:
        run = nnx.jit(nnx.capture(lx.quaxify(call_model), nnx.Intermediate))
    out, inter = run(served, x)
    check(out, model, adapters, IDX, x)
    np.testing.assert_allclose(
        inter["hidden"].get_value()[0], sown_reference(model, adapters, x), **TOL
    )


def test_closed_over_module_under_jax_jit_says_what_to_do():
    model = Sower(nnx.Rngs(0))
    served, _ = serve(model, kernel_rules)
    with pytest.raises(flax_errors.TraceContextError, match=r"Pass it as an argument"):
        jax.jit(lx.quaxify(served))(jnp.ones((4, D)))
    # Without state to write back, a closed-over module serves as before.
    layer = nnx.Linear(D, 5, rngs=nnx.Rngs(0))
    served, adapters = serve(layer, kernel_rules)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, D))
    check(jax.jit(lx.quaxify(served))(x), layer, adapters, IDX, x)


def test_rng_state_is_carried():
    """Dropout draws from the module's `nnx.Rngs`; the count advances as in NNX."""

    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, D, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.lin(x))

    model = Drop(nnx.Rngs(0))
    served, _ = serve(model, kernel_rules)
    x = jnp.ones((4, D))
    first = nnx.jit(forward)(served, x)
    second = nnx.jit(forward)(served, x)
    assert not np.array_equal(first == 0, second == 0)


# --- nnx.jit without retracing, merge, training -------------------------------


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.mix = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(jax.nn.gelu(self.mix(self.embed(tokens))))


def tiny_rules(rank):
    return [
        lx.LoraRule(r"mix/kernel", rank=rank, alpha=ALPHA),
        lx.LoraRule(r"embed/embedding", rank=rank, alpha=ALPHA),
    ]


def test_nnx_jit_new_indices_do_not_retrace():
    traces = []

    @nnx.jit
    def run(m, x):
        traces.append(1)
        return forward(m, x)

    model = TinyLM(nnx.Rngs(0))
    served, adapters = serve(model, tiny_rules)
    run(served, TOKENS)
    other = np.array([1, -1, 0, 0])
    out = run(lx.with_indices(served, jnp.asarray(other)), TOKENS)
    assert len(traces) == 1
    check(out, model, adapters, other, TOKENS)


@pytest.mark.parametrize("which", ["scan_decoder", "einsum"])
def test_merge_matches_numpy(which):
    if which == "scan_decoder":
        model = ScanDecoder(nnx.Rngs(0), remat=False)
        rules = decoder_rules(RANKS[1], stacked=True)
        x = TOKENS
    else:
        model = nnx.Einsum("btd,dnh->btnh", (D, HEADS, 4), rngs=nnx.Rngs(0))
        rules = [
            lx.LoraRule(
                "kernel", rank=RANKS[1], alpha=ALPHA, in_axes=(0,), out_axes=(1, 2)
            )
        ]
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, D))
    adapter = random_adapter(model, rules, 3)
    merged = lx.merge(model, adapter)
    want = np_merged(model, adapter, RANKS[1])
    assert type(merged) is type(model)
    for (p, v), (q, u) in zip(
        nnx.to_flat_state(nnx.state(merged)), nnx.to_flat_state(nnx.state(want))
    ):
        assert p == q
        np.testing.assert_allclose(v[...], u[...], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged(x), want(x), **TOL)
    # Merging a served (loraified) module folds into its base weights.
    served = lx.loraify(model, adapter)
    np.testing.assert_allclose(lx.merge(served, adapter)(x), want(x), **TOL)


class Tuned(nnx.Module):
    """A frozen base model and one adapter whose factors are `nnx.LoRAParam`s."""

    def __init__(self, base, adapter):
        self.base = base
        leaves, self.treedef = jax.tree.flatten(adapter)
        self.factors = nnx.List([nnx.LoRAParam(x) for x in leaves])

    def adapter(self) -> lx.Adapter:
        return jax.tree.unflatten(self.treedef, [f[...] for f in self.factors])

    def __call__(self, tokens):
        served = lx.loraify(self.base, self.adapter(), jnp.zeros(len(tokens), int))
        return forward(served, tokens)


def test_train_with_nnx_optimizer():
    base = TinyLM(nnx.Rngs(0))
    rules = tiny_rules(4)
    model = Tuned(base, lx.init_adapter(base, rules, key=jax.random.PRNGKey(1)))
    before = jax.tree.map(np.asarray, nnx.state(model))
    optimizer = nnx.Optimizer(model, optax.adam(1e-1), wrt=nnx.LoRAParam)
    targets = (TOKENS + 1) % VOCAB

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            logits = model(TOKENS)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, targets
            ).mean()

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = grad_fn(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    after = jax.tree.map(np.asarray, nnx.state(model))
    flat_before = dict(nnx.to_flat_state(before))
    for path, v in nnx.to_flat_state(after):
        same = np.array_equal(v[...], flat_before[path][...])
        assert same == (path[0] != "factors"), path
    # The trained adapter, merged in NumPy, gives the served model's logits.
    trained = model.adapter()
    served = lx.loraify(base, lx.stack_adapters([trained]), jnp.zeros(4, int))
    want = np_merged(base, trained, 4)(TOKENS)
    np.testing.assert_allclose(forward(served, TOKENS), want, **TOL)


def test_scan_returning_a_derived_layer_stacks_it():
    """A scan body that returns a LoRA array other than its own layer (here each
    layer transposed) gets one stacked array back, with a new leading stack axis."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(LAYERS, D, 5)).astype(np.float32)
    tree = {"w": jnp.asarray(w)}
    rules = lambda r: [lx.LoraRule("w", rank=r, alpha=ALPHA, stack_axes=(0,))]  # noqa: E731
    adapters = [random_adapter(tree, rules(r), seed) for seed, r in enumerate(RANKS)]
    served = lx.loraify(tree, lx.stack_adapters(adapters), jnp.asarray(IDX))
    x = rng.normal(size=(4, 5)).astype(np.float32)

    @jax.jit
    @lx.quaxify
    def run(tree, x):
        _, transposed = jax.lax.scan(lambda c, w: (c, w.T), 0.0, tree["w"])
        xs = jnp.broadcast_to(x, (LAYERS, *x.shape))  # the layer axis a batch axis
        return jnp.einsum("lbo,loi->bli", xs, transposed)  # x @ W_l.T, every layer

    dense = [w] + [
        w + (ALPHA / r) * np_delta(*ad.weights["w"], ad.layouts[0])
        for ad, r in zip(adapters, RANKS)
    ]
    want = np.stack(
        [np.einsum("o,lio->li", x[e], dense[i + 1]) for e, i in enumerate(IDX)]
    )
    np.testing.assert_allclose(run(served, x), want, **TOL)
