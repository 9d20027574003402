"""`Adapter` (one LoRA) and `AdapterStack` (many, ranks padded, ready to serve)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._alora import (
    check_invocation_tokens,
    concrete_input_ids,
    per_token,
    require_input_ids,
)
from ._array import dense
from ._errors import LoraIndexError, NonFiniteAdapterError
from ._indices import out_of_range_message
from ._paths import flatten_with_paths
from ._served import ServedAdapters, served_indices, stacked_rows
from ._targeting import LeafLayout, LoraRule, lora_scale, match_rules

BASE = "__base__"

# The variants' per-leaf vectors (fields of Adapter and AdapterStack, in the order
# of AdapterStack.variants' flags), each over the leaf's out- or in-features.
VECTOR_FIELDS = {"magnitudes": "out", "in_scales": "in", "out_scales": "out"}


def _no_vectors() -> dict[str, dict[str, Array]]:
    return {field: {} for field in VECTOR_FIELDS}


class Adapter(eqx.Module):
    """One adapter: an `(a, b)` pair per adapted leaf, and the vectors of the LoRA
    variants (DoRA, IA3) where it has them.

    A pytree whose array leaves are exactly its trainable parameters (the A and B
    matrices, DoRA magnitudes, IA3 vectors), so `jax.tree.map`, `eqx.partition`,
    optax and orbax work on it directly. Ranks, alphas and layouts are static
    metadata.

    For an input `x` of a leaf `W` (in-features `in`, out-features `out`), the
    adapted product is

        y = ((x ⊙ h) (W + s·A B)) ⊙ g

    with `s = alpha / rank` (`alpha / sqrt(rank)` for rsLoRA), `h = in_scales[path]`
    (1 where absent), and `g = out_scales[path]` (1 where absent) times, for a DoRA
    leaf, `magnitudes[path] / ‖W + s·A B‖` (the norm over the in-axes of each
    out-feature, with no gradient through it, as in PEFT). So a plain LoRA leaf
    has only `(a, b)`; an IA3 leaf has rank 0 and one vector (`out_scales` for
    PEFT's `k`/`v` targets, `in_scales` for its `feedforward_modules`); a DoRA leaf
    has `(a, b)` and a magnitude. A VeRA leaf (`vera`) holds in `weights` its
    frozen random projections `(A, B)` and in `vera` its trainable vectors
    `(d, b)`: it is the LoRA `(A·diag(d), B·diag(b))` with scale 1 (`lora_factors`),
    and no gradient reaches the projections.

    **Fields:**

    - `weights`: dict from each adapted '/'-joined path to `(a, b)`, with
        `a: (*stack, *in, rank)` and `b: (*stack, rank, *out)`.
    - `layouts`: the `LeafLayout` of each path (its shape and in/out/stack axes).
    - `ranks`, `alphas`: per path, in the order of `layouts`.
    - `use_rslora`: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    - `lookup_only`: per path, True where the update applies only when the leaf is
        read along its in-axes (row lookups `E[tokens]`, `x @ W`), and a read along
        its out-axes (a tied output head `h @ E.T`) sees the base weight. That is
        PEFT's embedding LoRA, which changes the embedding module and not a head
        tied to its table; [`lorax_arrays.load_peft_adapter`][] sets it for
        embeddings. Empty (the default) means False everywhere.
    - `head_only`: per path, True where the update applies only when the leaf is
        read along its out-axes (a tied output head `h @ E.T`), and lookups
        `E[tokens]` see the base table: PEFT's LoRA on an `lm_head` tied to the
        embedding table, which changes the head and not the embedding.
        [`lorax_arrays.load_peft_adapter`][] sets it when `key_map` sends a head
        module onto the table. A plain LoRA leaf only; never with `lookup_only`.
        Empty (the default) means False everywhere.
    - `invocation_tokens`: an activated LoRA's (aLoRA, PEFT's
        `alora_invocation_tokens`) invocation sequence: the adapter applies to a
        request only from the last occurrence of these tokens on, and the
        tokens before it see the base model. `None` (the default): a plain
        adapter. Stacks and banks place it per token from the request's
        `input_ids` (`stack.indices(names, input_ids=...)`).
    - `magnitudes`: DoRA's magnitude vector per path, `(*stack, *out)`; a path
        here is a DoRA leaf.
    - `in_scales`: IA3's vector on the input per path, `(*stack, *in)`.
    - `out_scales`: IA3's vector on the output per path, `(*stack, *out)`.
    - `vera`: VeRA's vectors per path, `(d, b)` with `d: (*stack, rank)` and
        `b: (*stack, *out)`; a path here is a VeRA leaf.
    - `bias_deltas`: dict from the path of a 1-D bias leaf of the tree to the
        adapter's update to it, `(out,)`: served bias `b + bias_deltas[path]`.
        The bias of a module the adapter trained in full (PEFT's
        `modules_to_save`, a classification head), whose weight is an ordinary
        full-rank LoRA leaf (scale 1); see
        [`lorax_arrays.load_peft_adapter`][]. Empty (the default) for a plain
        adapter.
    """

    weights: dict[str, tuple[Array, Array]]
    layouts: tuple[LeafLayout, ...] = eqx.field(static=True)
    ranks: tuple[int, ...] = eqx.field(static=True)
    alphas: tuple[float, ...] = eqx.field(static=True)
    use_rslora: tuple[bool, ...] = eqx.field(static=True)
    lookup_only: tuple[bool, ...] = eqx.field(static=True, default=())
    magnitudes: dict[str, Array] = eqx.field(default_factory=dict)
    in_scales: dict[str, Array] = eqx.field(default_factory=dict)
    out_scales: dict[str, Array] = eqx.field(default_factory=dict)
    vera: dict[str, tuple[Array, Array]] = eqx.field(default_factory=dict)
    head_only: tuple[bool, ...] = eqx.field(static=True, default=())
    invocation_tokens: tuple[int, ...] | None = eqx.field(static=True, default=None)
    bias_deltas: dict[str, Array] = eqx.field(default_factory=dict)

    def __post_init__(self):
        if not self.lookup_only:
            self.lookup_only = tuple(False for _ in self.layouts)
        if not self.head_only:
            self.head_only = tuple(False for _ in self.layouts)
        self.invocation_tokens = check_invocation_tokens(
            self.invocation_tokens, "Adapter"
        )

    def __check_init__(self):
        for name in ("lookup_only", "head_only"):
            if len(getattr(self, name)) != len(self.layouts):
                raise ValueError(
                    f"Adapter: {len(getattr(self, name))} {name} flags for "
                    f"{len(self.layouts)} leaves."
                )
        for lay, lk, hd in zip(self.layouts, self.lookup_only, self.head_only):
            if lk and hd:
                raise ValueError(
                    f"Adapter: {lay.path!r} is both lookup_only and head_only: the "
                    "update would apply to no read of the leaf."
                )
            if hd and self.kind(lay.path) != "lora":
                raise ValueError(
                    f"Adapter: {lay.path!r} is head_only (a tied head's update) and "
                    f"a {self.kind(lay.path)} leaf; head-only updates are plain LoRA."
                )
        paths = [lay.path for lay in self.layouts]
        if set(paths) != set(self.weights) or len(paths) != len(self.weights):
            raise ValueError(
                f"Adapter: weights have paths {sorted(self.weights)} but layouts "
                f"have {sorted(paths)}."
            )
        for lay, r in zip(self.layouts, self.ranks):
            a, b = self.weights[lay.path]
            for name, x in (("a", a), ("b", b)):
                if not jnp.issubdtype(x.dtype, jnp.inexact):
                    raise TypeError(
                        f"Adapter: `{name}` at {lay.path!r} has dtype {x.dtype}; "
                        "adapter factors are floating point (an integer array here "
                        "is a corrupt or mislabelled file, not weights)."
                    )
            exp_a = (*lay.stack_shape, *lay.in_shape, r)
            exp_b = (*lay.stack_shape, r, *lay.out_shape)
            if tuple(a.shape) != exp_a or tuple(b.shape) != exp_b:
                raise ValueError(
                    f"Adapter: at {lay.path!r} expected a{exp_a} and b{exp_b}, got "
                    f"a{tuple(a.shape)} and b{tuple(b.shape)}."
                )
        by_path = {lay.path: lay for lay in self.layouts}
        for field, group in VECTOR_FIELDS.items():
            for path, v in getattr(self, field).items():
                lay = by_path.get(path)
                if lay is None:
                    raise ValueError(
                        f"Adapter: `{field}` has a vector at {path!r}, which is not "
                        f"one of the adapter's leaves {sorted(by_path)}."
                    )
                part = lay.in_shape if group == "in" else lay.out_shape
                want = (*lay.stack_shape, *part)
                if tuple(v.shape) != want:
                    raise ValueError(
                        f"Adapter: `{field}[{path!r}]` has shape {tuple(v.shape)}; "
                        f"expected (*stack, *{group}) = {want}."
                    )
        for path, (d, b) in self.vera.items():
            lay = by_path.get(path)
            if lay is None:
                raise ValueError(
                    f"Adapter: `vera` has vectors at {path!r}, which is not one of "
                    f"the adapter's leaves {sorted(by_path)}."
                )
            r = self.ranks[self.paths.index(path)]
            want_d, want_b = (*lay.stack_shape, r), (*lay.stack_shape, *lay.out_shape)
            if tuple(d.shape) != want_d or tuple(b.shape) != want_b:
                raise ValueError(
                    f"Adapter: VeRA vectors at {path!r} have shapes d"
                    f"{tuple(d.shape)}, b{tuple(b.shape)}; expected d{want_d} "
                    f"(*stack, rank) and b{want_b} (*stack, *out)."
                )
            if path in self.magnitudes or path in self.in_scales:
                raise ValueError(
                    f"Adapter: {path!r} is a VeRA leaf and also has DoRA or IA3 "
                    "vectors; one kind per leaf."
                )
        for path, v in self.bias_deltas.items():
            if not isinstance(path, str) or v.ndim != 1:
                raise ValueError(
                    f"Adapter: `bias_deltas[{path!r}]` has shape {tuple(v.shape)}; "
                    "expected a '/'-joined path to a (out,) update of a bias leaf."
                )
            if not jnp.issubdtype(v.dtype, jnp.inexact):
                raise TypeError(
                    f"Adapter: `bias_deltas[{path!r}]` has dtype {v.dtype}; bias "
                    "updates are floating point."
                )
            if path in by_path:
                raise ValueError(
                    f"Adapter: {path!r} is both a LoRA leaf and a bias leaf."
                )
        for path in self.magnitudes:
            if self.ranks[self.paths.index(path)] == 0:
                raise ValueError(
                    f"Adapter: {path!r} has a DoRA magnitude but rank 0: DoRA is a "
                    "LoRA (A, B) with a magnitude."
                )

    @property
    def paths(self) -> tuple[str, ...]:
        """The adapted paths, in order."""
        return tuple(lay.path for lay in self.layouts)

    def kind(self, path: str) -> str:
        """What the adapter does at `path`: `"lora"`, `"dora"`, `"vera"`, `"ia3"`
        (rank 0 with a vector) or `"lora+ia3"` (both)."""
        if path in self.magnitudes:
            return "dora"
        if path in self.vera:
            return "vera"
        vectors = path in self.in_scales or path in self.out_scales
        lora = self.ranks[self.paths.index(path)] > 0
        return ("lora+ia3" if lora else "ia3") if vectors else "lora"

    def lora_factors(self, path: str) -> tuple[Array, Array]:
        """The `(a, b)` that the leaf at `path` is served with: `weights[path]`,
        or for a VeRA leaf its projections scaled by its vectors,
        `(A·diag(d), B·diag(b))`, with no gradient to the projections."""
        a, b = self.weights[path]
        if path not in self.vera:
            return a, b
        d, bvec = self.vera[path]
        lay = self.layouts[self.paths.index(path)]
        ns, ni = len(lay.stack_shape), len(lay.in_shape)
        a = jax.lax.stop_gradient(a) * jnp.reshape(d, (*d.shape[:ns], *(1,) * ni, -1))
        b = jax.lax.stop_gradient(b) * jnp.expand_dims(bvec, ns)
        return a, b

    def fingerprint(self) -> str:
        """A content hash of this adapter: every array's dtype, shape and bytes
        and all of its metadata (paths, layouts, ranks, alphas, rsLoRA, lookup
        flags, which variant each leaf is).

        Equal for equal adapters wherever they come from (`lx.save_adapter` /
        `lx.load_adapter` round trips keep it: checkpoints store it and verify
        it on load), different as soon as one value differs. Use it to key
        caches by adapter identity.

        **Returns:**

        A hex SHA-256 digest, prefixed `"sha256:"`.
        """
        h = hashlib.sha256(b"lorax_arrays.Adapter/1\0")

        def put(label: str, x: Any) -> None:
            arr = np.ascontiguousarray(np.asarray(x))
            head = f"{label}|{arr.dtype.str}|{arr.shape}\0".encode()
            h.update(head)
            h.update(arr.tobytes())

        for j, lay in enumerate(self.layouts):
            meta = (
                lay.path,
                lay.shape,
                lay.in_axes,
                lay.out_axes,
                lay.stack_axes,
                self.ranks[j],
                repr(float(self.alphas[j])),
                bool(self.use_rslora[j]),
                bool(self.lookup_only[j]),
                self.kind(lay.path),
            )
            if self.head_only[j]:  # only when set: older fingerprints stay valid
                meta = (*meta, "head_only")
            if j == 0 and self.invocation_tokens is not None:
                meta = (*meta, ("invocation_tokens", self.invocation_tokens))
            h.update(repr(meta).encode() + b"\0")
            a, b = self.weights[lay.path]
            put("a", a)
            put("b", b)
            for field in ("magnitudes", "in_scales", "out_scales"):
                if lay.path in getattr(self, field):
                    put(field, getattr(self, field)[lay.path])
            if lay.path in self.vera:
                put("vera_d", self.vera[lay.path][0])
                put("vera_b", self.vera[lay.path][1])
        for path in sorted(self.bias_deltas):  # only when set: older ones hold
            h.update(repr(("bias_delta", path)).encode() + b"\0")
            put("bias_delta", self.bias_deltas[path])
        return "sha256:" + h.hexdigest()

    def check_finite(self, what: str = "Adapter") -> None:
        """Raises `NonFiniteAdapterError` if any factor, vector or alpha of this
        adapter is NaN or infinite, naming the leaf and the field. Arrays being
        traced (inside `jit`) are not checked: their values are unknown.

        **Arguments:**

        - `what`: who is asking, for the message (`"stack_adapters: adapter
            'a'"`, say).
        """
        for j, lay in enumerate(self.layouts):
            if not math.isfinite(self.alphas[j]):
                raise NonFiniteAdapterError(
                    f"{what}: the alpha at {lay.path!r} is {self.alphas[j]}; the "
                    "adapter is corrupt (check its config's `lora_alpha`)."
                )
        fields = [("a", "weights", 0), ("b", "weights", 1)]
        fields += [(f, f, None) for f in ("magnitudes", "in_scales", "out_scales")]
        fields += [("VeRA d", "vera", 0), ("VeRA b", "vera", 1)]
        fields += [("bias delta", "bias_deltas", None)]
        checks = []
        for role, field, part in fields:
            for path, value in getattr(self, field).items():
                x = value if part is None else value[part]
                if not isinstance(x, jax.core.Tracer):
                    checks.append((role, path, x))
        # On the host, in NumPy: eager JAX would compile a small program for every
        # new shape, and adapters are small next to what loading them reads.
        for role, path, x in checks:
            if not np.isfinite(np.asarray(x)).all():
                raise NonFiniteAdapterError(
                    f"{what}: `{role}` at {path!r} holds NaN or infinite values; "
                    "the adapter is corrupt or diverged. It would serve NaN rows "
                    "(never other tenants' rows, but never a right answer either): "
                    "retrain or reload it."
                )

    def scale(self, path: str) -> float:
        """`alpha / rank` (or `alpha / sqrt(rank)`) of the leaf at `path`."""
        j = self.paths.index(path)
        return lora_scale(self.alphas[j], self.ranks[j], self.use_rslora[j])


def init_adapter(
    tree: Any,
    rules: LoraRule | Sequence[LoraRule],
    *,
    key: PRNGKeyArray,
    dtype: Any = None,
) -> Adapter:
    """A new adapter for the leaves of `tree` that `rules` match.

    `a` is drawn as in PEFT (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, Kaiming-uniform)
    and `b` starts at zero, so a new adapter leaves the model unchanged. So do the
    variants a rule asks for (`LoraRule(..., variant=...)`), initialised as PEFT
    does: a DoRA leaf's magnitude is the weight's norm over its in-axes per
    out-feature, an IA3 vector is 1.

    **Arguments:**

    - `tree`: the model or parameter tree (see [`lorax_arrays.match_rules`][]).
    - `rules`: a `LoraRule` or a sequence of them; the first match wins.
    - `key`: a JAX PRNG key.
    - `dtype`: the adapter's dtype; defaults to each weight's own dtype.

    **Returns:**

    An [`lorax_arrays.Adapter`][].
    """
    matches = match_rules(tree, rules)
    a_shapes = [(*m.layout.stack_shape, *m.layout.in_shape, m.rank) for m in matches]
    # One draw for the whole adapter, split afterwards: eager JAX would compile a
    # random kernel per distinct shape, which dominates setting up many adapters.
    # Split on the host when the key is concrete, with traced slices under a
    # transform (`jax.jit`, `eqx.filter_eval_shape`).
    sizes = [math.prod(shape) for shape in a_shapes]
    draw = jr.uniform(key, (max(sum(sizes), 1),), jnp.float32, -1.0, 1.0)
    xp = jnp if isinstance(draw, jax.core.Tracer) else np
    draw = draw if xp is jnp else np.asarray(draw)
    offsets = np.cumsum([0, *sizes])
    weights = {}
    for m, shape, lo, hi in zip(matches, a_shapes, offsets[:-1], offsets[1:]):
        lay = m.layout
        dt = np.dtype(m.dtype if dtype is None else dtype)
        bound = 1.0 / math.sqrt(math.prod(lay.in_shape))
        a = jnp.asarray((draw[lo:hi] * bound).reshape(shape).astype(dt))
        b = jnp.asarray(xp.zeros((*lay.stack_shape, m.rank, *lay.out_shape), dt))
        weights[lay.path] = (a, b)
    vectors = _init_variants(tree, matches, dtype, xp)
    vera = _init_vera(matches, weights, dtype, key)
    return Adapter(
        weights=weights,
        layouts=tuple(m.layout for m in matches),
        ranks=tuple(m.rank for m in matches),
        alphas=tuple(
            float(m.rank) if m.rule.variant == "vera" else m.alpha for m in matches
        ),
        use_rslora=tuple(
            False if m.rule.variant == "vera" else m.use_rslora for m in matches
        ),
        vera=vera,
        **vectors,
    )


def _init_vera(matches, weights, dtype, key) -> dict[str, tuple[Array, Array]]:
    """VeRA's leaves as PEFT makes them: one pair of random projections for all
    of them, `A (max in, r)` and `B (r, max out)` (Kaiming-uniform as PEFT's,
    bounds `1/sqrt(max in)` and `1/sqrt(r)`), each leaf taking the top-left part
    (its flattened in- and out-features), the same in every stack entry; `d` starts
    at 0.1 and `b` at 0, so the model is unchanged. Replaces `weights` there with
    the projections."""
    veras = [m for m in matches if m.rule.variant == "vera"]
    if not veras:
        return {}
    ranks = {m.rank for m in veras}
    if len(ranks) > 1:
        raise ValueError(
            f"init_adapter: VeRA leaves share one pair of projections, so one rank; "
            f"the rules give ranks {sorted(ranks)}."
        )
    (r,) = ranks
    d_in = max(math.prod(m.layout.in_shape) for m in veras)
    d_out = max(math.prod(m.layout.out_shape) for m in veras)
    k_a, k_b = jr.split(jr.fold_in(key, 0x7E7A))
    proj_a = jr.uniform(k_a, (d_in, r), jnp.float32, -1.0, 1.0) / math.sqrt(d_in)
    proj_b = jr.uniform(k_b, (r, d_out), jnp.float32, -1.0, 1.0) / math.sqrt(r)
    vera = {}
    for m in veras:
        lay = m.layout
        dt = np.dtype(m.dtype if dtype is None else dtype)
        n_in, n_out = math.prod(lay.in_shape), math.prod(lay.out_shape)
        stack = lay.stack_shape
        a = proj_a[:n_in].reshape(*lay.in_shape, r).astype(dt)
        b = proj_b[:, :n_out].reshape(r, *lay.out_shape).astype(dt)
        a = jnp.broadcast_to(a, (*stack, *a.shape))
        b = jnp.broadcast_to(b, (*stack, *b.shape))
        weights[lay.path] = (a, b)
        vera[lay.path] = (
            jnp.full((*stack, r), 0.1, dt),
            jnp.zeros((*stack, *lay.out_shape), dt),
        )
    return vera


def _init_variants(tree: Any, matches, dtype, xp) -> dict[str, dict[str, Array]]:
    """The variants' vectors at their initial values (see `init_adapter`)."""
    vectors = _no_vectors()
    if all(m.rule.variant == "lora" for m in matches):
        return vectors
    leaves = dict(flatten_with_paths(tree)[0])
    for m in matches:
        lay, variant = m.layout, m.rule.variant
        dt = np.dtype(m.dtype if dtype is None else dtype)
        if variant == "dora":
            w = dense(leaves[lay.path])
            norm = jnp.sqrt(
                jnp.sum(jnp.square(w.astype(jnp.float32)), axis=lay.in_axes)
            )
            # The remaining axes are the stack axes then the out-axes, in w's
            # order; the vector is laid out as (*stack, *out) in the layout's.
            kept = [ax for ax in range(len(lay.shape)) if ax not in lay.in_axes]
            order = [kept.index(ax) for ax in (*lay.stack_axes, *lay.out_axes)]
            vectors["magnitudes"][lay.path] = jnp.transpose(norm, order).astype(dt)
        elif variant == "ia3":
            ones = xp.ones((*lay.stack_shape, *lay.out_shape), dt)
            vectors["out_scales"][lay.path] = jnp.asarray(ones)
        elif variant == "ia3_feedforward":
            ones = xp.ones((*lay.stack_shape, *lay.in_shape), dt)
            vectors["in_scales"][lay.path] = jnp.asarray(ones)
    return vectors


