"""The device side of an `AdapterBank`: its slots.

Per adapted leaf the factor slots `a: (*stack, slots, *in, capacity)` and
`b: (*stack, slots, capacity, *out)` (and, for the kinds that have them, per-slot
vectors and bias rows), for all leaves one `(paths, slots)` matrix of scales and
one of head scales; what each slot holds and its *generation*, the token its
issued indices carry. Writes are one jitted update with the state donated, so in
place; every write draws the slot a new generation.

The host side (registered adapters, versions, recency, events) is `bank.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import secrets
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .._adapters.served import dora_norms
from .._adapters.targeting import LeafLayout
from .._core.errors import LoraIndexError, StaleIndicesError
from .._core.indices import (
    coerce_indices,
    decode_issued_on_host,
    first_stale,
    issued_value,
    unrepresentable_message,
)
from .._core.lax import update_index
from .._core.paths import bias_leaves, unwrapped_parts

# Slot generations are drawn from one process-wide counter, so no two slots of any
# banks in this process ever hold the same token (an index issued by one bank
# never matches another's slots), starting at a random point so that indices from
# another process almost never do either. Tokens must keep `token * slots + slot`
# within int32.
_TOKENS = itertools.count(secrets.randbelow(2**20) + 1)
_TOKENS_LOCK = threading.Lock()
# How many past generations a bank remembers, for its messages.
_HISTORY_KEPT = 4096


def next_token(slots: int) -> int:
    with _TOKENS_LOCK:
        token = next(_TOKENS)
    if issued_value(token, slots - 1, slots) > 2**31 - 1:
        raise RuntimeError(
            "AdapterBank: this process has changed bank slots so often that their "
            f"generations no longer fit int32 indices with {slots} slots. Restart "
            "the server process (or use fewer slots)."
        )
    return token


@functools.partial(jax.jit, static_argnums=4)
def dora_norm(w, a, b, scale, layout):
    return dora_norms(w, a, b, jnp.reshape(scale, (1,)), layout)


class SlotState(NamedTuple):
    """Everything a bank holds on the device (a pytree): per adapted path the
    factors `(a, b)` with the slot axis after the stack axes, the IA3/DoRA
    vectors `ins` `(*stack, slots, *in)` and `outs` `(*stack, slots, *out)` where
    the bank's kinds have them, per bias leaf its rows `(slots, out)`, and the
    `(paths, slots)` matrices of scales and head scales. Also one slot's contents
    (no slot axes), as written."""

    factors: dict[str, tuple[Any, Any]]
    ins: dict[str, Any]
    outs: dict[str, Any]
    bias: dict[str, Any]
    scales: Any
    heads: Any


class BiasLeaf(NamedTuple):
    """A bias leaf next to an adapted leaf: its size and its updates' dtype."""

    size: int
    dtype: np.dtype


class LeafEntry(NamedTuple):
    """One leaf of a registered adapter, as its slot will hold it: the factors
    padded to the capacity, its scale and its head scale."""

    a: Any
    b: Any
    scale: np.float32
    head: np.float32


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One adapted leaf of a store of slots (a bank's, a trainer's): its layout,
    the capacity rank and the slots' dtype."""

    layout: LeafLayout
    capacity: int
    dtype: np.dtype

    @property
    def n_stack(self) -> int:
        return len(self.layout.stack_axes)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered adapter, on the host: per leaf its factors padded to the
    capacity rank, and its scales (already zero where it lacks a leaf)."""

    arrays: dict[str, LeafEntry]
    nbytes: int
    # Per leaf the vectors it is served with (IA3's in and out vectors; DoRA's
    # `magnitude / ‖W + s·A B‖`, exact for as long as W is frozen), where the
    # adapter has them.
    in_vectors: dict[str, Any] = dataclasses.field(default_factory=dict)
    out_vectors: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Its updates of bias leaves (`Adapter.bias_deltas`: PEFT's modules_to_save).
    bias_deltas: dict[str, Any] = dataclasses.field(default_factory=dict)
    # An activated LoRA's invocation sequence (`Adapter.invocation_tokens`).
    invocation_tokens: tuple[int, ...] | None = None


def empty_slot(leaf: Leaf, n: int, xp: Any = np) -> tuple[Any, Any]:
    """`n` empty slots' zero factors (NumPy, or `xp=jnp`)."""
    lay, r = leaf.layout, leaf.capacity
    shape_a, shape_b = lay.factor_shapes(r, n)
    a, b = xp.zeros(shape_a, leaf.dtype), xp.zeros(shape_b, leaf.dtype)
    return a, b


