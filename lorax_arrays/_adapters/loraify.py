"""Putting adapters into a tree (`loraify`), choosing adapters per request
(`with_indices`), folding one in (`merge`) and selecting trainable leaves
(`adapter_mask`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike, Int

from .._core.array import BatchedLoraArray, base_weight, check_base_weight
from .._core.indices import coerce_indices
from .._core.paths import close_matches, flatten_with_path_names
from .._rules.row_bias import RowBias
from .._rules.strategies import check_strategy
from .adapter import Adapter
from .kinds import KIND_OF_VECTOR, VECTOR_FIELDS
from .served import Servable, ServedAdapters, deleted, dora_norms, served_indices
from .stack import AdapterStack, stack_adapters


def _is_lora(x: Any) -> bool:
    return isinstance(x, (BatchedLoraArray, RowBias))


def _as_stack(adapters: Any) -> AdapterStack:
    if isinstance(adapters, AdapterStack):
        return adapters
    if isinstance(adapters, Adapter):
        return stack_adapters([adapters])
    if isinstance(adapters, Sequence):
        return stack_adapters(adapters)
    raise TypeError(
        "Expected an AdapterStack, an Adapter or a list of Adapters, got "
        f"{type(adapters).__name__}."
    )


def _served(adapters: Any, indices: Any, compact: bool) -> ServedAdapters:
    """What `loraify` serves: `adapters.served(indices)` for a stack or a bank
    (anything with that method), the stack of an `Adapter` or a list of them,
    or a `ServedAdapters` itself (given `indices` then replace its own)."""
    if isinstance(adapters, ServedAdapters):
        if compact:
            raise ValueError(
                "loraify(..., compact=True): these adapters were already served; "
                "ask for the compacted ones when serving them: "
                "`bank.served(idx, compact=True)`."
            )
        return adapters if indices is None else adapters.with_indices(indices)
    if isinstance(adapters, (Adapter, list, tuple)):
        adapters = _as_stack(adapters)
    served = getattr(adapters, "served", None)
    if served is None:
        raise TypeError(
            "loraify: expected an AdapterStack, an AdapterBank, ServedAdapters, an "
            f"Adapter or a list of Adapters, got {type(adapters).__name__}."
        )
    return served(indices, compact=compact)


def _has_variants(served: ServedAdapters) -> bool:
    return bool(served.in_scales or served.out_scales or served.dora)


def _variant_scales(served: ServedAdapters, lay, leaf: Any, a, b, scale):
    """`(in_scale, out_scale)` of the leaf at `path`, shaped as rank-1 factors
    (`None` where no adapter has one): IA3's vectors, and for DoRA adapters their
    magnitude over the column norms of `w + s·A B` (no gradient through the
    norms, as in PEFT), computed without building `w + s·A B`. `lay` is the
    leaf's `LeafLayout`."""
    path = lay.path
    h = served.in_scales.get(path)
    g = served.out_scales.get(path)
    dora = served.dora.get(path)
    if h is None and g is None and dora is None:
        return None, None
    layout = lay.layout
    ns = layout.n_stack
    if dora is not None:
        m = served.magnitudes[path]
        norm = jax.lax.stop_gradient(dora_norms(leaf, a, b, scale, layout))
        mask = jnp.reshape(dora, (dora.shape[0],) + (1,) * (m.ndim - ns - 1))
        ratio = jnp.where(mask, m / norm.astype(m.dtype), 1)
        g = ratio if g is None else g * ratio
    if h is not None:
        h = h[..., None]  # (*stack, n, *in, 1): a rank-1 `a`
    if g is not None:
        g = jnp.expand_dims(g, ns + 1)  # (*stack, n, 1, *out): a rank-1 `b`
    return h, g


def _leaf_positions(tree: Any) -> tuple[list[Any], Any, dict[str, int]]:
    """The leaves of `tree` (a `BatchedLoraArray` is one), its treedef and each
    path's position."""
    leaves, treedef, paths = flatten_with_path_names(tree, is_leaf=_is_lora)
    return leaves, treedef, {p: i for i, p in enumerate(paths)}


def _missing_leaf(path: str, position: dict[str, int], what: str) -> KeyError:
    return KeyError(
        f"{what}: the adapter has a weight at {path!r}, but the tree has no "
        f"leaf there.{close_matches(path, position)} Adapters must be used "
        "with the model (and the same pytree structure) they were made for."
    )


def _replace_at_paths(tree: Any, fn, paths: Sequence[str], what: str) -> Any:
    new, treedef, position = _leaf_positions(tree)
    for path in paths:
        if path not in position:
            raise _missing_leaf(path, position, what)
        new[position[path]] = fn(path, new[position[path]])
    return jtu.tree_unflatten(treedef, new)


