"""`quaxify` and `register`: quax's transform and rule registry, documented for
BatchedLoraArrays."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import numpy as np
import quax

from .._core.array import BatchedLoraArray
from .._core.errors import RowsNeededError
from .._core.rows import RowIds, source_positions, tag, untag
from .nnx import NnxAware
from .strategies import call_strategy, check_strategy

_F = TypeVar("_F", bound=Callable)


def quaxify(
    fn: _F,
    /,
    filter_spec: Any = True,
    *,
    strategy: str | None = None,
    rows: bool | None = None,
) -> _F:
    """Makes `fn` understand `BatchedLoraArray`s (and every other quax type).

    Call the wrapped function with a tree from [`lorax_arrays.loraify`][] in place of
    the plain weights: each `x @ W` against an adapted weight becomes
    `x @ w + s · (x @ A[i]) @ B[i]`, per example. Pair it with `jax.jit` (or
    `eqx.filter_jit`): `jax.jit(lx.quaxify(model.apply))`.

    This is `quax.quaxify` (importing `lorax_arrays` registers its rules), made
    aware of Flax NNX: `nnx.Module`s (and other NNX objects) among the arguments
    are rebuilt inside the trace, so `sow`, `nnx.remat`, `nnx.scan` and other
    in-place updates work, and the state the call changed or added (sown
    intermediates, RNG counts, caches) is written back to them, as when calling
    `fn` directly. Pass an NNX model as an argument (`lx.quaxify(lambda m, x:
    m(x))(model, x)`, or `lx.quaxify(model)(x)`), not closed over.

    **Arguments:**

    - `fn`: any JAX function, e.g. a Flax `apply`, an Equinox module or a function of
        raw parameters.
    - `filter_spec`: which arguments to quaxify (advanced; see `quax.quaxify`). A
        pytree-shaped `filter_spec` is passed to quax as it is, without the NNX
        handling above.
    - `strategy`: force how every adapted product in this call computes its
        low-rank term (`"gather"`, `"segment"`, `"dense"` or `"auto"`), overriding
        each array's own `strategy`. `None` (the default) leaves each array's.
    - `rows`: whether the arguments carry their rows' positions among the adapter
        indices through the call, for adapted expert weights in a grouped matmul
        (`lax.ragged_dot`), whose rows are tokens sorted by expert (see the docs
        page "Mixture of experts"). `None` (the default): when a grouped matmul
        with per-row adapters needs them (the call is then traced a second time,
        tagged; a model without one is traced once, untagged). `True`: tagged
        from the start, whenever an adapted weight has per-row indices. `False`:
        never. The arguments tagged are the arrays passed directly (not inside a
        pytree) whose leading axes are the indices' shape, or a row-major
        regrouping of it (`(B*T, D)` for `(B, T)` indices).

    **Returns:**

    A function with the same signature as `fn`.
    """
    if isinstance(filter_spec, bool) or callable(filter_spec):
        # Not `eqx.module_update_wrapper`, which would copy an NNX `fn` (a pytree),
        # so that state written back would miss the caller's module.
        quaxified = NnxAware(fn, filter_spec)
    else:
        quaxified = quax.quaxify(fn, filter_spec)
    if rows is not False:
        quaxified = _WithRows(quaxified, bool(rows))
    if strategy is None:
        return quaxified
    check_strategy(strategy)

    @functools.wraps(fn)
    def with_strategy(*args, **kwargs):
        with call_strategy(strategy):
            return quaxified(*args, **kwargs)

    return with_strategy


def _is_lora(x: Any) -> bool:
    return isinstance(x, BatchedLoraArray)


def row_space(tree: Any) -> tuple[int, ...] | None:
    """The shape of the per-row indices of the adapted weights in `tree`, or None
    when there are none, or when they disagree (then nothing is tagged, and a
    grouped matmul that needs the positions says so)."""
    shapes = {
        tuple(leaf.indices.shape)
        for leaf in jax.tree.leaves(tree, is_leaf=_is_lora)
        if _is_lora(leaf) and leaf.indices is not None and np.ndim(leaf.indices) > 0
    }
    return shapes.pop() if len(shapes) == 1 else None


def _tag_argument(x: Any, space: tuple[int, ...]) -> Any:
    if not isinstance(x, (jax.Array, np.ndarray)) or isinstance(x, quax.Value):
        return x
    pos = source_positions(np.shape(x), space)
    return x if pos is None else tag(x, pos, space)


class _WithRows(eqx.Module):
    """`quaxified`, with its top-level array arguments tagged with their rows'
    positions (`RowIds`) when a grouped matmul with per-row adapters needs them
    (`force`: always, when any adapted weight has per-row indices), and the
    results untagged. Without `force` the call is traced plain first, and again
    with the arguments tagged only if a grouped matmul asked
    (`RowsNeededError`): models without one never see a tag. A pytree holding
    the quaxified function, as quax's own wrapper is, so
    `eqx.filter_jit(lx.quaxify(model))` traces the model's arrays."""

    quaxified: Callable
    force: bool = eqx.field(static=True)
    # Positional arguments whose every array leaf is tagged (a batch pytree:
    # the trainer's `loss_fn(tree, batch)`); the others only when an array.
    whole: tuple[int, ...] = eqx.field(static=True, default=())

    @property
    def __wrapped__(self) -> Callable:
        return self.quaxified

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.force:
            space = row_space((self.quaxified, args, kwargs))
            if space is None:
                return self.quaxified(*args, **kwargs)
        else:
            # The tree is walked for the indices only when a grouped matmul
            # asked, not on every call.
            try:
                return self.quaxified(*args, **kwargs)
            except RowsNeededError:
                space = row_space((self.quaxified, args, kwargs))
                if space is None:
                    raise
        args = tuple(
            jax.tree.map(lambda x: _tag_argument(x, space), a)
            if k in self.whole
            else _tag_argument(a, space)
            for k, a in enumerate(args)
        )
        kwargs = {k: _tag_argument(v, space) for k, v in kwargs.items()}
        out = self.quaxified(*args, **kwargs)
        return jax.tree.map(untag, out, is_leaf=lambda x: isinstance(x, RowIds))


def quaxify_batch(fn: Callable, batch_arg: int) -> Callable:
    """`lx.quaxify(fn)` for a function whose argument `batch_arg` is a batch
    pytree (every array leaf batch-major): its leaves get their rows' positions
    when a grouped matmul needs them (the trainer's `loss_fn(tree, batch)`)."""
    return _WithRows(NnxAware(fn, True), False, (batch_arg,))


def register(primitive: Any, /, *, precedence: int = 0) -> Callable[[_F], _F]:
    """Registers a dispatch rule for a JAX primitive and some argument types.

    Use it to teach `lorax_arrays` an operation it lacks (the
    `UnsupportedOperationError` names the primitive), or to give your own
    `quax.ArrayValue` (a quantised base weight, say) rules that compose with ours.
    This is `quax.register`; see the docs page "Custom rules".

    **Arguments:**

    - `primitive`: e.g. `jax.lax.mul_p`.
    - `precedence`: breaks ties between equally specific rules.

    **Returns:**

    A decorator for a function whose positional arguments are annotated with the
    types it handles and whose keyword arguments are the primitive's parameters.
    """
    return quax.register(primitive, precedence=precedence)