class AdapterStack(eqx.Module):
    """Many adapters stacked for serving in one batch, ranks zero-padded.

    Build it with [`lorax_arrays.stack_adapters`][]; pass it to
    [`lorax_arrays.loraify`][].

    **Fields:**

    - `weights`: dict from path to `(a, b)`, `a: (*stack, n_adapters, *in, rank)`,
        `b: (*stack, n_adapters, rank, *out)` with `rank` the largest at that path.
    - `scales`: dict from path to `(n_adapters,)` scales; 0 for an adapter that
        does not adapt that path.
    - `layouts`: the `LeafLayout` of each path.
    - `ranks`: per path, each adapter's own rank (0 where it has none).
    - `alphas`, `use_rslora`, `lookup_only`, `head_only`: per path, per adapter
        (see [`lorax_arrays.Adapter`][]; empty flags mean False everywhere). A
        `head_only` adapter has scale 0 in `scales` (lookups see the base) and
        its own scale in `head_scales`.
    - `names`: optional adapter names, for
        [`AdapterStack.indices`][lorax_arrays.AdapterStack.indices].
    - `magnitudes`, `in_scales`, `out_scales`: the variants' vectors (see
        [`lorax_arrays.Adapter`][]), per path where any adapter has them, stacked
        as `(*stack, n_adapters, *out)` (`*in` for `in_scales`), 1 for adapters
        without them.
    - `variants`: per path, per adapter, `(dora, has in_scale, has out_scale)`.
    - `bias_deltas`: per bias path where any adapter has one (see
        [`lorax_arrays.Adapter`][]), `(n_adapters, out)`, 0 for adapters
        without.
    """

    weights: dict[str, tuple[Array, Array]]
    scales: dict[str, Float[Array, " n_adapters"]]
    layouts: tuple[LeafLayout, ...] = eqx.field(static=True)
    ranks: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    alphas: tuple[tuple[float, ...], ...] = eqx.field(static=True)
    use_rslora: tuple[tuple[bool, ...], ...] = eqx.field(static=True)
    names: tuple[str, ...] | None = eqx.field(static=True, default=None)
    lookup_only: tuple[tuple[bool, ...], ...] = eqx.field(static=True, default=())
    magnitudes: dict[str, Array] = eqx.field(default_factory=dict)
    in_scales: dict[str, Array] = eqx.field(default_factory=dict)
    out_scales: dict[str, Array] = eqx.field(default_factory=dict)
    variants: tuple[tuple[tuple[bool, bool, bool], ...], ...] = eqx.field(
        static=True, default=()
    )
    head_only: tuple[tuple[bool, ...], ...] = eqx.field(static=True, default=())
    invocation_tokens: tuple[tuple[int, ...] | None, ...] = eqx.field(
        static=True, default=()
    )
    bias_deltas: dict[str, Array] = eqx.field(default_factory=dict)

    def __post_init__(self):
        if not self.invocation_tokens:
            self.invocation_tokens = (None,) * self.n_adapters
        self.invocation_tokens = tuple(
            check_invocation_tokens(t, "AdapterStack") for t in self.invocation_tokens
        )
        if not self.lookup_only:
            self.lookup_only = tuple(tuple(False for _ in r) for r in self.ranks)
        if not self.head_only:
            self.head_only = tuple(tuple(False for _ in r) for r in self.ranks)
        if not self.variants:
            none = (False, False, False)
            self.variants = tuple(tuple(none for _ in r) for r in self.ranks)

    def head_scales(self, path: str) -> Float[Array, " n_adapters"]:
        """The scales for reading `path` along its out-axes (a tied output head):
        `scales[path]`, with 0 for adapters whose update is `lookup_only` there,
        and their own scale for `head_only` adapters (0 in `scales`)."""
        j = self.paths.index(path)
        keep = np.asarray([not f for f in self.lookup_only[j]], np.float32)
        heads = self.scales[path] * keep
        if any(self.head_only[j]):
            own = [
                lora_scale(al, r, rs) if h else 0.0
                for al, r, rs, h in zip(
                    self.alphas[j], self.ranks[j], self.use_rslora[j], self.head_only[j]
                )
            ]
            heads = heads + np.asarray(own, np.float32)
        return heads

    def served(
        self, indices: Int[ArrayLike, ...] | None = None, *, compact: bool = False
    ) -> ServedAdapters:
        """What `lx.loraify` serves from this stack, with `indices` (which adapter
        each example or token uses, `-1` for the base model; or `None`, to set
        later): one pytree to pass into a jitted step, which calls
        `lx.loraify(tree, served)` inside (see [`lorax_arrays.ServedAdapters`][]).

        **Arguments:**

        - `indices`: `(batch,)`, `(batch, seq)`, a scalar, or `None`.
        - `compact`: refused: a stack holds exactly the adapters it was given
            (compacting is for an `AdapterBank`'s slots).

        **Returns:**

        A [`lorax_arrays.ServedAdapters`][].
        """
        if compact:
            raise ValueError(
                "loraify(..., compact=True) serves from an AdapterBank; a stack "
                "holds exactly the adapters it was given already."
            )
        n = self.n_adapters
        heads = None
        if any(any(f) for f in (*self.lookup_only, *self.head_only)):
            heads = stacked_rows([self.head_scales(p) for p in self.paths])
        dora = {}
        for lay, flags in zip(self.layouts, self.variants):
            if any(f[0] for f in flags):
                dora[lay.path] = np.asarray([f[0] for f in flags], bool)
        scales = (
            stacked_rows([self.scales[p] for p in self.paths])
            if self.layouts
            else jnp.zeros((0, n), jnp.float32)
        )
        return ServedAdapters.make(
            factors=dict(self.weights),
            scales=scales,
            head_scales=heads,
            in_scales=dict(self.in_scales),
            out_scales=dict(self.out_scales),
            magnitudes=dict(self.magnitudes),
            dora=dora,
            generations=None,
            indices=served_indices(indices, n, None),
            layouts=self.layouts,
            bias_deltas=dict(self.bias_deltas),
        )

    @property
    def n_adapters(self) -> int:
        """How many adapters are stacked."""
        return len(self.ranks[0]) if self.ranks else 0

    def __len__(self) -> int:
        return self.n_adapters

    @property
    def paths(self) -> tuple[str, ...]:
        """The adapted paths, in order."""
        return tuple(lay.path for lay in self.layouts)

    def __getitem__(self, i: int | str) -> Adapter:
        """Adapter `i` (an int, or a name), with its padding removed."""
        i = self._position(i)
        weights, layouts, ranks, alphas, rs, lk, hd = {}, [], [], [], [], [], []
        vectors = _no_vectors()
        for j, lay in enumerate(self.layouts):
            r = self.ranks[j][i]
            path = lay.path
            ns = len(lay.stack_axes)
            own = dict(zip(VECTOR_FIELDS, self.variants[j][i]))
            if r == 0 and not any(own.values()):
                continue
            for field, mine in own.items():
                if mine:
                    vectors[field][path] = jnp.take(getattr(self, field)[path], i, ns)
            a, b = self.weights[path]
            a_i = jnp.take(a, i, axis=ns)[..., :r]
            b_i = jax.lax.slice_in_dim(jnp.take(b, i, axis=ns), 0, r, axis=ns)
            weights[path] = (a_i, b_i)
            layouts.append(lay)
            ranks.append(r)
            alphas.append(self.alphas[j][i])
            rs.append(self.use_rslora[j][i])
            lk.append(self.lookup_only[j][i])
            hd.append(self.head_only[j][i])
        bias_deltas = {}
        for path, d in self.bias_deltas.items():
            row = d[i]
            if isinstance(row, jax.core.Tracer) or np.any(np.asarray(row) != 0):
                bias_deltas[path] = row
        return Adapter(
            weights,
            tuple(layouts),
            tuple(ranks),
            tuple(alphas),
            tuple(rs),
            tuple(lk),
            head_only=tuple(hd),
            invocation_tokens=self.invocation_tokens[i],
            bias_deltas=bias_deltas,
            **vectors,
        )

    def _position(self, i: int | str) -> int:
        if isinstance(i, str):
            if self.names is None or i not in self.names:
                raise KeyError(
                    f"No adapter named {i!r}; names are {self.names}. Give names "
                    "with `lx.stack_adapters(adapters, names=[...])`."
                )
            return self.names.index(i)
        n = self.n_adapters
        if not -n <= i < n:
            raise LoraIndexError(f"Adapter {i} out of range for {n} adapters.")
        return i % n

    def indices(
        self,
        which: Sequence[int | str | None],
        *,
        input_ids: Int[ArrayLike, "batch seq"] | None = None,
    ) -> Int[Array, " batch"] | Int[Array, "batch seq"]:
        """An int32 index vector from adapter names (or numbers), one per request.

        `None`, `-1` and `"__base__"` (PEFT's name) mean the base model alone.

        **Arguments:**

        - `which`: one entry per request.
        - `input_ids`: the requests' tokens `(batch, seq)`, needed when one of
            them uses an activated LoRA (`invocation_tokens`): its row then
            reads `-1` (the base model) before the last occurrence of the
            invocation sequence and the adapter from its first token on (all
            `-1` where it does not occur), as PEFT serves aLoRA. For decode
            steps after that prompt, use the last column of those indices.

        **Returns:**

        `(len(which),)` int32 indices for [`lorax_arrays.with_indices`][], or
        `(batch, seq)` per-token indices when `input_ids` is given.
        """
        n = self.n_adapters
        out = []
        for w in which:
            if w is None or (isinstance(w, str) and w == BASE):
                out.append(-1)
                continue
            if isinstance(w, str):
                out.append(self._position(w))
                continue
            if isinstance(w, (jax.Array, np.ndarray, np.generic)) and w.ndim == 0:
                is_int = jnp.issubdtype(w.dtype, jnp.integer)
                w = int(w) if is_int else w
            if isinstance(w, bool) or not isinstance(w, int):
                raise TypeError(
                    f"AdapterStack.indices: expected adapter names, ints or None, "
                    f"got {w!r} of type {type(w).__name__}."
                )
            out.append(w)
        # -1 is the base model here, so negative numbers do not count from the end
        # as they do in `stack[i]`.
        # Checked as Python ints, before int32 could wrap `2**32 + 1` to 1.
        bad = [w for w in out if not -1 <= w < n]
        if bad:
            raise LoraIndexError(out_of_range_message(bad[0], n))
        tokens = [None if w < 0 else self.invocation_tokens[w] for w in out]
        if input_ids is None:
            require_input_ids(which, tokens, "AdapterStack.indices")
            return jnp.asarray(np.asarray(out, dtype=np.int32))
        ids = concrete_input_ids(input_ids, len(out), "AdapterStack.indices")
        grid = per_token(out, ids, tokens.__getitem__, -1)
        return jnp.asarray(np.asarray(grid, dtype=np.int32).reshape(ids.shape))