def loraify(
    tree: Any,
    adapters: ServedAdapters | Servable | Adapter | Sequence[Adapter],
    indices: Int[ArrayLike, ...] | None = None,
    *,
    allow_materialise: bool = False,
    strategy: str = "auto",
    batch_axis: int = 0,
    compact: bool = False,
) -> Any:
    """Replaces each adapted weight of `tree` by a `BatchedLoraArray`.

    Call the model through [`lorax_arrays.quaxify`][] afterwards; nothing else in
    the model changes.

    **Arguments:**

    - `tree`: the model or parameter tree the adapters were made for.
    - `adapters`: [`lorax_arrays.ServedAdapters`][] (from `stack.served(idx)`
        or `bank.served(idx)`: what a jitted serving step takes as an argument,
        calling `loraify` inside), an [`lorax_arrays.AdapterStack`][], an
        [`lorax_arrays.AdapterBank`][] (serving from its slots, with indices from
        `bank.indices(names)`), or an `Adapter` or a list of them (stacked for
        you).
    - `indices`: which adapter each example (`(batch,)`) or token
        (`(batch, seq)`) uses, `-1` for the base model; scalar inside `jax.vmap`.
        May be left `None` and set later with [`lorax_arrays.with_indices`][].
        With `ServedAdapters`, `None` keeps the indices they were served with.
    - `allow_materialise`: let operations without a low-rank rule build the dense
        per-example weight instead of raising an error.
    - `strategy`: how the low-rank terms are computed (`"auto"`, `"gather"`,
        `"segment"` or `"dense"`); see [`lorax_arrays.BatchedLoraArray`][].
    - `batch_axis`: which of an activation's free axes the indices label: `0` (the
        default) the leading ones, as in `(B, T, D)`; `-1` the trailing ones, for
        a time-major model whose activations are `(T, B, D)`.
    - `compact`: with an `AdapterBank`, serve only the adapters this batch uses:
        their slots are copied into a stack of the next power of two in size
        (1, 2, 4, ... up to the bank's slots), so a batch of one adapter runs the
        plain LoRA product and few adapters cost what few adapters cost (a batch
        that needs more than half the slots is served from the bank itself).
        Each size is its own program (at most `log2(slots) + 1` compiles, all made
        at warm-up), and the tree serves exactly this batch: `lx.with_indices`
        refuses it. Off by default: one program for every batch.

    **Returns:**

    A copy of `tree` whose adapted leaves are `BatchedLoraArray`s.
    """
    new, treedef, position = _leaf_positions(tree)  # a tree's problems first
    served = _served(adapters, indices, compact)
    strategy = check_strategy(strategy)
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, int):
        raise TypeError(f"loraify: `batch_axis` must be an int, got {batch_axis!r}.")
    scales, heads = served.rows()
    factors, indices, generations = served.factors, served.indices, served.generations
    compact, variants = served.compact, _has_variants(served)
    allow_materialise = bool(allow_materialise)
    for j, lay in enumerate(served.layouts):
        path = lay.path
        if path not in position:
            raise _missing_leaf(path, position, "loraify")
        leaf = new[position[path]]
        if isinstance(leaf, BatchedLoraArray):
            raise ValueError(
                f"loraify: {path!r} is already a BatchedLoraArray. Loraify the base "
                "tree, or change the requests with `lx.with_indices`."
            )
        w = base_weight(leaf)
        check_base_weight(w, path, lay.shape, "loraify")
        a, b = factors[path]
        in_scale = out_scale = None
        if variants:
            in_scale, out_scale = _variant_scales(served, lay, w, a, b, scales[j])
        new[position[path]] = BatchedLoraArray.unchecked(
            w=w,
            a=a,
            b=b,
            scale=scales[j],
            indices=indices,
            head_scale=None if heads is None else heads[j],
            in_scale=in_scale,
            out_scale=out_scale,
            generations=generations,
            layout=lay.layout,
            allow_materialise=allow_materialise,
            strategy=strategy,
            batch_axis=batch_axis,
            compact=compact,
        )
    for path, deltas in served.bias_deltas.items():
        new[position_of(path, position, "loraify")] = _row_bias(
            new[position[path]], deltas, indices, batch_axis, path
        )
    return jtu.tree_unflatten(treedef, new)


def position_of(path: str, position: dict[str, int], what: str) -> int:
    if path not in position:
        raise _missing_leaf(path, position, what)
    return position[path]


def _row_bias(leaf: Any, deltas: Any, indices: Any, batch_axis: int, path: str):
    """The `RowBias` at the bias leaf `path`: the leaf, checked, with the
    adapters' updates to it."""
    if isinstance(leaf, RowBias):
        raise ValueError(
            f"loraify: {path!r} already holds adapters' biases (a RowBias). "
            "Loraify the base tree, or change the requests with `lx.with_indices`."
        )
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", None)
    if shape != (deltas.shape[-1],) or not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"loraify: the adapters update a bias of shape ({deltas.shape[-1]},) at "
            f"{path!r} (PEFT's modules_to_save), but the tree's leaf there has "
            f"shape {shape} and dtype {dtype}."
        )
    return RowBias(leaf, deltas, indices, batch_axis=batch_axis)


