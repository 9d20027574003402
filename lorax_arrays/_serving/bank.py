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
from collections.abc import Iterable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from .._adapters.adapter import BASE, Adapter
from .._adapters.alora import concrete_input_ids, per_token, require_input_ids
from .._adapters.kinds import KIND_OF_VECTOR, VECTOR_FIELDS
from .._adapters.served import ServedAdapters
from .._adapters.stack import AdapterStack
from .._adapters.targeting import LeafLayout, LoraRule, match_rules
from .._core.errors import UnknownAdapterError
from .._core.paths import (
    close_matches,
    flatten_with_paths,
)
from .._rules.quax_compat import tracing
from .slots import (
    BiasLeaf,
    DeviceSlots,
    Entry,
    Leaf,
    LeafEntry,
    bias_leaves_near,
    dora_norm,
    padded,
    slot_shardings,
)


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


# What a bank can hold, beyond LoRA (and VeRA, which is served as the LoRA it
# stands for): each kind's per-slot vectors cost memory and a multiply per row.
KINDS = ("lora", "dora", "ia3", "bias")


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
        self._leaves: dict[str, Leaf] = {
            m.path: Leaf(
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
        self._biases: dict[str, BiasLeaf] = {}
        if "bias" in self._kinds:
            self._biases = bias_leaves_near(tree, self._leaves, dtype)
        weights = dict(flatten_with_paths(tree)[0])
        shardings = slot_shardings(
            self._leaves,
            self._kinds,
            self._biases,
            {p: weights[p] for p in self._leaves},
        )
        self._device = DeviceSlots(
            self._leaves, self._slots, self._kinds, self._biases, shardings
        )
        self._adapters: dict[str, Entry] = {}
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
    def _items(self) -> Iterable[tuple[str, Leaf]]:
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
        return {n: s for s, n in enumerate(self._device.names) if n is not None}

    @property
    def nbytes(self) -> int:
        """Bytes the bank holds on the device (factors and scales)."""
        return self._device.nbytes

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
        if name in self._device.names:
            slot = self._device.names.index(name)
            self._device.write(slot, name, self._adapters[name])
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
            if p not in self._biases or tuple(d.shape) != (self._biases[p].size,):
                held = {q: (b.size,) for q, b in self._biases.items()}
                raise ValueError(
                    f"AdapterBank.{what}({name!r}): the adapter updates the bias "
                    f"{p!r} with shape {tuple(d.shape)}; the bank holds updates "
                    f"of {held} (the bias leaves next to its adapted leaves)."
                )
        for p in adapter.paths:
            kind = adapter.kind(p)
            served_by = {
                KIND_OF_VECTOR[f].bank_kind
                for f in VECTOR_FIELDS
                if p in getattr(adapter, f)
            }
            needs = next((k for k in sorted(served_by) if k not in self._kinds), None)
            if needs is not None:
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
        entry = Entry(arrays, 0)
        for j, lay in enumerate(adapter.layouts):
            leaf = self._check_leaf(name, lay, adapter.ranks[j], what)
            a, b = adapter.lora_factors(lay.path)  # VeRA: as the LoRA it serves
            scale = np.float32(adapter.scale(lay.path))
            self._vectors(entry, adapter, lay, a, b, scale, on_host)
            a, b = padded(a, b, leaf, on_host)
            head = np.float32(0.0 if adapter.lookup_only[j] else scale)
            if adapter.head_only[j]:  # a tied head's update: lookups see the base
                scale = np.float32(0.0)
            arrays[lay.path] = LeafEntry(a, b, scale, head)
            nbytes += a.nbytes + b.nbytes
        nbytes += sum(v.nbytes for v in entry.in_vectors.values())
        nbytes += sum(v.nbytes for v in entry.out_vectors.values())
        xp = np if on_host else jnp
        biases = {
            p: xp.asarray(d).astype(self._biases[p].dtype)
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
            norm = dora_norm(self._base[path], a1, b1, scale, lay.layout)
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
        if name in self._device.names:
            slot = self._device.names.index(name)
            self._device.write(slot, None, None)
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
            if n not in self._device.names:
                events += self._load(n, needed)
        self._log(events)
        for n in wanted:  # most recently used last
            self._recent.pop(n, None)
            self._recent[n] = None
        issued = {
            n: self._device.issued(s)
            for s, n in enumerate(self._device.names)
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
        slots = self._device.decoded(indices)
        state = self._device.state
        generations = self._device.generations
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
                state, generations = self._device.compacted(take), None
                slots = position[slots]
            slots = jnp.asarray(slots)
        return ServedAdapters.make(
            factors=dict(state.factors),
            scales=state.scales,
            head_scales=state.heads,
            in_scales=dict(state.ins),
            out_scales=dict(state.outs),
            magnitudes={},
            dora={},
            generations=generations,
            indices=slots,
            layouts=self.layouts,
            compact=compact and generations is None,
            bias_deltas=dict(state.bias),
        )

    # -- internals ----------------------------------------------------------------

    def _check_leaf(
        self, name: str, lay: LeafLayout, rank: int, what: str = "add"
    ) -> Leaf:
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
        if None in self._device.names:
            slot = self._device.names.index(None)
        else:
            victim = next(n for n in self._recent if n not in needed)
            slot = self._device.names.index(victim)
            self._recent.pop(victim)
            events.append(BankEvent("evict", victim, slot))
        self._device.write(slot, name, self._adapters[name])
        return [*events, BankEvent("load", name, slot)]

    def _log(self, events: list[BankEvent]) -> None:
        self.events.extend(events)
        self.last_events = tuple(events)
