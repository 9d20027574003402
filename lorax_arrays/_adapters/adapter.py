"""`Adapter`: one LoRA (or variant) adapter for a tree's matched leaves."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._core.errors import NonFiniteAdapterError
from .alora import (
    check_invocation_tokens,
)
from .targeting import LeafLayout, lora_scale

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
            exp_a, exp_b = lay.factor_shapes(r)
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