def _dict_of(x: Any) -> dict[str, Any]:
    return object.__getattribute__(x, "__dict__")


def with_indices(
    tree: Any, indices: Int[ArrayLike, ...], *, batch_axis: int | None = None
) -> Any:
    """The same tree with a new request-to-adapter mapping in every BatchedLoraArray.

    Only array values change, so a `jax.jit`-compiled forward pass is not retraced
    when the new indices have the same shape.

    **Arguments:**

    - `tree`: a tree from [`lorax_arrays.loraify`][].
    - `indices`: `(batch,)` per example, `(batch, seq)` per token, or a scalar (for
        a single example inside `jax.vmap`); `-1` means the base model.
    - `batch_axis`: a new `batch_axis` (see [`lorax_arrays.loraify`][]); `None`
        (the default) keeps each array's. Changing it retraces.

    **Returns:**

    A copy of `tree` whose BatchedLoraArrays use `indices`.
    """
    indices = coerce_indices(indices)
    if batch_axis is not None and (
        isinstance(batch_axis, bool) or not isinstance(batch_axis, int)
    ):
        raise TypeError(
            f"with_indices: `batch_axis` must be an int, got {batch_axis!r}."
        )
    leaves, treedef = jtu.tree_flatten(tree, is_leaf=_is_lora)
    # Checked (and a bank's decoded) once for all the leaves that share them.
    served: dict[tuple[int, int], Any] = {}
    found, biases = False, []
    for i, x in enumerate(leaves):
        if isinstance(x, RowBias):
            found = True
            biases.append(i)
            continue
        if not _is_lora(x):
            continue
        found = True
        # (equinox's attribute lookup costs microseconds per leaf: read the dict)
        fields = dict(_dict_of(x))
        if fields["compact"]:
            raise ValueError(
                "with_indices: this tree was loraified with `compact=True`: it "
                "holds only the adapters of the batch it was made for, numbered "
                "by their place in it, so new indices would pick other "
                "adapters. Loraify again for each batch: `lx.loraify(tree, "
                "bank, bank.indices(names), compact=True)`."
            )
        a, generations = fields["a"], fields["generations"]
        n = a.shape[fields["layout"].n_stack]
        key = (id(generations), n)
        if key not in served:
            # A bank donates all its buffers at each write: one leaf of its tree
            # says whether they are gone.
            if deleted(a) or deleted(fields["b"]):
                raise ValueError("with_indices: " + _REPLACED)
            served[key] = served_indices(indices, n, generations, "with_indices")
        fields["indices"] = served[key]
        if batch_axis is not None:
            fields["batch_axis"] = batch_axis
        new = object.__new__(BatchedLoraArray)
        _dict_of(new).update(fields)
        leaves[i] = new
    for i in biases:
        leaves[i] = _bias_with_indices(leaves[i], indices, served, batch_axis)
    if not found and any(type(x).__name__ == "_QuaxTracer" for x in leaves):
        raise ValueError(
            "with_indices was called inside `lx.quaxify`, where the weights are "
            "already being traced. Call it outside: for a per-example model under "
            "`jax.vmap`, write `jax.vmap(lambda m, x, i: lx.quaxify(call)("
            "lx.with_indices(m, i), x), in_axes=(None, 0, 0))`."
        )
    if not found:
        raise ValueError(
            "with_indices: the tree holds no BatchedLoraArray. Put adapters in "
            "first with `lx.loraify(tree, adapters)`."
        )
    return jtu.tree_unflatten(treedef, leaves)


def _bias_with_indices(x: RowBias, indices: Any, served: dict, batch_axis) -> RowBias:
    """`x` with `indices`: those its tree's LoRA leaves of as many adapters were
    given (a bank's issued indices, decoded into slots there), else checked
    here."""
    n = x.n_adapters
    decoded = [v for (g, m), v in served.items() if m == n]
    if decoded:
        value = decoded[0]
    else:
        value = served_indices(indices, n, None, "with_indices")
        served[(None, n)] = value
    changes = {"indices": value}
    if batch_axis is not None:
        changes["batch_axis"] = batch_axis
    return x.replace(**changes)


_REPLACED = (
    "this tree's adapters were replaced since it was loraified (an "
    "AdapterBank loaded, evicted, removed or updated an adapter, which rewrites "
    "its slots in place), so it can no longer be run. Serve each batch anew: "
    "`lx.loraify(tree, bank.served(bank.indices(names)))`, inside the jitted "
    "step (see the Serving page)."
)


