"""`AdapterBank`: a fixed number of device slots that adapters come and go through.

A server compiles its forward pass once and keeps it for hours while adapters are
added, removed and requested by name. Everything on the device has a fixed shape:
per adapted leaf, `a: (*stack, slots, *in, capacity)` and `b: (*stack, slots,
capacity, *out)` (and, for the kinds that have them, per-slot vectors), and for
all leaves one `(paths, slots)` matrix of scales and one of head scales.
Adapters live in host memory (NumPy) until a batch asks for them; `indices(names)`
then writes each missing one into a slot (one jitted update with the bank's buffers
donated, so in place), evicting the least recently used adapter that the batch does
not need.

What makes a wrong adapter impossible to serve silently:

- an empty slot's scales are NaN, so a row routed to it (by a traced index, or
  by indices kept past a `remove`) comes out NaN, never the base model's output;
- the indices it hands out encode their slot and the slot's generation (a token
  drawn at every change of the slot's content), so every copy of them selects
  only what they were issued for: concrete ones are checked on the host
  (`StaleIndicesError`), traced ones on the device (NaN rows);
- each load donates the old buffers, so nothing served before a load can be run
  afterwards (`bank.served(...)` kept past it raises `StaleIndicesError` when
  passed to a jitted step; `lx.with_indices` names the problem for a tree).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import secrets
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Int

from .._adapters.adapter import BASE, Adapter
from .._adapters.alora import concrete_input_ids, per_token, require_input_ids
from .._adapters.served import ServedAdapters, dora_norms
from .._adapters.stack import AdapterStack
from .._adapters.targeting import LeafLayout, LoraRule, match_rules
from .._core.errors import LoraIndexError, StaleIndicesError, UnknownAdapterError
from .._core.indices import (
    coerce_indices,
    decode_issued_on_host,
    first_stale,
    issued_value,
    unrepresentable_message,
)
from .._core.paths import (
    bias_leaves,
    close_matches,
    flatten_with_paths,
    unwrapped_parts,
)
from .._rules.quax_compat import tracing

# Slot generations are drawn from one process-wide counter, so no two slots of any
# banks in this process ever hold the same token (an index issued by one bank
# never matches another's slots), starting at a random point so that indices from
# another process almost never do either. Tokens must keep `token * slots + slot`
# within int32.
_TOKENS = itertools.count(secrets.randbelow(2**20) + 1)
_TOKENS_LOCK = threading.Lock()
# How many past generations a bank remembers, for its messages.
_HISTORY_KEPT = 4096


def _next_token(slots: int) -> int:
    with _TOKENS_LOCK:
        token = next(_TOKENS)
    if issued_value(token, slots - 1, slots) > 2**31 - 1:
        raise RuntimeError(
            "AdapterBank: this process has changed bank slots so often that their "
            f"generations no longer fit int32 indices with {slots} slots. Restart "
            "the server process (or use fewer slots)."
        )
    return token


def _check_kinds(kinds: Any) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(
            f"AdapterBank: unknown kind(s) {bad}; `kinds` may hold {KINDS} (VeRA "
            "adapters are served as LoRA)."
        )
    return tuple(k for k in KINDS if k in {"lora", *kinds})


def _with(kinds: tuple[str, ...], kind: str) -> tuple[str, ...]:
    return tuple(k for k in KINDS if k in {*kinds, kind})


@functools.partial(jax.jit, static_argnums=4)
def _dora_norm(w, a, b, scale, layout):
    return dora_norms(w, a, b, jnp.reshape(scale, (1,)), layout)


@dataclasses.dataclass(frozen=True)
class BankEvent:
    """One change to the bank's device slots.

    `kind` is `"load"` (`name` written into `slot`), `"evict"` (`name` left
    `slot` to make room), `"remove"` (`name` was removed and its slot cleared) or
    `"update"` (`name`'s new version written into its `slot`, by `bank.update`).
    """

    kind: str
    name: str
    slot: int


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """What the bank knows about one adapted leaf."""

    layout: LeafLayout
    capacity: int
    dtype: np.dtype

    @property
    def n_stack(self) -> int:
        return len(self.layout.stack_axes)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A registered adapter, on the host: per leaf its factors padded to the
    capacity rank, and its scales (already zero where it lacks a leaf)."""

    arrays: dict[str, tuple[Any, Any, np.float32, np.float32]]
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


# What a bank can hold, beyond LoRA (and VeRA, which is served as the LoRA it
# stands for): each kind's per-slot vectors cost memory and a multiply per row.
KINDS = ("lora", "dora", "ia3", "bias")


def _write_slot(state, slot, new, n_stack):
    """`state` with slot `slot` replaced by `new`'s: each path's factors (the slot
    axis follows the stack axes) and column `slot` of the scale matrices."""
    factors = {
        path: tuple(
            lax.dynamic_update_index_in_dim(
                full, part.astype(full.dtype), slot, n_stack[path]
            )
            for full, part in zip(arrays, new["factors"][path])
        )
        for path, arrays in state["factors"].items()
    }
    out = {"factors": factors}
    for key in ("in", "out"):
        out[key] = {
            path: lax.dynamic_update_index_in_dim(
                full, new[key][path].astype(full.dtype), slot, n_stack[path]
            )
            for path, full in state[key].items()
        }
    out["bias"] = {
        path: lax.dynamic_update_index_in_dim(
            full, new["bias"][path].astype(full.dtype), slot, 0
        )
        for path, full in state["bias"].items()
    }
    for key in ("scales", "heads"):
        col = jnp.asarray(new[key], state[key].dtype)[:, None]
        out[key] = lax.dynamic_update_index_in_dim(state[key], col, slot, 1)
    return out


class AdapterBank:
    """Fixed device slots for serving many adapters with one compiled program.

    ```python
    bank = lx.AdapterBank(model, rules, slots=8)
    bank.add("support", support_adapter)      # host memory; any rank <= capacity
    bank.add("legal", lx.load_adapter("ckpt/legal", model))
    idx = bank.indices(["legal", None, "support"])   # loads into slots as needed
    y = forward(lx.loraify(model, bank, idx), x)      # never recompiles
    ```

    The device arrays never change shape: `slots` adapters at each rule's `rank`
    (the capacity), zero-padded, so `jax.jit(lx.quaxify(f))` compiles once for any
    sequence of `add`, `remove` and `indices`. Adapters are kept on the host until
    a batch asks for them; `indices` writes each missing one into a free slot, or
    else the slot of the least recently used adapter this batch does not need.
    Each write updates one slot in place (the bank's buffers are donated), so it
    costs one adapter's bytes, not the bank's, and a tree loraified before it can
    no longer be run: loraify after `indices`, once per batch.

    Not thread-safe: drive a bank from one serving loop.

    **Arguments:**

    - `tree`: the model or parameter tree to serve.
    - `rules`: `LoraRule`s saying which leaves carry adapters and how they are laid
        out; each rule's `rank` is the capacity (the largest rank) of its leaves.
        Their `alpha` and `use_rslora` are not used: every adapter brings its own.
    - `slots`: how many adapters fit on the device at once (the most distinct
        adapters one batch can use).
    - `dtype`: the factors' dtype on the device; defaults to each weight's own.
    - `events_kept`: how many of the latest loads, evictions and removals
        `bank.events` keeps (`bank.last_events` has those of the latest call).
    - `kinds`: the kinds of adapter the slots hold: `"lora"` (always; VeRA
        adapters are served as the LoRA they stand for), and `"dora"` and
        `"ia3"`, which add per-slot vectors to every leaf (`(*stack, slots,
        *out)`, and `*in` for IA3): memory, and an elementwise multiply per
        adapted product, for every batch. DoRA's vector is `magnitude / ‖W +
        s·A B‖`, computed once when the adapter is added or updated (the base
        weight is frozen). A bank with vectors cannot serve a tied head or a
        row lookup of an adapted leaf (as a stack of such adapters cannot).
        `"bias"` holds, per slot, an update `(slots, out)` of each 1-D `bias`
        leaf next to an adapted leaf (in the same module): the biases of
        modules trained in full (`Adapter.bias_deltas`, PEFT's
        `modules_to_save`, a classification head), served per row by an
        `lx.RowBias`.
    """

    def __init__(
        self,
        tree: Any,
        rules: LoraRule | Sequence[LoraRule],
        *,
        slots: int,
        dtype: Any = None,
        events_kept: int = 1000,
        kinds: Sequence[str] = ("lora",),
    ):
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)):
            raise TypeError(f"AdapterBank: `slots` must be an int, got {slots!r}.")
        if slots < 1:
            raise ValueError(f"AdapterBank: `slots` must be >= 1, got {slots}.")
        self._slots = int(slots)
        matches = match_rules(tree, rules)
        self._leaves: dict[str, _Leaf] = {
            m.path: _Leaf(
                m.layout, m.rank, np.dtype(m.dtype if dtype is None else dtype)
            )
            for m in matches
        }
        self._layouts = tuple(leaf.layout for leaf in self._leaves.values())
        self._kinds = _check_kinds(kinds)
        # DoRA's vectors depend on the base weight: kept (not copied) to compute
        # them when an adapter is added or updated.
        self._base = {}
        if "dora" in self._kinds:
            base = dict(flatten_with_paths(tree)[0])
            self._base = {p: base[p] for p in self._leaves}
        # Bias leaves next to adapted leaves: path -> (out, dtype).
        self._biases: dict[str, tuple[int, np.dtype]] = {}
        if "bias" in self._kinds:
            self._biases = _bias_leaves(tree, self._leaves, dtype)
        # Made by XLA on the device (not `device_put` from NumPy, whose buffers
        # may alias host memory and so could not be donated and updated in place).
        self._state = jax.jit(self._empty_state)()
        self._write = jax.jit(
            lambda state, slot, new: _write_slot(
                state, slot, new, {p: lf.n_stack for p, lf in self._items}
            ),
            donate_argnums=0,
        )
        self._compact = jax.jit(
            lambda state, take: {
                **{
                    key: {
                        p: jax.tree.map(
                            lambda x, p=p: jnp.take(
                                x, take, axis=self._leaves[p].n_stack, mode="clip"
                            ),
                            arrays,
                        )
                        for p, arrays in state[key].items()
                    }
                    for key in ("factors", "in", "out")
                },
                "bias": {
                    p: jnp.take(x, take, axis=0, mode="clip")
                    for p, x in state["bias"].items()
                },
                "scales": jnp.take(state["scales"], take, axis=1, mode="clip"),
                "heads": jnp.take(state["heads"], take, axis=1, mode="clip"),
            }
        )
        self._adapters: dict[str, _Entry] = {}
        self._slot_names: list[str | None] = [None] * self._slots
        # Each slot's generation: a process-wide token drawn at every change of
        # its content; the indices the bank hands out encode it (see
        # `_indices.issued_value`). `_history` says what each recent token was,
        # for messages about indices that no longer match.
        self._generation = [_next_token(self._slots) for _ in range(self._slots)]
        self._generations = jnp.asarray(self._generation, jnp.int32)
        self._history: collections.OrderedDict[int, tuple[int, str | None]] = (
            collections.OrderedDict()
        )
        self._versions: dict[str, int] = {}
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.events: collections.deque[BankEvent] = collections.deque(
            maxlen=events_kept
        )
        """The latest loads, evictions and removals, oldest first (a deque of
        [`BankEvent`][lorax_arrays.BankEvent], keeping the last `events_kept`)."""
        self.last_events: tuple[BankEvent, ...] = ()
        """The events of the latest `indices` or `remove` call (empty when it
        changed no slot)."""

    # -- what the bank holds ----------------------------------------------------

    @property
    def _items(self) -> Iterable[tuple[str, _Leaf]]:
        return self._leaves.items()

    @property
    def slots(self) -> int:
        """How many adapters fit on the device at once."""
        return self._slots

    @property
    def capacity(self) -> dict[str, int]:
        """The largest rank each adapted path accepts."""
        return {path: leaf.capacity for path, leaf in self._items}

    @property
    def layouts(self) -> tuple[LeafLayout, ...]:
        """The `LeafLayout` of each adapted path."""
        return self._layouts

    @property
    def paths(self) -> tuple[str, ...]:
        """The adapted paths, in order."""
        return tuple(self._leaves)

    @property
    def names(self) -> tuple[str, ...]:
        """Every registered adapter's name, in the order they were added."""
        return tuple(self._adapters)

    @property
    def loaded(self) -> dict[str, int]:
        """The adapters on the device now: name to slot, in slot order."""
        return {n: s for s, n in enumerate(self._slot_names) if n is not None}

    @property
    def nbytes(self) -> int:
        """Bytes the bank holds on the device (factors and scales)."""
        return sum(x.nbytes for x in jax.tree.leaves(self._state))

    @property
    def host_nbytes(self) -> int:
        """Bytes of the registered adapters held in host memory."""
        return sum(e.nbytes for e in self._adapters.values())

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __repr__(self) -> str:
        return (
            f"AdapterBank(slots={self._slots}, adapters={len(self)}, "
            f"loaded={self.loaded}, paths={len(self._leaves)})"
        )

    # -- adding and removing ----------------------------------------------------

    def add(self, name: str, adapter: Adapter) -> None:
        """Registers `adapter` under `name` (in host memory; loaded on demand).

        The adapter may adapt any subset of the bank's leaves (it sees the base
        weight elsewhere), at any rank up to the capacity, with its own alpha and
        rsLoRA. Everything is checked here, so a bad adapter never reaches a slot.

        **Arguments:**

        - `name`: the name requests will use; not `"__base__"`, not taken.
        - `adapter`: an [`lorax_arrays.Adapter`][] made for the bank's model (from
            `lx.init_adapter`, `lx.load_adapter`, `lx.load_peft_adapter`, or
            `stack[name]`).
        """
        if not isinstance(name, str):
            raise TypeError(
                f"AdapterBank.add: the name must be a str, got {type(name).__name__}."
            )
        if name == BASE:
            raise ValueError(
                f"AdapterBank.add: {BASE!r} is reserved for the base model."
            )
        if name in self._adapters:
            raise ValueError(
                f"AdapterBank.add: an adapter named {name!r} is already in the bank. "
                f"Remove it first (`bank.remove({name!r})`) to replace it."
            )
        self._adapters[name] = self._entry(name, adapter, "add", on_host=True)
        self._versions[name] = self._versions.get(name, 0) + 1

    def update(self, name: str, adapter: Adapter) -> None:
        """Replaces the weights of the adapter `name` with `adapter`'s: a new
        *version* of it (`bank.version(name)` goes up by one).

        For loops that publish a new policy every step (RL): when `name` is loaded,
        its slot is rewritten in place on the device (device arrays go straight
        from the adapter to the slot: no host round trip, no disk, no recompile),
        and when it is not, the next batch that names it loads the new weights.
        Either way every index issued before the update stops selecting it:
        concrete ones raise `lx.StaleIndicesError`, traced ones give NaN rows, so
        no request is served by the old version after the new one is published.

        **Arguments:**

        - `name`: a registered adapter's name.
        - `adapter`: its new weights, checked as `add` checks them (same leaves
            or any subset of the bank's, any rank up to the capacity). A device
            adapter is kept on the device.
        """
        self._known(name, "AdapterBank.update")
        self._adapters[name] = self._entry(name, adapter, "update", on_host=False)
        self._versions[name] += 1
        if name in self._slot_names:
            slot = self._slot_names.index(name)
            self._put(slot, name)
            self._log([BankEvent("update", name, slot)])

    def version(self, name: str) -> int:
        """How many times the adapter `name` has been given weights in this bank:
        1 after `add`, one more for each `update`, and a name removed and added
        again continues from where it was. Key caches by `(name, version)` (a KV
        or prefix cache keyed by name alone would serve blocks computed with an
        older version).

        **Arguments:**

        - `name`: a registered adapter's name.

        **Returns:**

        The version, from 1.
        """
        self._known(name, "AdapterBank.version")
        return self._versions[name]

    def _entry(self, name: str, adapter: Adapter, what: str, on_host: bool):
        """`adapter` checked and laid out for the bank's slots: per leaf its
        factors padded to the capacity and its scales (NumPy when `on_host`,
        else as they are, so device arrays stay on the device)."""
        if isinstance(adapter, AdapterStack):
            raise TypeError(
                f"AdapterBank.{what} takes one Adapter, got an AdapterStack; add each "
                "of its adapters: `for n in stack.names: bank.add(n, stack[n])`."
            )
        if not isinstance(adapter, Adapter):
            raise TypeError(
                f"AdapterBank.{what}: expected an Adapter, got "
                f"{type(adapter).__name__}."
            )
        for p, d in adapter.bias_deltas.items():
            if "bias" not in self._kinds:
                raise ValueError(
                    f"AdapterBank.{what}({name!r}): the adapter updates the bias "
                    f"{p!r} (a module trained in full, PEFT's `modules_to_save`: "
                    f"a classification head), and this bank's slots hold "
                    f"{self._kinds} only. Build the bank with "
                    f"`kinds={_with(self._kinds, 'bias')}` to serve it."
                )
            if p not in self._biases or tuple(d.shape) != (self._biases[p][0],):
                held = {q: (n,) for q, (n, _) in self._biases.items()}
                raise ValueError(
                    f"AdapterBank.{what}({name!r}): the adapter updates the bias "
                    f"{p!r} with shape {tuple(d.shape)}; the bank holds updates "
                    f"of {held} (the bias leaves next to its adapted leaves)."
                )
        for p in adapter.paths:
            kind = adapter.kind(p)
            needs = {"dora": "dora", "ia3": "ia3", "lora+ia3": "ia3"}.get(kind)
            if needs is not None and needs not in self._kinds:
                raise ValueError(
                    f"AdapterBank.{what}({name!r}): this is a {kind.upper()} adapter "
                    f"(at {p!r}), and this bank's slots hold {self._kinds} only. "
                    f"Build the bank with `kinds={_with(self._kinds, needs)}` to "
                    "serve it (with the rest, in one batch)."
                )
        if not adapter.paths:
            raise ValueError(
                f"AdapterBank.{what}({name!r}): the adapter adapts no leaf; use None "
                f"or {BASE!r} in requests for the base model."
            )
        adapter.check_finite(f"AdapterBank.{what}({name!r})")
        arrays, nbytes = {}, 0
        entry = _Entry(arrays, 0)
        for j, lay in enumerate(adapter.layouts):
            leaf = self._check_leaf(name, lay, adapter.ranks[j], what)
            a, b = adapter.lora_factors(lay.path)  # VeRA: as the LoRA it serves
            scale = np.float32(adapter.scale(lay.path))
            self._vectors(entry, adapter, lay, a, b, scale, on_host)
            a, b = self._padded(a, b, leaf, on_host)
            head = np.float32(0.0 if adapter.lookup_only[j] else scale)
            if adapter.head_only[j]:  # a tied head's update: lookups see the base
                scale = np.float32(0.0)
            arrays[lay.path] = (a, b, scale, head)
            nbytes += a.nbytes + b.nbytes
        nbytes += sum(v.nbytes for v in entry.in_vectors.values())
        nbytes += sum(v.nbytes for v in entry.out_vectors.values())
        xp = np if on_host else jnp
        biases = {
            p: xp.asarray(d).astype(self._biases[p][1])
            for p, d in adapter.bias_deltas.items()
        }
        nbytes += sum(v.nbytes for v in biases.values())
        return dataclasses.replace(
            entry,
            nbytes=nbytes,
            invocation_tokens=adapter.invocation_tokens,
            bias_deltas=biases,
        )

    def _vectors(self, entry, adapter, lay, a, b, scale, on_host) -> None:
        """The vectors the leaf `lay` is served with, into `entry`: IA3's as
        they are, DoRA's `magnitude / ‖W + s·A B‖` (computed on the device from
        the bank's base weight, then kept as the adapter's other arrays are)."""
        path, xp = lay.path, (np if on_host else jnp)
        if path in adapter.in_scales:
            entry.in_vectors[path] = xp.asarray(adapter.in_scales[path])
        g = adapter.out_scales.get(path)
        if path in adapter.magnitudes:
            ns = len(lay.stack_axes)
            a1, b1 = jnp.expand_dims(a, ns), jnp.expand_dims(b, ns)
            norm = _dora_norm(self._base[path], a1, b1, scale, lay.layout)
            ratio = jnp.asarray(adapter.magnitudes[path]) / jnp.squeeze(norm, ns)
            g = ratio if g is None else g * ratio
        if g is not None:
            entry.out_vectors[path] = np.asarray(g) if on_host else jnp.asarray(g)

    def remove(self, name: str) -> None:
        """Forgets the adapter `name`; if it is loaded, its slot is cleared (its
        scales become NaN, so indices still pointing there give NaN rows).

        **Arguments:**

        - `name`: a registered adapter's name.
        """
        self._known(name, "AdapterBank.remove")
        del self._adapters[name]
        self._recent.pop(name, None)
        events = []
        if name in self._slot_names:
            slot = self._slot_names.index(name)
            self._put(slot, None)
            events.append(BankEvent("remove", name, slot))
        self._log(events)

    # -- serving ----------------------------------------------------------------

    def indices(
        self,
        names: Sequence[Any],
        *,
        input_ids: Int[ArrayLike, "batch seq"] | None = None,
    ) -> Int[Array, "*batch"]:
        """Slot indices for a batch of requests, loading adapters as needed.

        Each adapter the batch names that is not on the device is written into a
        free slot, or else into the slot of the least recently used adapter that
        this batch does not use. Pass the result to `lx.loraify(tree, bank, idx)`
        before the next call to `indices`.

        **Arguments:**

        - `names`: one adapter name per request (`None` or `"__base__"` for the
            base model); a nested list `(batch, seq)` gives one per token.
        - `input_ids`: the requests' tokens `(batch, seq)`, needed when one of
            them names an activated LoRA (`Adapter.invocation_tokens`): its row
            then serves the base model before the last occurrence of the
            invocation sequence and the adapter from there on (the base model
            throughout where it does not occur), as PEFT serves aLoRA; the
            result is per token. For decode steps after that prompt, use the
            last column of those indices.

        **Returns:**

        int32 indices of the shape of `names`, for `lx.loraify(tree, bank, idx)`.

        **Raises:**

        `KeyError` for a name that was never added (listing the known ones);
        `ValueError` when the batch needs more distinct adapters than there are
        slots.
        """
        grid = self._name_grid(names)
        grid = self._activated(grid, input_ids)  # checks every name is known
        wanted = list(dict.fromkeys(n for n in grid.flat if n is not None))
        if len(wanted) > self._slots:
            raise ValueError(
                f"AdapterBank.indices: this batch uses {len(wanted)} distinct "
                f"adapters, but the bank has {self._slots} slots. Split the batch "
                f"so that each part uses at most {self._slots} adapters, or build "
                "the bank with more slots."
            )
        needed, events = set(wanted), []
        for n in wanted:
            if n not in self._slot_names:
                events += self._load(n, needed)
        self._log(events)
        for n in wanted:  # most recently used last
            self._recent.pop(n, None)
            self._recent[n] = None
        issued = {
            n: issued_value(self._generation[s], s, self._slots)
            for s, n in enumerate(self._slot_names)
            if n is not None
        }
        out = np.full(grid.shape, -1, np.int32)
        for pos, n in np.ndenumerate(grid):
            if n is not None:
                out[pos] = issued[n]
        return jnp.asarray(out)

    def served(
        self, indices: Int[ArrayLike, ...] | None = None, *, compact: bool = False
    ) -> ServedAdapters:
        """What `lx.loraify` serves from the bank's slots now, for a batch's
        `indices` (from `bank.indices(names)`): one pytree, to pass as an
        argument into the jitted step that calls `lx.loraify(params, served)`
        inside, so a step costs one dispatch and no Python per leaf:

        ```python
        @jax.jit
        def step(params, served, x):
            return lx.quaxify(forward)(lx.loraify(params, served), x)

        y = step(params, bank.served(bank.indices(names)), x)
        ```

        Call it after `indices` (which may load adapters, rewriting slots in
        place) and outside `jax.jit`: traced, the bank's arrays would be baked
        into the program as they were when it was traced.

        **Arguments:**

        - `indices`: the bank's issued indices, checked here against the slots'
            current generations (`lx.StaleIndicesError` for one that no longer
            selects what it was issued for); `None` to set them later.
        - `compact`: serve only the slots the indices use, copied into a stack
            of the next power of two in size (see [`lorax_arrays.loraify`][]).

        **Returns:**

        A [`lorax_arrays.ServedAdapters`][] holding the bank's arrays (not
        copies; after the next load, update or removal they are gone) and the
        indices as slot numbers.
        """
        if tracing():
            raise RuntimeError(
                "AdapterBank.served (or lx.loraify with a bank) was called inside "
                "a traced function (jax.jit, vmap, grad or lx.quaxify): the bank's "
                "arrays would be baked into the compiled program as they are now, "
                "and later loads would not reach it. Call `bank.served(idx)` "
                "outside and pass its result in as an argument: "
                "`step(params, bank.served(bank.indices(names)), x)` with "
                "`lx.loraify(params, served)` inside `step`."
            )
        slots = self._decoded(indices)
        state = self._state
        generations = self._generations
        if compact:
            if indices is None:
                raise ValueError(
                    "loraify(..., compact=True) needs the batch's indices (from "
                    "`bank.indices(names)`), to know which slots it uses."
                )
            slots = np.asarray(slots)
            used = np.unique(slots[slots >= 0])
            size = min(self._slots, 1 << max(0, int(used.size) - 1).bit_length())
            if size < self._slots:  # else as big as the bank: serve the bank
                take = np.full((size,), used[0] if used.size else 0, np.int32)
                take[: used.size] = used
                position = np.full((self._slots + 1,), -1, np.int32)
                position[used] = np.arange(used.size, dtype=np.int32)
                state, generations = self._compact(state, take), None
                slots = position[slots]
            slots = jnp.asarray(slots)
        return ServedAdapters.make(
            factors=dict(state["factors"]),
            scales=state["scales"],
            head_scales=state["heads"],
            in_scales=dict(state["in"]),
            out_scales=dict(state["out"]),
            magnitudes={},
            dora={},
            generations=generations,
            indices=slots,
            layouts=self.layouts,
            compact=compact and generations is None,
            bias_deltas=dict(state["bias"]),
        )

    # -- internals ----------------------------------------------------------------

    def _empty_state(self) -> dict[str, Any]:
        """Every slot empty (built by XLA on the device, see `__init__`): zero
        factors, NaN scales."""
        factors = {
            path: self._empty_slot(leaf, self._slots, jnp) for path, leaf in self._items
        }
        nan = jnp.full((len(self._leaves), self._slots), np.nan, np.float32)
        ins, outs = {}, {}
        for path, leaf in self._items:
            lay, stack = leaf.layout, (*leaf.layout.stack_shape, self._slots)
            if "ia3" in self._kinds:
                ins[path] = jnp.ones((*stack, *lay.in_shape), leaf.dtype)
            if "ia3" in self._kinds or "dora" in self._kinds:
                outs[path] = jnp.ones((*stack, *lay.out_shape), leaf.dtype)
        bias = {
            p: jnp.zeros((self._slots, n), dt) for p, (n, dt) in self._biases.items()
        }
        return {
            "factors": factors,
            "in": ins,
            "out": outs,
            "bias": bias,
            "scales": nan,
            "heads": nan,
        }

    @staticmethod
    def _empty_slot(leaf: _Leaf, n: int, xp: Any = np) -> tuple[Any, Any]:
        """`n` empty slots' zero factors (NumPy, or `xp=jnp`)."""
        lay, r = leaf.layout, leaf.capacity
        a_shape, b_shape = lay.factor_shapes(r, n)
        return xp.zeros(a_shape, leaf.dtype), xp.zeros(b_shape, leaf.dtype)

    def _check_leaf(
        self, name: str, lay: LeafLayout, rank: int, what: str = "add"
    ) -> _Leaf:
        leaf = self._leaves.get(lay.path)
        if leaf is None:
            near = close_matches(lay.path, self._leaves)
            raise ValueError(
                f"AdapterBank.{what}({name!r}): the adapter adapts {lay.path!r}, which "
                f"is not one of the bank's leaves.{near}"
                f" The bank's rules adapt: {', '.join(map(repr, self._leaves))}. "
                "Build the bank with a rule that covers this leaf."
            )
        if not leaf.layout.compatible(lay):
            have, got = leaf.layout, lay
            raise ValueError(
                f"AdapterBank.{what}({name!r}): at {lay.path!r} the adapter is laid "
                f"out as shape {got.shape}, in_axes={got.in_axes}, "
                f"out_axes={got.out_axes}, stack_axes={got.stack_axes}, but the "
                f"bank as shape {have.shape}, in_axes={have.in_axes}, "
                f"out_axes={have.out_axes}, stack_axes={have.stack_axes}. Make the "
                "adapter with the bank's rules (or give the rule the adapter's axes)."
            )
        if rank > leaf.capacity:
            raise ValueError(
                f"AdapterBank.{what}({name!r}): at {lay.path!r} the adapter has rank "
                f"{rank}, above the bank's capacity {leaf.capacity} there. Build the "
                f"bank with `LoraRule(..., rank={rank})` (or larger) for this leaf."
            )
        return leaf

    @staticmethod
    def _padded(a, b, leaf: _Leaf, on_host: bool) -> tuple[Any, Any]:
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

    def _activated(self, grid: np.ndarray, input_ids: Any) -> np.ndarray:
        """`grid` (names per request) spread over the requests' tokens where
        `input_ids` is given, activated LoRAs from their invocation on."""
        what = "AdapterBank.indices"
        for n in grid.flat:
            if n is not None:
                self._known(n, what)

        def tokens(n):
            return None if n is None else self._adapters[n].invocation_tokens

        if input_ids is None:
            names = list(grid.flat)
            require_input_ids(names, [tokens(n) for n in names], what)
            return grid
        if grid.ndim != 1:
            raise ValueError(
                f"{what}: with input_ids, give one name per request (a flat list); "
                f"got names of shape {grid.shape}."
            )
        ids = concrete_input_ids(input_ids, grid.shape[0], what)
        out = np.empty(ids.shape, dtype=object)
        out[...] = per_token(list(grid), ids, lambda i: tokens(grid[i]), None)
        return out

    def _name_grid(self, names: Sequence[Any]) -> np.ndarray:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError(
                "AdapterBank.indices: expected a list of adapter names (one per "
                f"request, None for the base model), got {type(names).__name__}."
            )
        grid = np.empty(np.shape(np.array(names, dtype=object)), dtype=object)
        try:
            grid[...] = names
        except ValueError as e:
            raise ValueError(
                "AdapterBank.indices: `names` must be a flat list (one per request) "
                "or a rectangular nested list (one per token)."
            ) from e
        rows = [n for n in grid.flat if isinstance(n, (list, tuple))]
        if rows:  # NumPy made a ragged nested list into an array of lists
            lengths = [len(n) if isinstance(n, (list, tuple)) else 1 for n in names]
            raise ValueError(
                "AdapterBank.indices: per-token names must form a rectangular "
                f"nested list (one row per request, one name per token), but the "
                f"rows have lengths {lengths}. Pad the shorter rows (with None for "
                "the base model, or the request's own adapter name)."
            )
        for pos, n in np.ndenumerate(grid):
            if n is None or n == BASE:
                grid[pos] = None
            elif not isinstance(n, str):
                raise TypeError(
                    f"AdapterBank.indices: entry {pos} is {n!r}; entries must be "
                    f"adapter names (str), None or {BASE!r}."
                )
        return grid

    def _known(self, name: str, what: str) -> None:
        if name not in self._adapters:
            hint = close_matches(str(name), self._adapters)
            known = sorted(self._adapters)
            shown = ", ".join(map(repr, known[:20]))
            more = f" and {len(known) - 20} more" if len(known) > 20 else ""
            raise UnknownAdapterError(
                f"{what}: no adapter named {name!r}.{hint} The bank knows "
                f"{len(known)}: [{shown}]{more}; add it with `bank.add(name, "
                "adapter)`."
            )

    def _load(self, name: str, needed: set[str]) -> list[BankEvent]:
        events = []
        if None in self._slot_names:
            slot = self._slot_names.index(None)
        else:
            victim = next(n for n in self._recent if n not in needed)
            slot = self._slot_names.index(victim)
            self._recent.pop(victim)
            events.append(BankEvent("evict", victim, slot))
        self._put(slot, name)
        return [*events, BankEvent("load", name, slot)]

    def _log(self, events: list[BankEvent]) -> None:
        self.events.extend(events)
        self.last_events = tuple(events)

    def _put(self, slot: int, name: str | None) -> None:
        """Writes adapter `name` (or an empty slot, for None) into `slot`."""
        entry = self._adapters[name] if name is not None else None
        factors, scales, heads = {}, [], []
        for path, leaf in self._items:
            if entry is not None and path in entry.arrays:
                a, b, scale, head = entry.arrays[path]
            else:  # zero factors; scale 0 (the adapter lacks the path) or NaN
                a, b = (x.squeeze(leaf.n_stack) for x in self._empty_slot(leaf, 1))
                scale = head = np.float32(np.nan if entry is None else 0.0)
            factors[path] = (a, b)
            scales.append(scale)
            heads.append(head)
        new = {
            "factors": factors,
            "in": self._slot_vectors("in", entry),
            "out": self._slot_vectors("out", entry),
            "bias": {
                p: (
                    entry.bias_deltas[p]
                    if entry is not None and p in entry.bias_deltas
                    else np.zeros((n,), dt)
                )
                for p, (n, dt) in self._biases.items()
            },
            "scales": np.asarray(scales, np.float32),
            "heads": np.asarray(heads, np.float32),
        }
        self._state = self._write(self._state, np.int32(slot), new)
        self._slot_names[slot] = name
        self._new_generation(slot)

    def _slot_vectors(self, key: str, entry: _Entry | None) -> dict[str, Any]:
        """One slot's `key` ("in" or "out") vectors: the entry's, else ones."""
        mine = {} if entry is None else getattr(entry, f"{key}_vectors")
        out = {}
        for path in self._state[key]:
            leaf = self._leaves[path]
            group = leaf.layout.in_shape if key == "in" else leaf.layout.out_shape
            ones = np.ones((*leaf.layout.stack_shape, *group), leaf.dtype)
            out[path] = mine.get(path, ones)
        return out

    def _new_generation(self, slot: int) -> None:
        """A fresh token for `slot` (its content changed): every index issued for
        its previous content stops matching, on the host and on the device."""
        token = _next_token(self._slots)
        self._generation[slot] = token
        self._history[token] = (slot, self._slot_names[slot])
        while len(self._history) > _HISTORY_KEPT:
            self._history.popitem(last=False)
        self._generations = jnp.asarray(self._generation, jnp.int32)

    def _decoded(self, indices: Any) -> Any:
        """Issued (concrete) `indices` as slot numbers, decoded on the host
        against the bank's own generations, refusing any value that is not `-1`
        or a current issue."""
        indices = coerce_indices(indices)  # refuses floats, bools, wrapped values
        if indices is None:
            return None
        values = np.asarray(indices)
        if values.size == 0:
            return indices
        if int(values.min()) < -1:
            raise LoraIndexError(unrepresentable_message(int(values.min())))
        decoded = decode_issued_on_host(values, self._generation)
        bad = first_stale(values, decoded, self._slots)
        if bad is not None:
            raise StaleIndicesError(self._stale_message(bad))
        return jnp.asarray(decoded)

    def _stale_message(self, value: int) -> str:
        """Why the index `value` selects nothing in this bank now."""
        fix = (
            " Call `bank.indices(names)` for each batch right before "
            "`bank.served(idx)` (or `lx.loraify(tree, bank, idx)`), and never "
            "keep indices across loads, removals or updates."
        )
        if value < -1:
            return unrepresentable_message(value) + fix
        slot, token = value % self._slots, value // self._slots
        if token in self._history and self._history[token][0] == slot:
            was = self._history[token][1]
            now = self._slot_names[slot]
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


def _bias_leaves(
    tree: Any, leaves: dict[str, _Leaf], dtype: Any
) -> dict[str, tuple[int, np.dtype]]:
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
            out[path] = (shape[0], np.dtype(dt if dtype is None else dtype))
    return out
