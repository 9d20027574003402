"""`ServedAdapters`: the one thing `lx.loraify` serves, made by an `AdapterStack`
or an `AdapterBank` (`.served(indices)`).

A served leaf is its `LeafLayout`, its factors `(a, b)`, its row of the scales
(and of the head scales), its variants' vectors and, for a bank, the slots'
generations; the record also carries the batch's indices. It is a pytree of
few arrays (the factors, one `(paths, n)` matrix per kind of scale, the
generations, the indices), so a server passes it into its jitted step as one
argument and rebuilds the tree inside the trace, where that costs nothing per
call:

    step = jax.jit(lambda p, s, x: lx.quaxify(f)(lx.loraify(p, s), x))
    y = step(params, bank.served(bank.indices(names)), x)
"""

from __future__ import annotations

import collections
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int

from .._core.array import dense
from .._core.errors import StaleIndicesError
from .._core.indices import (
    check_indices,
    coerce_indices,
    decode_issued,
    decode_issued_on_host,
    first_stale,
)
from .targeting import LeafLayout

_DYNAMIC = (
    "factors",
    "scales",
    "head_scales",
    "in_scales",
    "out_scales",
    "magnitudes",
    "dora",
    "generations",
    "indices",
    "bias_deltas",
)


class Servable(Protocol):
    """Anything `lx.loraify` can serve from: an `AdapterStack` or an `AdapterBank`
    (the contract each implements; `loraify` never imports either's module)."""

    def served(self, indices: Any = None, *, compact: bool = False) -> ServedAdapters:
        """The `ServedAdapters` for `indices`."""
        ...


