"""Putting adapters into a tree (`loraify`), choosing adapters per request
(`with_indices`), folding one in (`merge`) and selecting trainable leaves
(`adapter_mask`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike, Int

from ._adapters import Adapter, AdapterStack, stack_adapters
from ._array import BatchedLoraArray, dense
from ._bank import AdapterBank
from ._errors import StaleIndicesError
from ._indices import (
    coerce_indices,
    decode_issued,
    decode_issued_on_host,
    first_stale,
)
from ._paths import close_matches, flatten_with_paths


def _is_lora(x: Any) -> bool:
    return isinstance(x, BatchedLoraArray)


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


def _serving_arrays(
    adapters: Any, indices: Any, compact: bool
) -> tuple[dict[str, tuple[Any, tuple]], Any]:
    """Per adapted path its `LeafLayout` and `(a, b, scale, head_scale,
    generations)` (generations: a bank's, else None), the indices that go with
    them, and the stack (None for a bank)."""
    if isinstance(adapters, AdapterBank):
        return (*adapters.arrays(indices, compact), None)
    if compact:
        raise ValueError(
            "loraify(..., compact=True) serves from an AdapterBank; a stack holds "
            "exactly the adapters it was given already."
        )
    stack = _as_stack(adapters)
    out = {}
    for lay, flags in zip(stack.layouts, stack.lookup_only):
        head = stack.head_scales(lay.path) if any(flags) else None
        weights = (*stack.weights[lay.path], stack.scales[lay.path], head, None)
        out[lay.path] = (lay, weights)
    return out, indices, stack


def _variant_scales(stack: AdapterStack | None, path: str, leaf: Any, a, b, scale):
    """`(in_scale, out_scale)` of the leaf at `path`, shaped as rank-1 factors
    (`None` where no adapter has one): IA3's vectors, and for DoRA adapters their
    magnitude over the column norms of `w + s·A B` (no gradient through the
    norms, as in PEFT), computed without building `w + s·A B`."""
    if stack is None:
        return None, None
    j = stack.paths.index(path)
    if not any(any(v) for v in stack.variants[j]):
        return None, None
    lay = stack.layouts[j].layout
    ns = lay.n_stack
    h = stack.in_scales.get(path)
    g = stack.out_scales.get(path)
    dora = [v[0] for v in stack.variants[j]]
    if any(dora):
        m = stack.magnitudes[path]
        norm = jax.lax.stop_gradient(dora_norms(leaf, a, b, scale, lay))
        mask = jnp.asarray(dora).reshape((len(dora),) + (1,) * (m.ndim - ns - 1))
        ratio = jnp.where(mask, m / norm.astype(m.dtype), 1)
        g = ratio if g is None else g * ratio
    if h is not None:
        h = h[..., None]  # (*stack, n, *in, 1): a rank-1 `a`
    if g is not None:
        g = jnp.expand_dims(g, ns + 1)  # (*stack, n, 1, *out): a rank-1 `b`
    return h, g


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


def _replace_at_paths(tree: Any, fn, paths: Sequence[str], what: str) -> Any:
    leaves, treedef = flatten_with_paths(tree, is_leaf=_is_lora)
    position = {p: i for i, (p, _) in enumerate(leaves)}
    new = [leaf for _, leaf in leaves]
    for path in paths:
        if path not in position:
            raise KeyError(
                f"{what}: the adapter has a weight at {path!r}, but the tree has no "
                f"leaf there.{close_matches(path, position)} Adapters must be used "
                "with the model (and the same pytree structure) they were made for."
            )
        new[position[path]] = fn(path, new[position[path]])
    return jtu.tree_unflatten(treedef, new)


def loraify(
    tree: Any,
    adapters: AdapterStack | AdapterBank | Adapter | Sequence[Adapter],
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
    - `adapters`: an [`lorax_arrays.AdapterStack`][], an
        [`lorax_arrays.AdapterBank`][] (serving from its slots, with indices from
        `bank.indices(names)`), or an `Adapter` or a list of them (stacked for
        you).
    - `indices`: which adapter each example (`(batch,)`) or token
        (`(batch, seq)`) uses, `-1` for the base model; scalar inside `jax.vmap`.
        May be left `None` and set later with [`lorax_arrays.with_indices`][].
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
    served, indices, stack = _serving_arrays(adapters, indices, compact)
    indices = coerce_indices(indices)

    def put(path, leaf):
        if _is_lora(leaf):
            raise ValueError(
                f"loraify: {path!r} is already a BatchedLoraArray. Loraify the base "
                "tree, or change the requests with `lx.with_indices`."
            )
        lay, (a, b, scale, head_scale, generations) = served[path]
        if tuple(leaf.shape) != lay.shape:
            raise ValueError(
                f"loraify: the adapter was made for a weight of shape {lay.shape} at "
                f"{path!r}, but the tree's leaf there has shape {tuple(leaf.shape)}."
            )
        in_scale, out_scale = _variant_scales(stack, path, leaf, a, b, scale)
        return BatchedLoraArray(
            leaf,
            a,
            b,
            scale=scale,
            in_scale=in_scale,
            out_scale=out_scale,
            indices=indices,
            in_axes=lay.in_axes,
            out_axes=lay.out_axes,
            stack_axes=lay.stack_axes,
            allow_materialise=allow_materialise,
            strategy=strategy,
            head_scale=head_scale,
            batch_axis=batch_axis,
            compact=compact,
            generations=generations,
        )

    return _replace_at_paths(tree, put, list(served), "loraify")


def _deleted(x: Any) -> bool:
    """Whether `x` is a concrete array whose buffer was donated or deleted."""
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and x.is_deleted()
    )


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
    found = False
    decoded: dict[int, Any] = {}  # a bank's slot numbers, by its generations

    def swap(x):
        nonlocal found
        if _is_lora(x):
            found = True
            if x.compact:
                raise ValueError(
                    "with_indices: this tree was loraified with `compact=True`: it "
                    "holds only the adapters of the batch it was made for, numbered "
                    "by their place in it, so new indices would pick other "
                    "adapters. Loraify again for each batch: `lx.loraify(tree, "
                    "bank, bank.indices(names), compact=True)`."
                )
            if any(_deleted(f) for f in (x.a, x.b)):
                raise ValueError(
                    "with_indices: this tree's adapters were replaced since it was "
                    "loraified (an AdapterBank loaded or removed an adapter, which "
                    "updates its slots in place), so it can no longer be run. "
                    "Loraify again for each batch: `lx.loraify(tree, bank, "
                    "bank.indices(names))`."
                )
            mine = indices
            if x.generations is not None:  # a bank's tree: decode, once per bank
                key = id(x.generations)
                if key not in decoded:
                    decoded[key] = _decoded(indices, x.generations)
                mine = decoded[key]
            if batch_axis is None:
                return x.replace(indices=mine)
            return x.replace(indices=mine, batch_axis=batch_axis)
        return x

    out = jtu.tree_map(swap, tree, is_leaf=_is_lora)
    if not found and any(
        type(x).__name__ == "_QuaxTracer" for x in jtu.tree_leaves(tree)
    ):
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
    return out


def _decoded(indices: Any, generations: Any) -> Any:
    """A bank's issued `indices`, given to `with_indices`, as slot numbers:
    traced, on the device (a stale value gives NaN rows); concrete, on the host
    (one small copy of the generations), refusing a value that is not the
    current issue of its slot."""
    if isinstance(indices, jax.core.Tracer) or isinstance(generations, jax.core.Tracer):
        return decode_issued(indices, generations)
    decoded = decode_issued_on_host(indices, generations)
    value = first_stale(indices, decoded, generations.shape[0])
    if value is not None:
        raise StaleIndicesError(
            f"with_indices: index {value} is not a current issue of the bank this "
            "tree serves from: its slot has since been given to another adapter, "
            "cleared or updated, or the index came from another bank or was made "
            "by hand (a bank's indices encode the slot and its generation). Use "
            "indices from this bank's latest `bank.indices(names)`."
        )
    return jnp.asarray(decoded)


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
    base = jtu.tree_map(lambda x: x.w if _is_lora(x) else x, tree, is_leaf=_is_lora)
    layouts = {lay.path: lay for lay in adapter.layouts}

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
        if path in adapter.magnitudes:  # DoRA: m / ‖w + s·A B‖ per out-feature
            norm = jnp.sqrt(jnp.sum(merged * merged, axis=lay.in_axes, keepdims=True))
            merged = merged * layout.on_weight(adapter.magnitudes[path], "out") / norm
        if path in adapter.in_scales:
            merged = merged * layout.on_weight(adapter.in_scales[path], "in")
        if path in adapter.out_scales:
            merged = merged * layout.on_weight(adapter.out_scales[path], "out")
        return merged.astype(leaf.dtype)

    return _replace_at_paths(base, fold, adapter.paths, "merge")


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