def padded(a, b, leaf: Leaf, on_host: bool) -> tuple[Any, Any]:
    """The factors in the bank's dtype, padded to the capacity: NumPy when
    `on_host`, else JAX arrays on their device."""
    xp = np if on_host else jnp
    a, b = xp.asarray(a), xp.asarray(b)
    ns, pad = leaf.n_stack, leaf.capacity - a.shape[-1]
    a_pad = [(0, 0)] * (a.ndim - 1) + [(0, pad)]
    b_pad = [(0, 0)] * b.ndim
    b_pad[ns] = (0, pad)
    return (
        xp.pad(a.astype(leaf.dtype), a_pad),
        xp.pad(b.astype(leaf.dtype), b_pad),
    )


def bias_leaves_near(
    tree: Any, leaves: dict[str, Leaf], dtype: Any
) -> dict[str, BiasLeaf]:
    """The 1-D floating `bias` leaves of `tree` in the module of one of the
    bank's adapted `leaves` (`.../out_proj/bias` next to `.../out_proj/kernel`,
    NNX's `.../bias/value`), with their size and the dtype of their updates."""
    modules = {unwrapped_parts(p)[:-1] for p in leaves}
    out = {}
    for module, (path, leaf) in bias_leaves(tree).items():
        shape = tuple(getattr(leaf, "shape", ()))
        dt = getattr(leaf, "dtype", None)
        if module not in modules or len(shape) != 1 or dt is None:
            continue
        if jnp.issubdtype(dt, jnp.inexact):
            out[path] = BiasLeaf(shape[0], np.dtype(dt if dtype is None else dtype))
    return out


def _write_slot(
    state: SlotState, slot: Any, new: SlotState, n_stack: dict[str, int]
) -> SlotState:
    """`state` with slot `slot` replaced by `new`'s (one slot's contents): each
    path's factors and vectors (the slot axis follows the stack axes), its bias
    row, and column `slot` of the scale matrices."""

    def put(full, part, axis):
        return update_index(full, jnp.asarray(part), slot, axis)

    def column(full, part):
        return put(full, jnp.asarray(part)[:, None], 1)

    return SlotState(
        factors={
            p: tuple(put(f, x, n_stack[p]) for f, x in zip(fs, new.factors[p]))
            for p, fs in state.factors.items()
        },
        ins={p: put(f, new.ins[p], n_stack[p]) for p, f in state.ins.items()},
        outs={p: put(f, new.outs[p], n_stack[p]) for p, f in state.outs.items()},
        bias={p: put(f, new.bias[p], 0) for p, f in state.bias.items()},
        scales=column(state.scales, new.scales),
        heads=column(state.heads, new.heads),
    )


def weight_specs(weights: dict[str, Any]) -> tuple[Any, dict[str, tuple]] | None:
    """The mesh and, per path, `(spec, axis sizes)` of the `weights` that carry a
    `NamedSharding`; the spec is `()` on an explicit-sharding mesh, where the
    slots stay replicated (sharded factors there would need `out_sharding`s on the
    strategies' products, not yet written). None when no weight has one."""
    named = {
        p: w.sharding
        for p, w in weights.items()
        if isinstance(getattr(w, "sharding", None), NamedSharding)
    }
    if not named:
        return None
    out = {}
    for path, sharding in named.items():
        types = getattr(sharding.mesh, "axis_types", ())
        explicit = any(t == jax.sharding.AxisType.Explicit for t in types)
        out[path] = (
            () if explicit else tuple(sharding.spec),
            dict(sharding.mesh.shape),
        )
    return next(iter(named.values())).mesh, out