@jtu.register_pytree_with_keys_class
class ServedAdapters:
    """What [`lorax_arrays.loraify`][] puts into a tree for one batch: made by
    `stack.served(indices)` or `bank.served(indices)`, never by hand.

    A pytree, so it is passed into a jitted step as an argument; `lx.loraify(tree,
    served)` inside the step then builds the adapted tree at trace time, and each
    call costs the dispatch of these arrays alone (no Python per leaf). Its
    arrays, with `P` the adapted paths and `n` the adapters (or slots):

    | field | shape |
    |---|---|
    | `factors` | per path `(a, b)`, as in [`lorax_arrays.BatchedLoraArray`][] |
    | `scales` | `(P, n)`: row `j` is path `j`'s scales |
    | `head_scales` | `(P, n)` or `None` (= `scales`): read as a tied head |
    | `in_scales`, `out_scales` | per path where any adapter has them (IA3) |
    | `magnitudes`, `dora` | per DoRA path: `(*stack, n, *out)` and `(n,)` bool |
    | `generations` | `(n,)` for a bank (see `BatchedLoraArray.generations`) |
    | `indices` | the batch's adapter numbers (slots, for a bank), or `None` |
    | `bias_deltas` | per bias leaf an adapter updates, `(n, out)` (a `RowBias`) |

    and, static, `layouts` (each path's `LeafLayout`) and `compact`.

    A bank's arrays are rewritten in place by its next load, eviction, removal
    or update; passing a `ServedAdapters` made before that to a jitted function
    raises `lx.StaleIndicesError` (it would serve what the bank no longer holds).
    """

    __slots__ = (*_DYNAMIC, "layouts", "compact")

    factors: dict[str, tuple[Array, Array]]
    scales: Float[Array, "paths n_adapters"]
    head_scales: Float[Array, "paths n_adapters"] | None
    in_scales: dict[str, Array]
    out_scales: dict[str, Array]
    magnitudes: dict[str, Array]
    dora: dict[str, Bool[Array, " n_adapters"]]
    generations: Int[Array, " n_adapters"] | None
    indices: Int[Array, ...] | None
    bias_deltas: dict[str, Array]
    layouts: tuple[LeafLayout, ...]
    compact: bool

    @classmethod
    def make(cls, **fields: Any) -> ServedAdapters:
        """From every field, as given: the stack and the bank build it (`compact`
        defaults to False)."""
        fields.setdefault("compact", False)
        fields.setdefault("bias_deltas", {})
        obj = object.__new__(cls)
        for name in cls.__slots__:
            object.__setattr__(obj, name, fields[name])
        return obj

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ServedAdapters is immutable.")

    def tree_flatten_with_keys(self):
        if deleted(self.scales):
            raise StaleIndicesError(
                "These ServedAdapters were made before the bank's slots changed "
                "(a load, eviction, removal or update since `bank.served`), which "
                "rewrote its arrays in place: serving them would give rows what "
                "the bank no longer holds. Call `bank.served(bank.indices(names))` "
                "right before each step."
            )
        children = tuple((jtu.GetAttrKey(k), getattr(self, k)) for k in _DYNAMIC)
        return children, (self.layouts, self.compact)

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: Any) -> ServedAdapters:
        layouts, compact = aux
        return cls.make(
            **dict(zip(_DYNAMIC, children)), layouts=layouts, compact=compact
        )

    def __repr__(self) -> str:
        shape = None if self.indices is None else tuple(jnp.shape(self.indices))
        return (
            f"ServedAdapters(paths={len(self.layouts)}, n_adapters="
            f"{self.n_adapters}, indices={shape}, bank={self.generations is not None}"
            f", compact={self.compact})"
        )

    @property
    def paths(self) -> tuple[str, ...]:
        """The adapted paths, in the order of the rows of `scales`."""
        return tuple(lay.path for lay in self.layouts)

    @property
    def n_adapters(self) -> int:
        """How many adapters (a bank's slots) the factors stack."""
        return self.scales.shape[1]

    def with_indices(self, indices: Any) -> ServedAdapters:
        """A copy serving `indices`: numbers into this record's adapters (`-1`
        the base model) or, when it has `generations`, a bank's issued indices,
        decoded here (a concrete value that is not a current issue raises
        `lx.StaleIndicesError`; a traced one gives its row NaN).

        **Arguments:**

        - `indices`: `(batch,)`, `(batch, seq)`, or a scalar inside `jax.vmap`.

        **Returns:**

        A new `ServedAdapters`.
        """
        if self.compact:
            raise ValueError(
                "with_indices: these adapters were compacted for one batch "
                "(`compact=True`): they hold only that batch's adapters, numbered "
                "by their place in it, so new indices would pick other adapters. "
                "Serve each batch anew: `bank.served(bank.indices(names), "
                "compact=True)`."
            )
        indices = served_indices(
            indices, self.n_adapters, self.generations, "with_indices"
        )
        fields = {name: getattr(self, name) for name in self.__slots__}
        return ServedAdapters.make(**{**fields, "indices": indices})

    def rows(self) -> tuple[list[Any], list[Any] | None]:
        """Each path's row of `scales` and of `head_scales` (`None` when there
        are none), split by one jitted call when concrete."""
        return _rows(self.scales), (
            None if self.head_scales is None else _rows(self.head_scales)
        )


def deleted(x: Any) -> bool:
    """Whether `x` is a concrete array whose buffer was donated or deleted (a
    bank donates all its buffers at each write)."""
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and x.is_deleted()
    )


@jax.jit
def _unstack(m: Array) -> list[Array]:
    return list(m)


# The rows of the scale matrices split lately: a bank's matrices change only when
# a slot is written, and splitting them is one output array per path.
_ROWS: collections.OrderedDict[int, tuple[Any, list[Any]]] = collections.OrderedDict()
_ROWS_KEPT = 8


def _rows(m: Any) -> list[Any]:
    if isinstance(m, jax.core.Tracer):
        return list(m)
    hit = _ROWS.get(id(m))
    if hit is not None and hit[0] is m:
        return hit[1]
    return _remember(m, _unstack(m))


