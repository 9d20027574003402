"""`AdapterStack` (many adapters, ranks padded, ready to serve) and `stack_adapters`."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._core.errors import LoraIndexError
from .._core.indices import out_of_range_message
from .adapter import BASE, VECTOR_FIELDS, Adapter, _no_vectors
from .alora import (
    check_invocation_tokens,
    concrete_input_ids,
    per_token,
    require_input_ids,
)
from .served import ServedAdapters, served_indices, stacked_rows
from .targeting import LeafLayout, lora_scale


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

    def __check_init__(self):
        n, paths = self.n_adapters, self.paths
        for name in ("ranks", "alphas", "use_rslora", "lookup_only", "head_only"):
            per = getattr(self, name)
            if len(per) != len(paths) or any(len(x) != n for x in per):
                raise ValueError(
                    f"AdapterStack: `{name}` is not {n} values for each of the "
                    f"{len(paths)} leaves."
                )
        if len(self.variants) != len(paths) or any(
            len(v) != n or any(len(f) != len(VECTOR_FIELDS) for f in v)
            for v in self.variants
        ):
            raise ValueError(
                f"AdapterStack: `variants` is not {n} flag triples (dora, has "
                f"in_scale, has out_scale) for each of the {len(paths)} leaves."
            )
        if self.names is not None and len(self.names) != n:
            raise ValueError(f"AdapterStack: {len(self.names)} names for {n} adapters.")
        if len(self.invocation_tokens) != n:
            raise ValueError(
                f"AdapterStack: {len(self.invocation_tokens)} invocation_tokens for "
                f"{n} adapters."
            )
        for field in ("weights", "scales"):
            have = getattr(self, field)
            if set(have) != set(paths) or len(have) != len(paths):
                raise ValueError(
                    f"AdapterStack: {field} have paths {sorted(have)} but layouts "
                    f"have {sorted(paths)}."
                )
        for lay, r in zip(self.layouts, self.ranks):
            a, b = self.weights[lay.path]
            exp_a, exp_b = lay.factor_shapes(max(r, default=0), n)
            if tuple(a.shape) != exp_a or tuple(b.shape) != exp_b:
                raise ValueError(
                    f"AdapterStack: at {lay.path!r} expected a{exp_a} and b{exp_b} "
                    f"(*stack, n_adapters, ...), got a{tuple(a.shape)} and "
                    f"b{tuple(b.shape)}."
                )
            if tuple(self.scales[lay.path].shape) != (n,):
                raise ValueError(
                    f"AdapterStack: the scales at {lay.path!r} have shape "
                    f"{tuple(self.scales[lay.path].shape)}, not ({n},)."
                )
        for k, (field, group) in enumerate(VECTOR_FIELDS.items()):
            flagged = {
                lay.path
                for lay, flags in zip(self.layouts, self.variants)
                if any(f[k] for f in flags)
            }
            have = getattr(self, field)
            if set(have) != flagged:
                raise ValueError(
                    f"AdapterStack: `variants` flag {field} at {sorted(flagged)}, but "
                    f"the stack has arrays of them at {sorted(have)}."
                )
            for lay in self.layouts:
                if lay.path not in have:
                    continue
                part = lay.in_shape if group == "in" else lay.out_shape
                want, got = (*lay.stack_shape, n, *part), tuple(have[lay.path].shape)
                if got != want:
                    raise ValueError(
                        f"AdapterStack: at {lay.path!r} the {field[:-1]} has shape "
                        f"{got}; its layout needs (*stack, n_adapters, *{group}) = "
                        f"{want}."
                    )
        for path, d in self.bias_deltas.items():
            if path in paths or d.ndim != 2 or d.shape[0] != n:
                raise ValueError(
                    f"AdapterStack: `bias_deltas[{path!r}]` has shape "
                    f"{tuple(d.shape)}; expected ({n}, out) at a bias leaf that is "
                    "not a LoRA leaf."
                )

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
                shape_a, shape_b = lay.factor_shapes(r_max)
                a_list.append(jnp.zeros(shape_a, dtype))
                b_list.append(jnp.zeros(shape_b, dtype))
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