def slot_shardings(
    leaves: dict[str, Leaf],
    kinds: tuple[str, ...],
    biases: dict[str, BiasLeaf],
    weights: dict[str, Any],
) -> SlotState | None:
    """Where each slot array lives, from the shardings of the base `weights` it
    adapts: for a weight with a `NamedSharding`, `a` takes the specs of its stack
    and in-axes, `b` those of its stack and out-axes, and the factor left
    unsharded is split along its rank (`Layout.slot_specs`: fully sharded, as
    vLLM's `fully_sharded_loras`); the vectors take those of their group; the
    slot axis, the scale matrices and the bias rows are replicated on the same
    mesh. None when no weight carries a `NamedSharding` (one device, as before)."""
    found = weight_specs(weights)
    if found is None:
        return None
    mesh, specs = found
    rep = NamedSharding(mesh, PartitionSpec())

    def on(parts: tuple) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*parts))

    factors, ins, outs = {}, {}, {}
    for path, leaf in leaves.items():
        lay = leaf.layout.layout
        spec, sizes = specs.get(path, ((), {}))
        a, b = lay.slot_specs(spec, leaf.capacity, sizes)
        factors[path] = (on(a), on(b))
        # The vectors (*stack, slots, *in) and (*stack, slots, *out) follow the
        # weight's groups: `factor_specs` without the rank axis.
        a, b = lay.factor_specs(spec)
        if "ia3" in kinds:
            ins[path] = on(a[:-1])
        if "ia3" in kinds or "dora" in kinds:
            ns = len(lay.stack_axes)
            outs[path] = on((*b[: ns + 1], *b[ns + 2 :]))
    return SlotState(factors, ins, outs, dict.fromkeys(biases, rep), rep, rep)