def stack_adapters(
    adapters: Sequence[Adapter], *, names: Sequence[str] | None = None
) -> AdapterStack:
    """Stacks adapters for serving together, zero-padding ranks to the largest.

    Adapters may adapt different sets of leaves; where one lacks a leaf that others
    adapt, its factors there are zero (it sees the base weight at that leaf).

    **Arguments:**

    - `adapters`: the adapters, in the order their indices will refer to.
    - `names`: optional names, so requests can be mapped with
        [`AdapterStack.indices`][lorax_arrays.AdapterStack.indices].

    **Returns:**

    An [`lorax_arrays.AdapterStack`][].
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("stack_adapters: need at least one adapter.")
    for i, ad in enumerate(adapters):
        if not isinstance(ad, Adapter):
            raise TypeError(
                f"stack_adapters: item {i} is a {type(ad).__name__}, not an Adapter."
            )
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != len(adapters):
            raise ValueError(
                f"stack_adapters: {len(names)} names for {len(adapters)} adapters."
            )
        if len(set(names)) != len(names) or BASE in names:
            raise ValueError(
                f"stack_adapters: names must be distinct and not {BASE!r}: {names}."
            )
    for i, ad in enumerate(adapters):
        label = f"adapter {i}" if names is None else f"adapter {i} ({names[i]!r})"
        ad.check_finite(f"stack_adapters: {label}")
    layouts: dict[str, LeafLayout] = {}
    for i, ad in enumerate(adapters):
        for lay in ad.layouts:
            prev = layouts.setdefault(lay.path, lay)
            if not prev.compatible(lay):
                raise ValueError(
                    f"stack_adapters: adapter {i} lays out {lay.path!r} as shape "
                    f"{lay.shape}, in={lay.in_axes}, out={lay.out_axes}, "
                    f"stack={lay.stack_axes}, but an earlier adapter has shape "
                    f"{prev.shape}, in={prev.in_axes}, out={prev.out_axes}, "
                    f"stack={prev.stack_axes}. Adapters served together must be "
                    "made for the same model."
                )
    weights, scales, ranks, alphas, rs, lookup, head = {}, {}, [], [], [], [], []
    invocations = tuple(ad.invocation_tokens for ad in adapters)
    vectors = _no_vectors()
    variants = []
    for path, lay in layouts.items():
        ns = len(lay.stack_axes)
        per = [
            (ad.lora_factors(path), ad.paths.index(path))
            if path in ad.weights
            else None
            for ad in adapters
        ]
        r_each = tuple(ad.ranks[p[1]] if p else 0 for ad, p in zip(adapters, per))
        r_max = max(r_each)
        dtype = jnp.result_type(*[x for p in per if p for x in p[0]])
        a_list, b_list = [], []
        for p, r in zip(per, r_each):
            if p is None:
                a_list.append(
                    jnp.zeros((*lay.stack_shape, *lay.in_shape, r_max), dtype)
                )
                b_list.append(
                    jnp.zeros((*lay.stack_shape, r_max, *lay.out_shape), dtype)
                )
                continue
            a, b = p[0]
            a_pad = [(0, 0)] * (a.ndim - 1) + [(0, r_max - r)]
            b_pad = [(0, 0)] * b.ndim
            b_pad[ns] = (0, r_max - r)
            a_list.append(jnp.pad(a.astype(dtype), a_pad))
            b_list.append(jnp.pad(b.astype(dtype), b_pad))
        weights[path] = (jnp.stack(a_list, axis=ns), jnp.stack(b_list, axis=ns))
        al = tuple(ad.alphas[p[1]] if p else 0.0 for ad, p in zip(adapters, per))
        rsl = tuple(ad.use_rslora[p[1]] if p else False for ad, p in zip(adapters, per))
        lookup.append(
            tuple(ad.lookup_only[p[1]] if p else False for ad, p in zip(adapters, per))
        )
        hd = tuple(ad.head_only[p[1]] if p else False for ad, p in zip(adapters, per))
        head.append(hd)
        # A head-only update leaves the other reads (lookups) alone: scale 0
        # there, its own in `head_scales`.
        sc = [
            0.0 if h else lora_scale(a_, r, rs_)
            for r, a_, rs_, h in zip(r_each, al, rsl, hd)
        ]
        scales[path] = jnp.asarray(sc, jnp.float32)
        flags = []
        for field, group in VECTOR_FIELDS.items():
            have = [path in getattr(ad, field) for ad in adapters]
            flags.append(have)
            if not any(have):
                continue
            part = lay.in_shape if group == "in" else lay.out_shape
            ones = jnp.ones((*lay.stack_shape, *part), dtype)
            vectors[field][path] = jnp.stack(
                [
                    getattr(ad, field)[path].astype(dtype) if h else ones
                    for ad, h in zip(adapters, have)
                ],
                axis=ns,
            )
        variants.append(tuple(zip(*flags)))
        ranks.append(r_each)
        alphas.append(al)
        rs.append(rsl)
    return AdapterStack(
        weights=weights,
        scales=scales,
        bias_deltas=_stack_bias_deltas(adapters),
        layouts=tuple(layouts.values()),
        ranks=tuple(ranks),
        alphas=tuple(alphas),
        use_rslora=tuple(rs),
        names=names,
        lookup_only=tuple(lookup),
        variants=tuple(variants),
        head_only=tuple(head),
        invocation_tokens=invocations,
        **vectors,
    )


def _stack_bias_deltas(adapters: Sequence[Adapter]) -> dict[str, Array]:
    """Each bias path's updates, `(n_adapters, out)`, 0 for adapters without."""
    sizes: dict[str, int] = {}
    for i, ad in enumerate(adapters):
        for path, v in ad.bias_deltas.items():
            if sizes.setdefault(path, v.shape[0]) != v.shape[0]:
                raise ValueError(
                    f"stack_adapters: adapter {i} updates the bias {path!r} with "
                    f"{v.shape[0]} values, an earlier adapter with {sizes[path]}. "
                    "Adapters served together must be made for the same model."
                )
    out = {}
    for path, size in sizes.items():
        have = [ad.bias_deltas.get(path) for ad in adapters]
        dtype = jnp.result_type(*[v for v in have if v is not None])
        out[path] = jnp.stack(
            [jnp.zeros((size,), dtype) if v is None else v.astype(dtype) for v in have]
        )
    return out