def merge(tree: Any, adapter: Adapter) -> Any:
    """Folds one adapter into plain weights: `w + scale * a ⊗ b` at each path
    (and, for the variants, `diag(h) (w + s·a ⊗ b) diag(g)`: see
    [`lorax_arrays.Adapter`][]).

    The result needs no `quaxify`: it is the model that adapter alone describes.
    Useful to check a batched forward pass against, or to export.

    **Arguments:**

    - `tree`: the base tree (a tree from `loraify` counts as its base weights).
    - `adapter`: one [`lorax_arrays.Adapter`][]; pick one out of a stack with
        `stack[i]`.

    **Returns:**

    A copy of `tree` with the adapter's weights merged, and every other
    BatchedLoraArray replaced by its base weight.
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"merge: expected an Adapter, got {type(adapter).__name__}; pick one out "
            "of an AdapterStack with `stack[i]`."
        )
    heads = [lay.path for lay, h in zip(adapter.layouts, adapter.head_only) if h]
    if heads:
        raise ValueError(
            f"merge: the adapter's update at {heads} is head-only (a LoRA on an "
            "output head tied to the embedding table, as PEFT's lm_head): folded "
            "into the shared table it would change the lookups too. Serve it with "
            "`lx.loraify` (the head reads the update, lookups the base table), or "
            "untie the head: give the model its own head weight and load the "
            "adapter onto that."
        )
    base = jtu.tree_map(_base_of, tree, is_leaf=_is_lora)
    layouts = {lay.path: lay for lay in adapter.layouts}
    if adapter.bias_deltas:
        base = _replace_at_paths(
            base,
            lambda path, leaf: _fold_bias(leaf, adapter.bias_deltas[path], path),
            list(adapter.bias_deltas),
            "merge",
        )

    def fold(path, leaf):
        lay = layouts[path]
        if tuple(leaf.shape) != lay.shape:
            raise ValueError(
                f"merge: the adapter was made for shape {lay.shape} at {path!r}, but "
                f"the tree's leaf there has shape {tuple(leaf.shape)}."
            )
        a, b = adapter.lora_factors(path)
        layout = lay.layout
        merged = leaf + adapter.scale(path) * layout.dense_delta(a, b)
        for field in VECTOR_FIELDS:  # DoRA's m / ‖w + s·A B‖ first, then IA3's
            vectors = getattr(adapter, field)
            if path in vectors:
                merged = KIND_OF_VECTOR[field].fold(merged, vectors[path], lay)
        return merged.astype(leaf.dtype)

    return _replace_at_paths(base, fold, adapter.paths, "merge")


def _base_of(x: Any) -> Any:
    if isinstance(x, RowBias):
        return x.b
    return x.w if _is_lora(x) else x


def _fold_bias(leaf: Any, delta: Any, path: str) -> Any:
    if tuple(leaf.shape) != tuple(delta.shape):
        raise ValueError(
            f"merge: the adapter updates a bias of shape {tuple(delta.shape)} at "
            f"{path!r}, but the tree's leaf there has shape {tuple(leaf.shape)}."
        )
    return (leaf + delta).astype(leaf.dtype)


def adapter_mask(tree: Any) -> Any:
    """A bool pytree, True exactly on the adapter factors `a` and `b`.

    Use it wherever a filter is taken: `eqx.partition(tree, lx.adapter_mask(tree))`
    to differentiate with respect to the adapters only, `optax.masked(opt, mask)`,
    or `eqx.filter(tree, mask)` to save only the adapters.

    **Arguments:**

    - `tree`: a tree from [`lorax_arrays.loraify`][] (or an `Adapter` /
        `AdapterStack`, where every array leaf is a factor).

    **Returns:**

    A pytree of bools with the structure of `tree`.
    """

    def mark(x):
        if isinstance(x, RowBias):
            return jax.tree.map(lambda _: False, x)
        if _is_lora(x):
            falses = jax.tree.map(lambda _: False, x)
            return eqx.tree_at(lambda n: (n.a, n.b), falses, (True, True))
        if isinstance(x, Adapter):
            # Everything but VeRA's frozen projections (its `weights` there).
            trues = jax.tree.map(lambda _: True, x)
            frozen = {p: (False, False) for p in x.vera}
            if not frozen:
                return trues
            weights = {**trues.weights, **frozen}
            return eqx.tree_at(lambda ad: ad.weights, trues, weights)
        if isinstance(x, AdapterStack):
            falses = jax.tree.map(lambda _: False, x)
            trues = {p: (True, True) for p in x.weights}
            return eqx.tree_at(lambda s: s.weights, falses, trues)
        return False

    is_leaf = lambda x: isinstance(x, (BatchedLoraArray, Adapter, AdapterStack))  # noqa: E731
    return jtu.tree_map(mark, tree, is_leaf=is_leaf)