class DeviceSlots:
    """`n` device slots for the `leaves` (path to `Leaf`), with per-slot vectors
    for the `kinds` that have them and rows for the bias leaves `biases` (path to
    `BiasLeaf`). Every slot starts empty: zero factors, NaN scales."""

    def __init__(
        self,
        leaves: dict[str, Leaf],
        n: int,
        kinds: tuple[str, ...],
        biases: dict[str, BiasLeaf],
        shardings: SlotState | None = None,
    ):
        self.leaves, self.n, self.kinds, self.biases = leaves, n, kinds, biases
        self.shardings = shardings
        # Made by XLA on the device (not `device_put` from NumPy, whose buffers
        # may alias host memory and so could not be donated and updated in place),
        # each array placed as `shardings` says (sharded like the weights it
        # adapts); every write keeps that placement, in place per shard.
        placed = {} if shardings is None else {"out_shardings": shardings}
        self.state = jax.jit(self._empty, **placed)()
        self._write = jax.jit(
            lambda state, slot, new: _write_slot(
                state, slot, new, {p: lf.n_stack for p, lf in leaves.items()}
            ),
            donate_argnums=0,
            **placed,
        )

        def compact(state: SlotState, take: Any) -> SlotState:
            def along_slots(p):
                axis = leaves[p].n_stack
                return lambda x: jnp.take(x, take, axis=axis, mode="clip")

            return SlotState(
                factors={
                    p: jax.tree.map(along_slots(p), f) for p, f in state.factors.items()
                },
                ins={p: along_slots(p)(x) for p, x in state.ins.items()},
                outs={p: along_slots(p)(x) for p, x in state.outs.items()},
                bias={
                    p: jnp.take(x, take, axis=0, mode="clip")
                    for p, x in state.bias.items()
                },
                scales=jnp.take(state.scales, take, axis=1, mode="clip"),
                heads=jnp.take(state.heads, take, axis=1, mode="clip"),
            )

        self._compact = jax.jit(compact, **placed)
        self.names: list[str | None] = [None] * n
        # Each slot's generation: a process-wide token drawn at every change of
        # its content; the indices the bank hands out encode it (see
        # `_core.indices.issued_value`). `_history` says what each recent token was,
        # for messages about indices that no longer match.
        self.generation = [next_token(n) for _ in range(n)]
        self.generations = jnp.asarray(self.generation, jnp.int32)
        self.history: collections.OrderedDict[int, tuple[int, str | None]] = (
            collections.OrderedDict()
        )

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.state))

    def issued(self, slot: int) -> int:
        """The index value that selects `slot`'s current content."""
        return issued_value(self.generation[slot], slot, self.n)

    def compacted(self, take: np.ndarray) -> SlotState:
        """The state with only the slots `take`, in that order."""
        return self._compact(self.state, take)

    def _empty(self) -> SlotState:
        """Every slot empty (built by XLA on the device, see `__init__`): zero
        factors, NaN scales."""
        factors = {
            path: empty_slot(leaf, self.n, jnp) for path, leaf in self.leaves.items()
        }
        nan = jnp.full((len(self.leaves), self.n), np.nan, np.float32)
        ins, outs = {}, {}
        for path, leaf in self.leaves.items():
            lay, stack = leaf.layout, (*leaf.layout.stack_shape, self.n)
            if "ia3" in self.kinds:
                ins[path] = jnp.ones((*stack, *lay.in_shape), leaf.dtype)
            if "ia3" in self.kinds or "dora" in self.kinds:
                outs[path] = jnp.ones((*stack, *lay.out_shape), leaf.dtype)
        bias = {p: jnp.zeros((self.n, b.size), b.dtype) for p, b in self.biases.items()}
        return SlotState(factors, ins, outs, bias, nan, nan)

    def write(self, slot: int, name: str | None, entry: Entry | None) -> None:
        """Writes adapter `name` (its host `entry`), or an empty slot for None,
        into `slot`, and draws the slot a new generation."""
        factors, scales, heads = {}, [], []
        for path, leaf in self.leaves.items():
            if entry is not None and path in entry.arrays:
                a, b, scale, head = entry.arrays[path]  # a LeafEntry
            else:  # zero factors; scale 0 (the adapter lacks the path) or NaN
                a, b = (x.squeeze(leaf.n_stack) for x in empty_slot(leaf, 1))
                scale = head = np.float32(np.nan if entry is None else 0.0)
            factors[path] = (a, b)
            scales.append(scale)
            heads.append(head)
        new = SlotState(
            factors=factors,
            ins=self._vectors("in", entry),
            outs=self._vectors("out", entry),
            bias={
                p: (
                    entry.bias_deltas[p]
                    if entry is not None and p in entry.bias_deltas
                    else np.zeros((b.size,), b.dtype)
                )
                for p, b in self.biases.items()
            },
            scales=np.asarray(scales, np.float32),
            heads=np.asarray(heads, np.float32),
        )
        self.state = self._write(self.state, np.int32(slot), new)
        self.names[slot] = name
        self._new_generation(slot)

    def _vectors(self, key: str, entry: Entry | None) -> dict[str, Any]:
        """One slot's `key` ("in" or "out") vectors: the entry's, else ones."""
        mine = {} if entry is None else getattr(entry, f"{key}_vectors")
        out = {}
        for path in self.state.ins if key == "in" else self.state.outs:
            leaf = self.leaves[path]
            group = leaf.layout.in_shape if key == "in" else leaf.layout.out_shape
            ones = np.ones((*leaf.layout.stack_shape, *group), leaf.dtype)
            out[path] = mine.get(path, ones)
        return out

    def _new_generation(self, slot: int) -> None:
        """A fresh token for `slot` (its content changed): every index issued for
        its previous content stops matching, on the host and on the device."""
        token = next_token(self.n)
        self.generation[slot] = token
        self.history[token] = (slot, self.names[slot])
        while len(self.history) > _HISTORY_KEPT:
            self.history.popitem(last=False)
        self.generations = jnp.asarray(self.generation, jnp.int32)

    def decoded(self, indices: Any) -> Any:
        """Issued (concrete) `indices` as slot numbers, decoded on the host
        against the slots' generations, refusing any value that is not `-1`
        or a current issue."""
        indices = coerce_indices(indices)  # refuses floats, bools, wrapped values
        if indices is None:
            return None
        values = np.asarray(indices)
        if values.size == 0:
            return indices
        if int(values.min()) < -1:
            raise LoraIndexError(unrepresentable_message(int(values.min())))
        decoded = decode_issued_on_host(values, self.generation)
        bad = first_stale(values, decoded, self.n)
        if bad is not None:
            raise StaleIndicesError(self.stale_message(bad))
        return jnp.asarray(decoded)

    def stale_message(self, value: int) -> str:
        """Why the index `value` selects nothing in this bank now."""
        fix = (
            " Call `bank.indices(names)` for each batch right before "
            "`bank.served(idx)` (or `lx.loraify(tree, bank, idx)`), and never "
            "keep indices across loads, removals or updates."
        )
        if value < -1:
            return unrepresentable_message(value) + fix
        slot, token = value % self.n, value // self.n
        if token in self.history and self.history[token][0] == slot:
            was = self.history[token][1]
            now = self.names[slot]
            change = (
                "cleared"
                if now is None
                else f"given to {now!r}"
                if now != was
                else f"updated to a new version of {now!r}"
            )
            return (
                f"Index {value} was issued for {was!r} in slot {slot}, which has "
                f"since been {change}: serving it would give that row another "
                "adapter's (or version's) output." + fix
            )
        return (
            f"Index {value} was not issued by this bank (for its slot {slot} now, or "
            "recently): it comes from another bank, was made by hand, or is far "
            "out of date. A bank's indices are valid only with that bank, for the "
            "adapter version they were issued for." + fix
        )