def _remember(m: Any, rows: list[Any]) -> list[Any]:
    _ROWS[id(m)] = (m, rows)
    while len(_ROWS) > _ROWS_KEPT:
        _ROWS.popitem(last=False)
    return rows


def stacked_rows(rows: list[Any]) -> Any:
    """`(P, n)` from `P` rows of `(n,)` (one jitted call when concrete; the rows
    are remembered, so `rows()` does not split it again)."""
    if any(isinstance(r, jax.core.Tracer) for r in rows):
        return jnp.stack(rows)
    m = _stack(tuple(rows))
    _remember(m, list(rows))
    return m


@jax.jit
def _stack(rows: tuple[Array, ...]) -> Array:
    return jnp.stack(rows)


def served_indices(
    indices: Any, n: int, generations: Any, what: str = "loraify"
) -> Any:
    """`indices` checked for `n` adapters, a bank's (with `generations`)
    decoded into slot numbers first; `what` names the caller in messages."""
    indices = coerce_indices(indices)
    if indices is None:
        return None
    if generations is not None:
        indices = decode(indices, generations, what)
    check_indices(indices, n)
    return indices


def decode(indices: Any, generations: Any, what: str) -> Any:
    """A bank's issued `indices` as slot numbers: traced, on the device (a stale
    value becomes `n`, so its row is NaN); concrete, on the host, refusing a
    value that is not the current issue of its slot."""
    if isinstance(indices, jax.core.Tracer) or isinstance(generations, jax.core.Tracer):
        return decode_issued(indices, generations)
    decoded = decode_issued_on_host(indices, generations)
    value = first_stale(indices, decoded, generations.shape[0])
    if value is not None:
        raise StaleIndicesError(
            f"{what}: index {value} is not a current issue of the bank these "
            "adapters were served from: its slot has since been given to another "
            "adapter, cleared or updated, or the index came from another bank or "
            "was made by hand (a bank's indices encode the slot and its "
            "generation). Use indices from this bank's latest "
            "`bank.indices(names)`."
        )
    return jnp.asarray(decoded)


def dora_norms(w: Any, a, b, scale, layout) -> jax.Array:
    """`‖w + s_i·A_i B_i‖` over the in-axes, for each out-feature and adapter:
    `(*stack, n, *out)`, from `‖w_c‖² + 2 s·w_cᵀ A b_c + s²·b_cᵀ (AᵀA) b_c`,
    in float32 (or wider)."""
    w = dense(w)  # a quantised base: its dequantised value
    ns = layout.n_stack
    shape = tuple(w.shape)
    d_in = math.prod(layout.in_shape(shape))
    out_shape = layout.out_shape(shape)
    d_out = math.prod(out_shape)
    stack = layout.stack_shape(shape)
    dt = jnp.promote_types(w.dtype, jnp.float32)
    perm = (*layout.stack_axes, *layout.in_axes, *layout.out_axes)
    wt = jnp.transpose(w, perm).reshape(*stack, d_in, d_out).astype(dt)
    n, r = a.shape[ns], a.shape[-1]
    a2 = a.reshape(*stack, n, d_in, r).astype(dt)
    b2 = b.reshape(*stack, n, r, d_out).astype(dt)
    s = jnp.asarray(scale, dt).reshape((n, 1))
    w2 = jnp.sum(wt * wt, axis=-2)[..., None, :]  # (*stack, 1, out)
    wta = jnp.einsum("...io,...nir->...nor", wt, a2)
    cross = jnp.einsum("...nor,...nro->...no", wta, b2)
    ata = jnp.einsum("...nir,...nis->...nrs", a2, a2)
    quad = jnp.einsum("...nro,...nrs,...nso->...no", b2, ata, b2)
    norm2 = w2 + 2 * s * cross + s * s * quad
    return jnp.sqrt(jnp.maximum(norm2, 0)).reshape(*stack, n, *out_shape)
