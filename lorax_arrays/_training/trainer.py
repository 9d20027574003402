"""`AdapterTrainer`: many adapters trained in one step, each exactly as if it were
trained alone.

The host side: tenants by name and the slot each holds, their metadata and
hyperparameters, and a batch's names as slot numbers and per-row weights. The
device state is `slots.py`'s, the jitted step `step.py`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import PRNGKeyArray, PyTree

from .._adapters.adapter import BASE, Adapter
from .._adapters.init import init_adapter
from .._adapters.stack import AdapterStack
from .._adapters.targeting import LoraRule, match_rules
from .._core.errors import UnknownAdapterError
from .._core.paths import close_matches, flatten_with_paths
from .slots import (
    Leaf,
    SlotConfig,
    Tenant,
    adapter_of,
    empty_config,
    empty_params,
    get_hyperparameter,
    set_hyperparameter,
    slot_params,
    slot_shardings,
    state_shardings,
    write_slot,
)
from .step import make_step

# The kinds a trainer's slots can hold, beyond LoRA, and the rule variants that
# ask for them.
KINDS = ("lora", "dora", "ia3", "vera")
_KIND_OF_VARIANT = {
    "dora": "dora",
    "ia3": "ia3",
    "ia3_feedforward": "ia3",
    "vera": "vera",
}


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


@jax.jit
def _take(state: Any, slot: Any) -> Any:
    return jax.tree.map(
        lambda x: lax.dynamic_index_in_dim(x, slot, 0, keepdims=False), state
    )


class AdapterTrainer:
    """Fixed device slots for training many adapters ("tenants") in one step,
    each exactly as if it were trained alone.

    ```python
    trainer = lx.AdapterTrainer(params, rules, slots=8,
                                optimizer=optax.inject_hyperparams(optax.adam)(
                                    learning_rate=1e-3))
    trainer.add("support", key=jax.random.key(0))           # PEFT's initial values
    trainer.add("legal", lx.load_peft_adapter(path, params), learning_rate=3e-4,
                max_grad_norm=1.0)
    losses = trainer.step(loss_fn, batch, ["legal", "support", None, "legal"])
    bank.update("legal", trainer.adapter("legal"))          # publish to a server
    ```

    Each slot holds one tenant's adapter, zero-padded to the capacity rank, and
    its own optimizer state; `step` runs every tenant's rows in one forward and
    backward pass and updates each slot by its own gradient:

    - a tenant's loss is the mean over *its own* rows (never a batch mean), so
      its gradient does not depend on who else is in the batch;
    - clipping (`max_grad_norm`) is by the tenant's own global norm, and the
      optimizer runs per slot (`jax.vmap` over the slot axis), with the
      tenant's own state and learning rate;
    - base and padding rows (`None`) contribute nothing;
    - a tenant whose gradient is not finite keeps its weights and optimizer state
      (it is listed in `trainer.last_skipped`), and nobody else is affected;
    - a slot with no rows in a batch is not stepped (its optimizer state too).

    Shapes never change, so `add` and `remove` between steps never recompile.

    Not thread-safe: drive a trainer from one training loop.

    **Arguments:**

    - `tree`: the model or parameter tree (frozen: no gradient reaches it).
    - `rules`: `LoraRule`s saying which leaves carry adapters; each rule's `rank`
        is the capacity (the largest rank a tenant may have) of its leaves.
        Their `alpha` is used only by `add(name, key=...)`.
    - `slots`: how many tenants the trainer holds at once.
    - `optimizer`: an optax `GradientTransformation` (anything with optax's
        `init(params)` and `update(grads, state, params)`), applied to each slot
        on its own. For per-tenant learning rates build it with
        `optax.inject_hyperparams(optax.adam)(learning_rate=...)`: the rate is
        then part of each slot's state.
    - `kinds`: the adapter kinds the slots hold besides LoRA: `"dora"` (a
        magnitude per out-feature), `"ia3"` (IA3's vectors) and `"vera"` (VeRA's
        trained `d` and `b`, its projections held frozen in the factors), each
        adding per-slot vectors to every leaf. Defaults to the kinds the rules'
        variants name.
    - `dtype`: the slots' dtype; defaults to each weight's own.
    - `strategy`: how the low-rank terms are computed: `"gather"` (each row's
        factors gathered; the default, for one tenant per row) or `"segment"`
        (rows sorted by tenant; for one tenant per token and many tenants).
        Both keep a tenant's non-finite rows out of other tenants' gradients;
        `"dense"` would not, and is refused.
    """

    def __init__(
        self,
        tree: Any,
        rules: LoraRule | Sequence[LoraRule],
        *,
        slots: int,
        optimizer: Any,
        kinds: Sequence[str] | None = None,
        dtype: Any = None,
        strategy: str = "gather",
    ):
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)):
            raise TypeError(f"AdapterTrainer: `slots` must be an int, got {slots!r}.")
        if slots < 1:
            raise ValueError(f"AdapterTrainer: `slots` must be >= 1, got {slots}.")
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(
                "AdapterTrainer: `optimizer` must be an optax GradientTransformation "
                f"(with `init` and `update`), got {type(optimizer).__name__}; e.g. "
                "`optax.adam(1e-3)`."
            )
        matches = match_rules(tree, rules)
        if kinds is None:
            kinds = [_KIND_OF_VARIANT.get(m.rule.variant, "lora") for m in matches]
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(
                f"AdapterTrainer: unknown kind(s) {bad}; `kinds` may hold {KINDS}."
            )
        self._kinds = tuple(k for k in KINDS if k in {"lora", *kinds})
        if strategy not in ("gather", "segment"):
            raise ValueError(
                f"AdapterTrainer: strategy={strategy!r}; a trainer computes the "
                "low-rank terms with 'gather' (the default) or 'segment'. Not "
                "'dense' (nor 'auto', which may pick it): its backward pass "
                "meets every row's gradient with every slot's factors, so one "
                "tenant's non-finite rows would reach every tenant's gradient."
            )
        self._strategy = strategy
        self._n = int(slots)
        self._tree, self._rules, self._optimizer = tree, rules, optimizer
        self._leaves = {
            m.path: Leaf(
                m.layout, m.rank, np.dtype(m.dtype if dtype is None else dtype)
            )
            for m in matches
        }
        self._paths = list(self._leaves)

        def empty():
            params = empty_params(self._leaves, self._n, self._kinds)
            return params, jax.vmap(optimizer.init)(params)

        # Placed like the weights they adapt when those carry NamedShardings
        # (and every write keeps that placement, in place per shard).
        weights = dict(flatten_with_paths(tree)[0])
        shardings = slot_shardings(
            self._leaves, self._kinds, {p: weights[p] for p in self._leaves}
        )
        placed: dict[str, Any] = {}
        if shardings is not None:
            shapes = jax.eval_shape(empty)
            placed = {
                "out_shardings": (
                    shardings,
                    state_shardings(shapes[1], shapes[0], shardings),
                )
            }
        self._placed = placed
        # Made by XLA (not from NumPy buffers), so they can be donated.
        self._params, self._opt_state = jax.jit(empty, **placed)()
        self._init = jax.jit(optimizer.init)
        self._read = jax.jit(
            lambda params, slot, tenant: adapter_of(_take(params, slot), tenant),
            static_argnums=2,
        )
        self._write = jax.jit(
            lambda p, s, slot, new_p, new_s: (
                write_slot(p, slot, new_p),
                write_slot(s, slot, new_s),
            ),
            donate_argnums=(0, 1),
            **placed,
        )
        self._host_config = empty_config(len(self._paths), self._n)
        self._config = self._device_config()
        self._tenants: dict[str, Tenant] = {}
        self._free = list(range(self._n))
        arrays, self._treedef = jax.tree.flatten(tree)
        self._static = {i: x for i, x in enumerate(arrays) if not _is_array(x)}
        self._arrays = [None if i in self._static else x for i, x in enumerate(arrays)]
        self._steps: dict[tuple[Any, int], Callable] = {}
        self.last_skipped: tuple[str, ...] = ()
        """The tenants whose gradient was not finite in the latest `step` (their
        weights and optimizer state were kept as they were)."""

    # -- what the trainer holds -----------------------------------------------------

    @property
    def slots(self) -> int:
        """How many tenants the trainer holds at once."""
        return self._n

    @property
    def names(self) -> tuple[str, ...]:
        """The tenants' names, in the order they were added."""
        return tuple(self._tenants)

    @property
    def capacity(self) -> dict[str, int]:
        """The largest rank each adapted path accepts."""
        return {p: leaf.capacity for p, leaf in self._leaves.items()}

    @property
    def kinds(self) -> tuple[str, ...]:
        """The adapter kinds the slots hold."""
        return self._kinds

    def __len__(self) -> int:
        return len(self._tenants)

    def __contains__(self, name: object) -> bool:
        return name in self._tenants

    def __repr__(self) -> str:
        return (
            f"AdapterTrainer(slots={self._n}, tenants={list(self._tenants)}, "
            f"paths={len(self._paths)}, kinds={self._kinds})"
        )

    # -- tenants --------------------------------------------------------------------

    def add(
        self,
        name: str,
        adapter: Adapter | None = None,
        *,
        key: PRNGKeyArray | None = None,
        learning_rate: float | None = None,
        max_grad_norm: float | None = None,
        optimizer_state: PyTree | None = None,
    ) -> None:
        """Adds a tenant: an adapter to train, in a free slot, with a fresh
        optimizer state (or the one given, to resume).

        **Arguments:**

        - `name`: the name its rows will carry in `step`; not `"__base__"`, not
            taken.
        - `adapter`: its starting weights (from `lx.init_adapter`,
            `lx.load_adapter`, `lx.load_peft_adapter`, or an earlier
            `trainer.adapter(name)`): any subset of the trainer's leaves, any
            rank up to the capacity, its own alpha and rsLoRA; LoRA, DoRA, IA3 or VeRA
            (when the trainer's `kinds` hold them).
        - `key`: instead of `adapter`, a PRNG key: a new adapter at PEFT's
            initial values (`lx.init_adapter(tree, rules, key=key)`, the
            trainer's rules at their capacity rank).
        - `learning_rate`: its own learning rate (the optimizer must be built
            with `optax.inject_hyperparams`); `None` is the optimizer's (or the
            one in `optimizer_state`).
        - `max_grad_norm`: clip its gradient to this global norm (its own norm
            over its arrays); `None`: no clipping.
        - `optimizer_state`: a state from `trainer.optimizer_state(name)` (of a
            trainer with the same rules and optimizer), to resume exactly.

        **Raises:**

        `ValueError` when every slot is taken (naming both numbers), for a taken
        or reserved name, and for an adapter the slots cannot hold (naming the
        leaf and the fix).
        """
        what = f"AdapterTrainer.add({name!r})"
        if not isinstance(name, str):
            raise TypeError(
                f"AdapterTrainer.add: the name must be a str, got "
                f"{type(name).__name__}."
            )
        if name == BASE:
            raise ValueError(f"{what}: {BASE!r} is reserved for base-model rows.")
        if name in self._tenants:
            raise ValueError(
                f"{what}: a tenant named {name!r} is already training. Remove it "
                f"first (`trainer.remove({name!r})`) to replace it."
            )
        if len(self._tenants) >= self._n:
            raise ValueError(
                f"{what}: this would make {len(self._tenants) + 1} tenants, but "
                f"the trainer has {self._n} slots, all taken. Remove one "
                "(`trainer.remove(name)`) or build the trainer with more slots "
                f"(slots={self._n + 1} or more)."
            )
        if (adapter is None) == (key is None):
            raise ValueError(
                f"{what}: give either an `adapter` or a `key` (for a new adapter "
                "at PEFT's initial values), not both or neither."
            )
        if adapter is None:
            adapter = init_adapter(self._tree, self._rules, key=key)
        self._check_adapter(adapter, what)
        clip = _positive(max_grad_norm, "max_grad_norm", what)
        lr = _positive(learning_rate, "learning_rate", what)
        new_params = slot_params(adapter, self._leaves, self._kinds)
        if optimizer_state is None:
            new_state = self._init(new_params)
        else:
            new_state = self._check_state(optimizer_state, what)
        if lr is not None:
            new_state = set_hyperparameter(new_state, "learning_rate", lr, what)
        slot = self._free.pop(0)
        self._params, self._opt_state = self._write(
            self._params, self._opt_state, np.int32(slot), new_params, new_state
        )
        tenant = Tenant(
            slot=slot,
            layouts=adapter.layouts,
            ranks=adapter.ranks,
            alphas=adapter.alphas,
            use_rslora=adapter.use_rslora,
            lookup_only=adapter.lookup_only,
            head_only=adapter.head_only,
            dora=frozenset(adapter.magnitudes),
            ins=frozenset(adapter.in_scales),
            outs=frozenset(adapter.out_scales),
            max_grad_norm=clip,
            vera=frozenset(adapter.vera),
        )
        self._set_config(tenant, adapter)
        self._tenants[name] = tenant

    def remove(self, name: str) -> None:
        """Removes the tenant `name`; its slot is free for the next `add`.

        **Arguments:**

        - `name`: a tenant's name.
        """
        tenant = self._tenant(name, "AdapterTrainer.remove")
        del self._tenants[name]
        self._set_config(tenant, None)
        self._free.append(tenant.slot)
        self._free.sort()

    def adapter(self, name: str) -> Adapter:
        """The tenant's current weights, as an `lx.Adapter` at its own rank and
        leaves (device arrays, copies of the slot's: the next `step` does not
        change them). Publish it to a server with `bank.update(name, adapter)`,
        save it with `lx.save_adapter`.

        **Arguments:**

        - `name`: a tenant's name.

        **Returns:**

        An [`lorax_arrays.Adapter`][].
        """
        tenant = self._tenant(name, "AdapterTrainer.adapter")
        return self._read(self._params, np.int32(tenant.slot), tenant)

    def optimizer_state(self, name: str) -> PyTree:
        """The tenant's optimizer state (a pytree of arrays, laid out for the
        trainer's slots: its factors' moments at the capacity rank). Save it next
        to `lx.save_adapter(path, trainer.adapter(name))` (orbax saves any
        pytree), and resume with `trainer.add(name, adapter,
        optimizer_state=state)`.

        **Arguments:**

        - `name`: a tenant's name.

        **Returns:**

        The optimizer's state for that one slot (copies).
        """
        tenant = self._tenant(name, "AdapterTrainer.optimizer_state")
        return _take(self._opt_state, np.int32(tenant.slot))

    def max_grad_norm(self, name: str) -> float | None:
        """The tenant's clipping norm (`None`: not clipped)."""
        return self._tenant(name, "AdapterTrainer.max_grad_norm").max_grad_norm

    # -- training -------------------------------------------------------------------

    def step(
        self,
        loss_fn: Callable[[Any, PyTree], Any],
        batch: PyTree,
        names: Sequence[Any],
        *,
        micro_batches: int = 1,
    ) -> dict[str, float]:
        """One training step of every tenant named in `names`, in one jitted
        forward and backward pass, then each slot's own update.

        ```python
        def loss_fn(tree, batch):           # tree: the model with the adapters
            logits = model.apply(tree, batch["x"])
            return ((logits - batch["y"]) ** 2).mean(axis=-1)   # one per row

        losses = trainer.step(loss_fn, batch, ["a", "b", None, "a"])
        ```

        Compiled once per `loss_fn`, `micro_batches` and batch shape: the tenants
        in a batch, and `add`/`remove` between steps, never recompile.

        **Arguments:**

        - `loss_fn`: `loss_fn(tree, batch)` returning one loss per entry of
            `names` (`(batch,)` for one name per row, `(batch, seq)` for one per
            token). It is called under `lx.quaxify` (do not call `lx.quaxify`
            in it) with the trainer's tree carrying each row's adapter. A
            tenant's loss is the mean of its entries' losses.
        - `batch`: a pytree of arrays whose leading axis is the rows.
        - `names`: each row's tenant (a list), or each token's (a nested list
            `(batch, seq)`); `None` or `"__base__"` for rows that train nothing
            (base-model rows, padding).
        - `micro_batches`: split the rows into this many equal micro-batches
            (`batch` must divide) and accumulate their gradients in one `scan`
            (memory of one micro-batch): the same update as one big batch.

        **Returns:**

        Each tenant's loss (its mean over its rows), for the tenants in `names`.
        Tenants whose gradient was not finite were not updated; they are in
        `trainer.last_skipped`.
        """
        fn, args, counts = self._prepare(
            loss_fn, batch, names, micro_batches, "AdapterTrainer.step"
        )
        self._params, self._opt_state, means, finite = fn(*args)
        means, finite = np.asarray(means), np.asarray(finite)
        present = {n: t.slot for n, t in self._tenants.items() if counts[t.slot]}
        self.last_skipped = tuple(n for n, s in present.items() if not finite[s])
        return {n: float(means[s]) for n, s in present.items()}

    def lower(
        self,
        loss_fn: Callable[[Any, Any], Any],
        batch: PyTree,
        names: Sequence[Any],
        *,
        micro_batches: int = 1,
    ) -> Any:
        """The step `step(loss_fn, batch, names)` would run, lowered and not run
        (`jax.stages.Lowered`): `.compile().as_text()` is its compiled program, to
        check what it does (on a mesh, say, that it gathers no weight or slot).

        **Arguments:** as [`step`][lorax_arrays.AdapterTrainer.step].

        **Returns:**

        The `jax.stages.Lowered` of the jitted step for these arguments.
        """
        fn, args, _ = self._prepare(
            loss_fn, batch, names, micro_batches, "AdapterTrainer.lower"
        )
        return fn.lower(*args)

    def _prepare(self, loss_fn, batch, names, micro_batches, what):
        """The jitted step for `loss_fn` and its arguments for this batch, and
        each slot's row count."""
        ids = self._slot_ids(names, what)
        if ids.size == 0 or ids.ndim == 0:
            raise ValueError(f"{what}: `names` must name at least one row.")
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int):
            raise TypeError(f"{what}: `micro_batches` must be an int.")
        if micro_batches < 1 or ids.shape[0] % micro_batches:
            raise ValueError(
                f"{what}: {ids.shape[0]} rows do not split into {micro_batches} "
                "equal micro-batches; use a divisor of the batch size."
            )
        counts = np.bincount(ids[ids >= 0], minlength=self._n)
        weights = np.where(
            ids >= 0, 1.0 / np.maximum(counts[np.maximum(ids, 0)], 1), 0.0
        ).astype(np.float32)
        fn = self._steps.get((loss_fn, micro_batches))
        if fn is None:
            fn = make_step(
                loss_fn=loss_fn,
                micro_batches=micro_batches,
                treedef=self._treedef,
                static=self._static,
                leaves=self._leaves,
                kinds=self._kinds,
                optimizer=self._optimizer,
                n_slots=self._n,
                strategy=self._strategy,
                shardings=self._placed.get("out_shardings"),
            )
            self._steps[(loss_fn, micro_batches)] = fn
        args = (
            self._arrays,
            batch,
            jnp.asarray(ids),
            jnp.asarray(weights),
            self._config,
            self._params,
            self._opt_state,
        )
        return fn, args, counts

    # -- internals ------------------------------------------------------------------

    def _tenant(self, name: str, what: str) -> Tenant:
        if name not in self._tenants:
            hint = close_matches(str(name), self._tenants)
            raise UnknownAdapterError(
                f"{what}: no tenant named {name!r}.{hint} The trainer has "
                f"{sorted(self._tenants)}; add it with `trainer.add(name, ...)`."
            )
        return self._tenants[name]

    def _slot_ids(self, names: Sequence[Any], what: str) -> np.ndarray:
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise TypeError(
                f"{what}: `names` must be a list (one tenant name per row, or a "
                f"nested list per token), got {type(names).__name__}."
            )
        grid = np.empty(np.shape(np.array(names, dtype=object)), dtype=object)
        try:
            grid[...] = names
        except ValueError as e:
            raise ValueError(
                f"{what}: `names` must be a flat list (one per row) or a "
                "rectangular nested list (one per token)."
            ) from e
        ids = np.full(grid.shape, -1, np.int32)
        for pos, n in np.ndenumerate(grid):
            if n is None or n == BASE:
                continue
            if not isinstance(n, str):
                raise TypeError(
                    f"{what}: entry {pos} of `names` is {n!r}; entries are tenant "
                    f"names (str), None or {BASE!r}."
                )
            ids[pos] = self._tenant(n, what).slot
        return ids

    def _check_adapter(self, adapter: Adapter, what: str) -> None:
        if isinstance(adapter, AdapterStack):
            raise TypeError(
                f"{what} takes one Adapter, got an AdapterStack; add each of its "
                "adapters: `for n in stack.names: trainer.add(n, stack[n])`."
            )
        if not isinstance(adapter, Adapter):
            raise TypeError(f"{what}: expected an Adapter, got {type(adapter)}.")
        if not adapter.paths:
            raise ValueError(f"{what}: the adapter adapts no leaf.")
        refused = {
            "bias_deltas": adapter.bias_deltas,  # (PEFT's modules_to_save)
            "invocation tokens (aLoRA)": adapter.invocation_tokens,
        }
        for field, value in refused.items():
            if value:
                raise ValueError(
                    f"{what}: the adapter has {field}, which AdapterTrainer does "
                    "not train yet (LoRA, DoRA, IA3 and VeRA leaves only)."
                )
        for j, lay in enumerate(adapter.layouts):
            leaf = self._leaves.get(lay.path)
            if leaf is None:
                near = close_matches(lay.path, self._leaves)
                raise ValueError(
                    f"{what}: the adapter adapts {lay.path!r}, which is not one of "
                    f"the trainer's leaves.{near} Build the trainer with a rule "
                    "that covers this leaf."
                )
            if not leaf.layout.compatible(lay):
                raise ValueError(
                    f"{what}: at {lay.path!r} the adapter is laid out as "
                    f"{lay}, the trainer as {leaf.layout}. Make the adapter with "
                    "the trainer's rules."
                )
            if adapter.ranks[j] > leaf.capacity:
                raise ValueError(
                    f"{what}: at {lay.path!r} the adapter has rank "
                    f"{adapter.ranks[j]}, above the trainer's capacity "
                    f"{leaf.capacity} there. Build the trainer with "
                    f"`LoraRule(..., rank={adapter.ranks[j]})` (or larger)."
                )
            needs = "dora" if lay.path in adapter.magnitudes else None
            if lay.path in adapter.vera:
                needs = "vera"
            if lay.path in adapter.in_scales or lay.path in adapter.out_scales:
                needs = "ia3"
            if needs is not None and needs not in self._kinds:
                kinds = tuple(k for k in KINDS if k in {*self._kinds, needs})
                raise ValueError(
                    f"{what}: this is a {needs.upper()} adapter (at {lay.path!r}), "
                    f"and the trainer's slots hold {self._kinds} only. Build it "
                    f"with `kinds={kinds}`."
                )
        adapter.check_finite(what)

    def _check_state(self, state: PyTree, what: str) -> PyTree:
        want = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), self._opt_state
        )
        got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        if jax.tree.structure(got) != jax.tree.structure(want) or any(
            g.shape != w.shape
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
        ):
            raise ValueError(
                f"{what}: `optimizer_state` is not a state of this trainer's "
                "optimizer for its slots (its structure or shapes differ). Resume "
                "with the rules, kinds and optimizer it was saved with."
            )
        return state

    def _set_config(self, tenant: Tenant, adapter: Adapter | None) -> None:
        c, s = self._host_config, tenant.slot
        for field in ("scales", "heads", "ranks", "dora", "has_in", "has_out", "vera"):
            getattr(c, field)[:, s] = 0
        c.clip[s] = np.inf
        if adapter is not None:
            for j, lay in enumerate(adapter.layouts):
                i = self._paths.index(lay.path)
                scale = np.float32(adapter.scale(lay.path))
                c.heads[i, s] = 0.0 if adapter.lookup_only[j] else scale
                c.scales[i, s] = 0.0 if adapter.head_only[j] else scale
                c.ranks[i, s] = adapter.ranks[j]
                c.dora[i, s] = lay.path in adapter.magnitudes
                c.has_in[i, s] = lay.path in adapter.in_scales
                c.has_out[i, s] = lay.path in adapter.out_scales
                c.vera[i, s] = lay.path in adapter.vera
            if tenant.max_grad_norm is not None:
                c.clip[s] = tenant.max_grad_norm
        self._config = self._device_config()

    def _device_config(self) -> SlotConfig:
        return SlotConfig(*(jnp.asarray(x) for x in self._host_config))

    def learning_rate(self, name: str) -> float | None:
        """The tenant's learning rate, when the optimizer injects one
        (`optax.inject_hyperparams`); else `None`."""
        state = self.optimizer_state(name)
        lr = get_hyperparameter(state, "learning_rate")
        return None if lr is None else float(lr)


def _positive(value: Any, field: str, what: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what}: `{field}` must be a number, got {value!r}.") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what}: `{field}` must be positive and finite, got {v}.")
    return v
