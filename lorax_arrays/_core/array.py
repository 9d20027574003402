"""`BatchedLoraArray`: a frozen base weight plus many stacked LoRA adapters."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from .errors import QuaxifyMissingError, UnsupportedOperationError
from .indices import (
    UnsetIndicesError as UnsetIndicesError,
    check_indices,
    clamp_indices,
    coerce_indices,
    gathered_scale,
    guarded_take,
    require_indices,
    scalar_needed_message,
    scale_rows,
)
from .lax import take
from .layout import Layout
from .options import check_strategy


def _shape_dtype(w: Any) -> tuple[tuple[int, ...], Any]:
    if isinstance(w, quax.ArrayValue):
        aval = w.aval()
        return tuple(aval.shape), aval.dtype
    if isinstance(w, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return tuple(w.shape), w.dtype
    raise TypeError(
        "BatchedLoraArray: `w` must be a JAX/NumPy array or a quax.ArrayValue, got "
        f"{type(w).__name__}."
    )


# How foreign weight types become quax values: each hook returns the wrapped
# weight, or None for a weight it does not know. Integrations register here (qwix
# wraps its `QArray` in `lx.QwixArray`), so the core imports none of them.
_base_weight_hooks: list[Callable[[Any], Any]] = []


def register_base_weight(hook: Callable[[Any], Any]) -> None:
    """Hold weights of a foreign type as a quax value: `hook(w)` returns the value
    a `BatchedLoraArray` should hold for `w`, or `None` if `w` is not its type."""
    if hook not in _base_weight_hooks:
        _base_weight_hooks.append(hook)


def base_weight(w: Any) -> Any:
    """`w` as a `BatchedLoraArray` holds it: what a registered hook makes of it
    (a qwix `QArray` or PTQ `WithAux` becomes a `QwixArray`), else `w` itself."""
    for hook in _base_weight_hooks:
        out = hook(w)
        if out is not None:
            return out
    return w


def check_base_weight(w: Any, path: str, shape: tuple[int, ...], what: str) -> None:
    """`w` (from `base_weight`) has `shape` and a floating-point dtype."""
    got, dtype = _shape_dtype(w)
    if got != shape:
        raise ValueError(
            f"{what}: the adapter was made for a weight of shape {shape} at "
            f"{path!r}, but the tree's leaf there has shape {got}."
        )
    if not _inexact(dtype):
        raise TypeError(
            f"{what}: the leaf at {path!r} has dtype {dtype}; an adapted weight "
            "must be floating point."
        )


@functools.lru_cache(maxsize=64)
def _inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _quaxify_missing(lora: BatchedLoraArray, what: str) -> NoReturn:
    raise QuaxifyMissingError(
        f"{what} needs a plain array, but W is a BatchedLoraArray (an adapted "
        f"weight of shape {tuple(lora.shape)}) used outside `lx.quaxify`, and only "
        "quaxified code understands it. Wrap the function that uses the model in "
        "`lx.quaxify` (e.g. `eqx.filter_jit(lx.quaxify(forward))`, or "
        "`jax.jit(lx.quaxify(model.apply))` for Flax) and pass the loraified tree "
        "to it as an argument: quaxify does not see arrays that a function closes "
        "over."
    )


def _outside_quaxify(what: str):
    """A dunder method that raises `QuaxifyMissingError` for the operation `what`."""

    def method(self, *args, **kwargs):
        _quaxify_missing(self, what)

    return method


def _asked_by_jax() -> bool:
    """Whether JAX itself (`jnp.asarray`, a `jnp` function's argument check, a JAX
    array's operator) is looking up `__jax_array__`, as opposed to a library probing
    for array-likes (`eqx.is_array_like`, which quax uses on every rule's output)."""
    try:
        frame = sys._getframe(2)  # 0: here, 1: the property, 2: the lookup
    except ValueError:  # looked up from C with no Python caller
        return False
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        "equinox._module"  # `Module.__getattribute__`
    ):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("jax.")


class BatchedLoraArray(quax.ArrayValue):
    """A frozen weight `w` with many LoRA adapters, one chosen per example or token.

    For an example `e` that uses adapter `i = indices[e]`, the array stands for

        w + scale[i] * (a[i] ⊗ b[i])     laid out on w's axes,

    and for `i = -1` for `w` alone. That sum is never built: under
    [`lorax_arrays.quaxify`][], `dot_general(x, W)` is rewritten to
    `dot_general(x, w) + scale[i] * ((x · a[i]) · b[i])`.

    Layout (`stack` = the sizes of `stack_axes`, `in` of `in_axes`, `out` of
    `out_axes`, each in the order given):

    | field | shape |
    |---|---|
    | `w` | the base weight's own shape, e.g. `(in, out)` or `(L, out, in)` |
    | `a` | `(*stack, n_adapters, *in, rank)` |
    | `b` | `(*stack, n_adapters, rank, *out)` |
    | `scale` | `(n_adapters,)`: alpha / rank (alpha / sqrt(rank) for rsLoRA) |
    | `indices` | `()` in `vmap`, `(batch,)`, or `(batch, seq)`; `-1` = base only |

    Adapters of different ranks are zero-padded to the largest rank;
    [`lorax_arrays.stack_adapters`][] does that for you. The three axis groups are
    held as one static `layout` (`in_axes`, `out_axes` and `stack_axes` are
    properties reading it).
    """

    w: Any
    a: Float[Array, ...]
    b: Float[Array, ...]
    scale: Float[Array, " n_adapters"]
    indices: Int[Array, ...] | None
    head_scale: Float[Array, " n_adapters"] | None
    in_scale: Float[Array, ...] | None
    out_scale: Float[Array, ...] | None
    generations: Int[Array, " n_adapters"] | None
    layout: Layout = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    strategy: str = eqx.field(static=True)
    batch_axis: int = eqx.field(static=True)
    compact: bool = eqx.field(static=True)

    def __init__(
        self,
        w: Any,
        a: Float[ArrayLike, ...],
        b: Float[ArrayLike, ...],
        *,
        scale: Float[ArrayLike, " n_adapters"] | float,
        indices: Int[ArrayLike, ...] | None = None,
        in_axes: int | Sequence[int],
        out_axes: int | Sequence[int],
        stack_axes: int | Sequence[int] = (),
        allow_materialise: bool = False,
        strategy: str = "auto",
        head_scale: Float[ArrayLike, " n_adapters"] | None = None,
        in_scale: Float[ArrayLike, ...] | None = None,
        out_scale: Float[ArrayLike, ...] | None = None,
        batch_axis: int = 0,
        compact: bool = False,
        generations: Int[ArrayLike, " n_adapters"] | None = None,
    ):
        """**Arguments:**

        - `w`: the frozen base weight: an array, or another `quax.ArrayValue` (a
            quantised weight, say) whose own rules handle `dot_general(x, w)`. A
            qwix `QArray` (or qwix's PTQ `WithAux`) is wrapped in `lx.QwixArray`.
        - `a`: every adapter's A, shape `(*stack, n_adapters, *in, rank)`.
        - `b`: every adapter's B, shape `(*stack, n_adapters, rank, *out)`.
        - `scale`: `(n_adapters,)` multipliers (alpha / rank), or one float for all.
        - `indices`: which adapter each example (or token) uses; `-1` means the
            base weight alone. `None` leaves them unset: set them later with
            [`lorax_arrays.with_indices`][].
        - `in_axes`: the axes of `w` an activation contracts with.
        - `out_axes`: the axes of `w` that the product produces.
        - `stack_axes`: layer-stack axes of `w` (consumed by `lax.scan`).
        - `allow_materialise`: opt in to building the dense per-example weight for
            operations that have no low-rank rule. Off by default: such an operation
            raises an error instead.
        - `strategy`: how the low-rank term is computed: `"gather"` (gather each
            row's factors), `"segment"` (sort tokens by adapter, grouped matmul),
            `"dense"` (all adapters, masked) or `"auto"` (chosen from the shapes
            and backend). All give the same result; see the docs' performance page.
        - `head_scale`: `(n_adapters,)` multipliers for when the array is read the
            other way round, contracted over its out-axes (a tied output head
            `h @ E.T`); `None` (the default) means `scale`. PEFT's embedding LoRA
            leaves a tied head alone: 0 for those adapters.
        - `in_scale`, `out_scale`: the LoRA variants' per-adapter vectors (IA3's,
            and DoRA's `magnitude / ‖W + s·A B‖`), shaped as rank-1 factors:
            `in_scale` `(*stack, n_adapters, *in, 1)` like `a`, `out_scale`
            `(*stack, n_adapters, 1, *out)` like `b`. Adapter `i` then stands
            for `diag(h_i) (w + s_i·a_i b_i) diag(g_i)`, and the product is
            `((x ⊙ h_i) (w + s_i·a_i b_i)) ⊙ g_i`. `None` is all ones (and costs
            nothing). [`lorax_arrays.loraify`][] computes them from the adapters.
        - `batch_axis`: where the indices' axes sit among an activation's free
            axes (those a product neither contracts nor batches over). `0` (the
            default): they lead, as in `(B, T, D)` with `(B,)` or `(B, T)`
            indices. A time-major model, whose activations are `(T, B, D)`, passes
            `-1`: the indices' axes are then the *last* free axes, which also
            fits the `(B, D)` steps of a scan over time. See the design notes'
            "Which axes are the batch".
        - `compact`: the stacked adapters are only those of the batch the indices
            were made for (`lx.loraify(tree, bank, idx, compact=True)`), numbered
            by their place in it; `lx.with_indices` refuses such an array.
        - `generations`: `(n_adapters,)` integers, set when serving from an
            [`lorax_arrays.AdapterBank`][]: each slot's generation when the tree
            was loraified. [`lorax_arrays.with_indices`][] then takes the bank's
            issued values (`generation * n_adapters + slot`, or `-1`) and decodes
            them against these, once for every leaf, into the slot numbers held
            in `indices`; a value that is not its slot's current issue becomes
            `n_adapters`, so its row is NaN. `None` (the default): no bank.
        """
        w = base_weight(w)
        shape, _ = _shape_dtype(w)
        ndim = len(shape)
        self.layout = Layout.of(ndim, in_axes, out_axes, stack_axes)
        self.w = w
        self.a = jnp.asarray(a)
        self.b = jnp.asarray(b)
        scale = jnp.asarray(scale)
        ns = self.layout.n_stack
        if scale.ndim == 0 and self.a.ndim > ns:
            scale = jnp.broadcast_to(scale, (self.a.shape[ns],))
        if not jnp.issubdtype(scale.dtype, jnp.inexact):
            scale = scale.astype(jnp.float32)
        self.scale = scale
        if head_scale is not None:
            head_scale = jnp.asarray(head_scale)
            if not jnp.issubdtype(head_scale.dtype, jnp.inexact):
                head_scale = head_scale.astype(jnp.float32)
        self.head_scale = head_scale
        self.in_scale = None if in_scale is None else jnp.asarray(in_scale)
        self.out_scale = None if out_scale is None else jnp.asarray(out_scale)
        self.indices = coerce_indices(indices)
        self.allow_materialise = bool(allow_materialise)
        self.strategy = check_strategy(strategy)
        if isinstance(batch_axis, bool) or not isinstance(batch_axis, int):
            raise TypeError(
                f"BatchedLoraArray: `batch_axis` must be an int, got {batch_axis!r}."
            )
        self.batch_axis = batch_axis
        self.compact = bool(compact)
        self.generations = None if generations is None else jnp.asarray(generations)

    @classmethod
    def unchecked(cls, **fields: Any) -> BatchedLoraArray:
        """A `BatchedLoraArray` from its fields as they are stored (`layout`, not
        the axes), with no conversion or check: for `lx.loraify` and
        `lx.with_indices`, which check what they serve once for every leaf
        rather than once per leaf. Every field must be given."""
        obj = object.__new__(cls)
        # (not `obj.__dict__`: equinox's attribute lookup is the slow part)
        object.__getattribute__(obj, "__dict__").update(
            {name: fields[name] for name in _FIELDS}
        )
        return obj

    def __check_init__(self):
        shape, dtype = _shape_dtype(self.w)
        what = f"BatchedLoraArray(w.shape={shape})"
        self.layout.check(len(shape), what)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(f"{what}: `w` must be floating point, got dtype {dtype}.")
        for name in ("a", "b", "scale"):
            arr = getattr(self, name)
            if not jnp.issubdtype(arr.dtype, jnp.inexact):
                raise TypeError(
                    f"{what}: `{name}` must be floating point, got dtype {arr.dtype}."
                )
        ns = self.layout.n_stack
        if self.a.ndim != ns + len(self.in_axes) + 2:
            exp_a, _ = self.layout.factor_shapes(shape, 0, 0)
            raise ValueError(
                f"{what}: `a` has shape {self.a.shape}; expected "
                f"(*stack, n_adapters, *in, rank) = {_pretty(exp_a)} "
                f"({ns + len(self.in_axes) + 2} axes)."
            )
        n, rank = self.a.shape[ns], self.a.shape[-1]
        exp_a, exp_b = self.layout.factor_shapes(shape, rank, n)
        if self.a.shape != exp_a:
            raise ValueError(
                f"{what}: `a` has shape {self.a.shape}; expected "
                f"(*stack, n_adapters, *in, rank) = {exp_a} for in_axes="
                f"{self.in_axes}, stack_axes={self.stack_axes}."
            )
        if self.b.shape != exp_b:
            raise ValueError(
                f"{what}: `b` has shape {self.b.shape}; expected "
                f"(*stack, n_adapters, rank, *out) = {exp_b} for out_axes="
                f"{self.out_axes}, stack_axes={self.stack_axes} (n_adapters={n} and "
                f"rank={rank} come from `a`)."
            )
        if self.scale.shape != (n,):
            raise ValueError(
                f"{what}: `scale` has shape {self.scale.shape}; expected (n_adapters,) "
                f"= ({n},)."
            )
        if self.head_scale is not None and self.head_scale.shape != (n,):
            raise ValueError(
                f"{what}: `head_scale` has shape {self.head_scale.shape}; expected "
                f"(n_adapters,) = ({n},)."
            )
        for name, want in (
            ("in_scale", (*exp_a[:-1], 1)),
            ("out_scale", (*exp_b[: ns + 1], 1, *exp_b[ns + 2 :])),
        ):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != want:
                raise ValueError(
                    f"{what}: `{name}` has shape {tuple(v.shape)}; expected {want} "
                    f"(shaped as a rank-1 {'`a`' if name == 'in_scale' else '`b`'})."
                )
        if self.generations is not None:
            g = self.generations
            if g.shape != (n,) or not jnp.issubdtype(g.dtype, jnp.integer):
                raise ValueError(
                    f"{what}: `generations` has shape {tuple(g.shape)} and dtype "
                    f"{g.dtype}; expected integers of shape (n_adapters,) = ({n},)."
                )
        if self.indices is not None:
            check_indices(self.indices, n)

    # -- quax interface ---------------------------------------------------------

    def aval(self) -> jax.core.ShapedArray:
        shape, dtype = _shape_dtype(self.w)
        return jax.core.ShapedArray(shape, dtype)

    def materialise(self) -> Array:
        """The dense weight `w + scale[i] * a[i] ⊗ b[i]`, of the array's own shape
        (`aval()`), so only with scalar indices (one adapter for the whole array,
        as inside `jax.vmap`).

        Refuses unless `allow_materialise=True`: the point of this type is never to
        build it. With per-example indices, one dense weight of this shape cannot
        hold each example's adapter: an error too.
        """
        if not self.allow_materialise:
            raise UnsupportedOperationError(
                "Refusing to materialise a BatchedLoraArray into the dense W + AB. "
                "Pass `allow_materialise=True` (to `lx.loraify` or the "
                "BatchedLoraArray constructor) to allow it."
            )
        indices = require_indices(self)
        if indices.ndim:
            raise UnsupportedOperationError(
                scalar_needed_message(
                    "Materialising a BatchedLoraArray gives one dense weight of its "
                    f"own shape {tuple(self.shape)}",
                    indices.shape,
                )
            )
        return materialise_per_example(self)

    @staticmethod
    def default(primitive, values, params):
        loras = [v for v in values if isinstance(v, BatchedLoraArray)]
        if not all(v.allow_materialise for v in loras):
            lora = next(v for v in loras if not v.allow_materialise)
            raise UnsupportedOperationError(_unsupported_message(primitive, lora))
        return bind_materialised(
            primitive,
            values,
            params,
            BatchedLoraArray,
            lambda v: scalar_needed_message(
                f"`{primitive.name}` has no low-rank rule, and materialising was "
                f"allowed (or register a rule for `{primitive.name}` with "
                "`lx.register`)",
                v.indices.shape,
            ),
        )

    # -- used outside quaxify ---------------------------------------------------
    #
    # Under `quaxify` a BatchedLoraArray is wrapped in a quax tracer, so none of
    # these is ever called there: they turn the errors that plain JAX, Equinox and
    # Flax code raises on the bare object ("unsupported operand type(s) for @",
    # "float() argument must be ...") into one that names the fix.

    @property
    def __jax_array__(self):
        # Only for JAX's own conversions: to anyone else (notably
        # `eqx.is_array_like`, which quax asks of every rule's output) this
        # attribute does not exist, as this is not an array.
        if _asked_by_jax():
            _quaxify_missing(
                self, "`jnp.asarray(W)` (or a `jnp` function or JAX operator given W)"
            )
        raise AttributeError("__jax_array__")

    __array__ = _outside_quaxify("`np.asarray(W)`")
    __matmul__ = _outside_quaxify("`W @ x`")
    __rmatmul__ = _outside_quaxify("`x @ W`")
    __getitem__ = _outside_quaxify("Indexing `W[...]` (an embedding lookup, say)")
    __add__ = __radd__ = _outside_quaxify("`W + x`")
    __sub__ = __rsub__ = _outside_quaxify("`W - x`")
    __mul__ = __rmul__ = _outside_quaxify("`W * x`")
    __truediv__ = __rtruediv__ = _outside_quaxify("`W / x`")
    __pow__ = __rpow__ = _outside_quaxify("`W ** x`")
    __neg__ = _outside_quaxify("`-W`")
    __float__ = _outside_quaxify("`float(W)`")
    __int__ = _outside_quaxify("`int(W)`")
    __complex__ = _outside_quaxify("`complex(W)`")

    # -- conveniences -----------------------------------------------------------

    @property
    def in_axes(self) -> tuple[int, ...]:
        """The axes of `w` an activation contracts with (`layout.in_axes`)."""
        return self.layout.in_axes

    @property
    def out_axes(self) -> tuple[int, ...]:
        """The axes of `w` the product produces (`layout.out_axes`)."""
        return self.layout.out_axes

    @property
    def stack_axes(self) -> tuple[int, ...]:
        """The layer-stack axes of `w` (`layout.stack_axes`)."""
        return self.layout.stack_axes

    @property
    def n_adapters(self) -> int:
        """How many adapters are stacked."""
        return self.a.shape[self.layout.n_stack]

    @property
    def rank(self) -> int:
        """The (padded) rank shared by all stacked adapters."""
        return self.a.shape[-1]

    @property
    def frozen_w(self) -> Any:
        """The base weight as every rule reads it: `w` behind `lax.stop_gradient`.

        The base weight is frozen by the type: whichever primitive reads it (a
        matmul, an embedding lookup, one layer sliced from a stack), no gradient
        reaches `w`. When `w` is itself a quax value (a quantised weight, say), the
        gradient is stopped at each of its floating-point array leaves.
        """
        return freeze(self.w)

    @property
    def has_variants(self) -> bool:
        """Whether any adapter has a variant's vectors here (`in_scale` or
        `out_scale` set: DoRA, IA3)."""
        return self.in_scale is not None or self.out_scale is not None

    def map_factors(self, fn: Callable, **changes: Any) -> BatchedLoraArray:
        """A copy with `a, b = fn(a, b)`, and the variants' vectors transformed
        the same way (`in_scale` is laid out as a rank-1 `a`, `out_scale` as a
        rank-1 `b`), for a rule that cuts, reshapes or reorders the factors.

        **Arguments:**

        - `fn`: `(a, b) -> (a, b)`, for factors of any rank.
        - `**changes`: other fields to change (`w`, `layout`, ...).

        **Returns:**

        A new `BatchedLoraArray`.
        """
        a, b = fn(self.a, self.b)
        if self.has_variants:
            h, g = self.in_scale, self.out_scale
            ns = self.layout.n_stack
            h_in = h if h is not None else jnp.ones((*self.a.shape[:-1], 1), a.dtype)
            shape_b = self.b.shape
            g_in = (
                g
                if g is not None
                else jnp.ones((*shape_b[: ns + 1], 1, *shape_b[ns + 2 :]), b.dtype)
            )
            h_out, g_out = fn(h_in, g_in)
            changes = dict(
                in_scale=None if h is None else h_out,
                out_scale=None if g is None else g_out,
                **changes,
            )
        return self.replace(a=a, b=b, **changes)

    def replace(self, **changes: Any) -> BatchedLoraArray:
        """A copy with some fields changed, validated again.

        **Arguments:**

        - `**changes`: new values for any of the constructor's arguments, or a
            `layout` (a `Layout`) in place of `in_axes`/`out_axes`/`stack_axes`.

        **Returns:**

        A new `BatchedLoraArray`.
        """
        kwargs = dict(
            w=self.w,
            a=self.a,
            b=self.b,
            scale=self.scale,
            indices=self.indices,
            in_axes=self.in_axes,
            out_axes=self.out_axes,
            stack_axes=self.stack_axes,
            allow_materialise=self.allow_materialise,
            strategy=self.strategy,
            head_scale=self.head_scale,
            in_scale=self.in_scale,
            out_scale=self.out_scale,
            batch_axis=self.batch_axis,
            compact=self.compact,
            generations=self.generations,
        )
        layout = changes.pop("layout", None)
        if layout is not None:
            kwargs.update(
                in_axes=layout.in_axes,
                out_axes=layout.out_axes,
                stack_axes=layout.stack_axes,
            )
        kwargs.update(changes)
        return BatchedLoraArray(**kwargs)


_FIELDS = tuple(f.name for f in dataclasses.fields(BatchedLoraArray))


def bind_materialised(primitive, values, params, kind: type, per_row_error) -> Any:
    """`primitive` bound on `values` with every quax value made a plain array:
    those of type `kind` through their own `materialise` (refused with
    `per_row_error(value)` where their indices are per row: one dense array
    cannot hold every row's), other quax values through theirs. The `default`
    of lorax_arrays' array types."""
    arrays = []
    for v in values:
        if isinstance(v, kind):
            if v.indices is not None and v.indices.ndim > 0:
                raise UnsupportedOperationError(per_row_error(v))
            arrays.append(v.materialise())
        elif isinstance(v, quax.Value):
            arrays.append(type(v).materialise(v))
        else:
            arrays.append(v)
    return primitive.bind(*arrays, **params)


def swap_in_out(lora: BatchedLoraArray) -> BatchedLoraArray:
    """The same array read the other way round: `(W + A B)` contracted over its
    out-axes is `W` contracted there plus `B^T`-then-`A^T`, so the in and out groups
    exchange roles and A and B exchange places. Used for tied output heads
    (`h @ E.T`) and row lookups along an output axis. Read that way, the adapters
    are scaled by `head_scale` (where set), and swapping back restores `scale`."""
    scales = {}
    if lora.head_scale is not None:
        scales = dict(scale=lora.head_scale, head_scale=lora.scale)
    a, b = lora.layout.swap_factors(lora.a, lora.b)
    return lora.replace(a=a, b=b, layout=lora.layout.swapped(), **scales)


def _pretty(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("?" if s == 0 else str(s) for s in shape) + ")"


def bind(primitive, *args, **params):
    """`primitive.bind(*args, **params)`, dispatched through quax when an argument is
    itself a quax value (a quantised base weight, say), so its own rules apply."""
    if any(isinstance(x, quax.Value) for x in args):
        return quax.quaxify(lambda *xs: primitive.bind(*xs, **params))(*args)
    return primitive.bind(*args, **params)


def freeze(w: Any) -> Any:
    """`lax.stop_gradient(w)`; for a quax-valued `w`, of each floating-point array
    leaf (its other leaves, integer codes say, carry no gradient anyway)."""
    if isinstance(w, quax.Value):
        return jax.tree.map(
            lambda x: lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, w
        )
    return lax.stop_gradient(w)


def materialise_per_example(
    lora: BatchedLoraArray, indices: Array | None = None
) -> Array:
    """`w + s·a⊗b` with one extra leading axis per axis of `indices` (by default
    the array's own; a rule passes them regrouped onto its activation).

    With scalar indices this is exactly the weight's shape.
    """
    if indices is None:
        indices = require_indices(lora)
    ns = lora.layout.n_stack
    idx = clamp_indices(indices, lora.n_adapters)
    s = gathered_scale(lora.scale, indices)
    # Move the gathered example axes (at ns, ..., ns + k - 1) to the front.
    src, dst = tuple(range(ns, ns + idx.ndim)), tuple(range(idx.ndim))
    a = jnp.moveaxis(take(lora.a, idx, ns), src, dst)
    b = jnp.moveaxis(take(lora.b, idx, ns), src, dst)
    delta_fn = lora.layout.dense_delta
    for _ in range(idx.ndim):
        delta_fn = jax.vmap(delta_fn)
    delta = delta_fn(a, b)
    w = dense(lora.frozen_w)
    s = s.reshape(s.shape + (1,) * w.ndim)
    out = w + scale_rows(delta, s)
    # The variants' vectors, diag(h) (w + s·a b) diag(g): each example's, laid on
    # the weight's axes (a base row's are ones, as its delta is 0).
    for vec, group, rank_axis in (
        (lora.in_scale, "in", -1),
        (lora.out_scale, "out", ns + 1),
    ):
        if vec is not None:
            v = per_example(lora, jnp.squeeze(vec, rank_axis), indices)
            v = jnp.moveaxis(v, src, dst)
            out = out * lora.layout.on_weight(v, group, lead=idx.ndim)
    return out.astype(w.dtype)


def per_example(lora: BatchedLoraArray, vec: Array, indices: Array) -> Array:
    """A per-adapter vector `(*stack, n_adapters, *rest)` at each example's
    adapter: `(*stack, *indices.shape, *rest)`, all ones for base rows (`-1`)."""
    # A base row reads ones, never an adapter's vector (a non-finite one stays in
    # its own rows), and an index outside `[-1, n)` reads NaN, as
    # `gathered_scale` gives the low-rank term, so a leaf with no low-rank term
    # (IA3 alone, rank 0) is guarded too.
    return guarded_take(vec, 1.0, indices, lora.layout.n_stack)


def dense(w: Any) -> Any:
    """`w` as a plain array: a quax value's own `materialise()` (an explicit
    dequantisation, for a quantised weight), anything else as it is."""
    return type(w).materialise(w) if isinstance(w, quax.Value) else w


def _unsupported_message(primitive, lora: BatchedLoraArray) -> str:
    name = primitive.name
    return (
        f"`{name}` has no rule for BatchedLoraArray (weight shape {lora.shape}, "
        f"in_axes={lora.in_axes}, out_axes={lora.out_axes}, "
        f"stack_axes={lora.stack_axes}). lorax_arrays keeps the low-rank form and "
        "never silently builds the dense W + AB. Either register a rule for this "
        f"primitive (`@lx.register(jax.lax.{name}_p)`, see the docs' page on custom "
        "rules), or opt in to building the dense per-example weight with "
        "`allow_materialise=True` (in `lx.loraify(...)` or the BatchedLoraArray "
        "constructor), which costs a dense copy of W per example."
    )
