"""Flax NNX modules under `lx.quaxify`.

quax wraps a function's arguments in its tracers *outside* its trace (under JAX's
eval trace), by flattening and rebuilding them as pytrees. An `nnx.Module` rebuilt
there records that trace as its own, so NNX refuses every mutation made inside the
quaxified function (`TraceContextError: Cannot mutate ... from a different trace
level`): `self.sow(...)`, `nnx.remat`/`nnx.scan`/`nnx.vmap` (which split and merge the
module, updating it in place), RNG counters, caches.

So, as `nnx.jit` does, `lx.quaxify` splits every NNX object among the arguments
with `nnx.split` before quax sees them and merges them back with `nnx.merge` *inside*
quax's trace, where they may be mutated. After the call, the state that the function
changed or added (sown intermediates, counters, caches) is written back into the
caller's objects with `nnx.update`, so the call behaves like calling the function
directly. Sharing between the objects (the same submodule reached twice, across
arguments too) survives, since they are split together in graph mode.

Nothing here imports Flax: it is used only when `flax.nnx` has already been imported
(an NNX object cannot exist otherwise).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu
import quax

from .quax_compat import _DenseArrayValue, _QuaxTracer


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")


def _leaf_ids(variable: Any) -> list[int]:
    """Identities of a Variable's value leaves, seen through quax's tracers: a
    transform that hands a value back unchanged (`nnx.scan`, `nnx.remat` return
    their module's state) rewraps the same quax value in a new tracer."""
    ids = []
    for x in jtu.tree_leaves(variable.get_raw_value()):
        if isinstance(x, _QuaxTracer):
            x = x.value.array if isinstance(x.value, _DenseArrayValue) else x.value
        ids.append(id(x))
    return ids


def _snapshot(nnx: Any, state: Any) -> dict[Any, tuple[type, list[int]]]:
    """Each Variable's type and the ids of its value's leaves, by path. Variables
    are updated in place (`sow`, `v[...] = x`), so this is what a later state is
    compared against, not the State itself."""
    return {path: (type(v), _leaf_ids(v)) for path, v in nnx.to_flat_state(state)}


def _changed(nnx: Any, before: dict[Any, tuple[type, list[int]]], after: Any) -> Any:
    """The entries of `after` (a State) that are new or hold other values than in
    `before` (a `_snapshot`): what the call mutated. None if nothing."""
    new = [
        (path, v)
        for path, v in nnx.to_flat_state(after)
        if before.get(path) != (type(v), _leaf_ids(v))
    ]
    return nnx.from_flat_state(new) if new else None


def _write_back(nnx: Any, nodes: list[Any], changed: Any) -> None:
    from flax import errors

    try:
        nnx.update(nodes, changed)
    except errors.TraceContextError as e:
        paths = ", ".join(
            "/".join(map(str, path[1:])) for path, _ in nnx.to_flat_state(changed)
        )
        raise errors.TraceContextError(
            f"The quaxified call updated NNX state ({paths}: sown values, "
            "counters, or state that `nnx.scan` hands back) of a module that "
            "belongs to another JAX trace, so it cannot be written back: the module "
            "is closed over by a transform (`jax.jit(lx.quaxify(model))`, say) "
            "instead of passed to it, which NNX forbids as well. Pass it as an "
            "argument: `nnx.jit(lx.quaxify(lambda m, x: m(x)))(model, x)` carries "
            "the update out, `jax.jit(lx.quaxify(lambda m, x: m(x)))(model, x)` "
            "drops it."
        ) from e


class NnxAware(eqx.Module):
    """`quax.quaxify(fn, filter_spec)`, with NNX objects among `(fn, args, kwargs)`
    merged inside the quax trace and their mutations written back (see the module
    docstring). A pytree holding `fn`, as quax's own wrapper is, so
    `eqx.filter_jit(lx.quaxify(model))` still traces the model's arrays. Calls
    with no NNX object go straight to quax."""

    fn: Callable
    filter_spec: Any

    @property
    def __wrapped__(self) -> Callable:
        return self.fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn, filter_spec = self.fn, self.filter_spec
        nnx = _nnx()
        if nnx is None:
            return quax.quaxify(fn, filter_spec)(*args, **kwargs)
        # `nnx.Pytree` (Module, Rngs, Optimizer, ...) is `nnx.Object` before 0.12.
        node_types = (getattr(nnx, "Pytree", None) or nnx.Object, nnx.Variable)
        is_node = lambda x: isinstance(x, node_types)  # noqa: E731
        # A bound method of a module (`model.generate`) holds the module in
        # `__self__`, where no pytree traversal finds it: call `__func__` on it.
        method = isinstance(fn, types.MethodType) and is_node(fn.__self__)
        head = fn.__self__ if method else fn
        # A quax value among the arguments (an activation with its rows'
        # positions) stays whole, for quax to wrap.
        leaves, treedef = jtu.tree_flatten(
            (head, args, kwargs),
            is_leaf=lambda x: is_node(x) or isinstance(x, quax.Value),
        )
        where = [i for i, leaf in enumerate(leaves) if is_node(leaf)]
        if not where:
            return quax.quaxify(fn, filter_spec)(*args, **kwargs)
        nodes = [leaves[i] for i in where]
        others = [None if is_node(leaf) else leaf for leaf in leaves]
        # NNX's update context (as its own transforms use) lets a call that
        # changes the modules' structure (a cache created in the call where the
        # module held None) be written back; otherwise only the changed state is.
        tag = object()
        restructured: dict[str, Any] = {}

        def inner(state: Any, others: list[Any]) -> Any:
            # quax rebuilt the Variables in `state` outside its trace; rebuild them
            # here (a pytree round trip), so that they belong to this one.
            state = jtu.tree_map(lambda x: x, state)
            with nnx.merge_context(tag, inner=True) as ctx:
                merged = ctx.merge(graphdef, state)
            before = _snapshot(nnx, state)
            full = list(others)
            for i, node in zip(where, merged):
                full[i] = node
            head_in, args_in, kwargs_in = jtu.tree_unflatten(treedef, full)
            call = functools.partial(fn.__func__, head_in) if method else head_in
            out = call(*args_in, **kwargs_in)
            graphdef_after, state_after = nnx.split(merged)
            whole = None
            if graphdef_after != graphdef:  # new attributes (sown values, caches)
                with nnx.split_context(tag) as ctx:
                    graphdef_out, whole = ctx.split(merged)
                restructured["graphdef"] = graphdef_out
            return out, _changed(nnx, before, state_after), whole

        with nnx.update_context(tag):
            with nnx.split_context(tag) as ctx:
                graphdef, state = ctx.split(nodes)
            out, changed, whole = quax.quaxify(inner, filter_spec)(state, others)
            if changed is not None:
                try:
                    _write_back(nnx, nodes, changed)
                except ValueError as e:
                    # `nnx.update` writes values and new Variables, not new
                    # sub-modules (a cache made in the call where the module held
                    # None): NNX's update context rebuilds the structure.
                    if "Expected a subgraph" not in str(e) or whole is None:
                        raise
                    with nnx.merge_context(tag, inner=False) as ctx:
                        ctx.merge(restructured["graphdef"], whole)
        if any(map(is_node, jtu.tree_leaves(out, is_leaf=is_node))):
            # NNX objects returned (`nnx.state(m, nnx.Intermediate)`, say) were
            # rebuilt by quax outside every trace: rebuild them in the caller's.
            out = jtu.tree_map(lambda x: x, out)
        return out

    def __get__(self, instance: object | None, owner: Any) -> Any:
        if instance is None:
            return self
        return eqx.Partial(self, instance)
