"""Everything that reaches into quax's or JAX's private modules, in one place.

Also the one patch we apply to quax: `custom_vjp` support on its trace (below).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from typing import Any

import jax._src.core as core
from jax._src.ad_checkpoint import remat_p
from quax._compat import unpack_scan_args
from quax._dispatch import _default_process as quax_default_process
from quax._primitives import scan_quax, while_quax
from quax._trace import _QuaxTrace, _QuaxTracer
from quax._values import _dense, _DenseArrayValue

from .._core.array import BatchedLoraArray
from .._core.errors import UnsupportedOperationError
from .._core.rows import RowIds, live

__all__ = [
    "PATCHED_CUSTOM_VJP",
    "PATCHED_SHARD_MAP",
    "QUAX_HANDLES_CUSTOM_VJP",
    "QUAX_VERSION",
    "remat_p",
    "unpack_scan_args",
    "quax_default_process",
    "scan_quax",
    "while_quax",
]


def _version_tuple(version: str) -> tuple[int, ...]:
    """`"0.4.6"` -> `(0, 4, 6)`; a pre-release or local suffix is ignored."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def _quax_version() -> tuple[int, ...]:
    try:
        return _version_tuple(importlib.metadata.version("quax"))
    except importlib.metadata.PackageNotFoundError:  # a source checkout
        import quax

        return _version_tuple(getattr(quax, "__version__", ""))


QUAX_VERSION = _quax_version()

# quax 0.4.6 raises NotImplementedError for every `custom_vjp` under `quaxify`, even
# one that only sees plain activations (a gradient clip, a fused attention kernel).
# Until quax handles it, we do: a custom_vjp call whose inputs are all plain arrays
# is bound on the parent trace, custom rule intact. The patch relies on quax's
# trace internals (`to_value`, `parent_trace`, `_QuaxTracer`, `_dense`), so it is
# applied only to the quax versions it is known to work with, and only when quax
# lacks the method. Outside that range quax behaves natively (custom_vjp under
# quaxify raises), and tests/test_compat.py fails, saying to check the patch.
CUSTOM_VJP_PATCH_VERSIONS = ((0, 4, 6), (0, 5))  # [from, to): quax 0.4.x
QUAX_HANDLES_CUSTOM_VJP = "process_custom_vjp_call" in _QuaxTrace.__dict__


def should_patch(version: tuple[int, ...], quax_handles_it: bool) -> bool:
    """Whether to add `process_custom_vjp_call` to quax's trace."""
    lo, hi = CUSTOM_VJP_PATCH_VERSIONS
    return not quax_handles_it and lo <= version < hi


# What quax does without the patch (JAX's `Trace` default: it raises), for the
# values the patch leaves alone.
_native_process_custom_vjp_call = _QuaxTrace.process_custom_vjp_call


def _process_custom_vjp_call(
    self, primitive, fun, fwd, bwd, tracers, /, *, out_trees, symbolic_zeros
):
    values = [self.to_value(t) for t in tracers]
    if any(live(v) for v in values):
        if not _differentiating(self):
            # Activations carrying their rows' positions (`RowIds`): EasyDeL's
            # and MaxText's token sort is a custom_vjp. With no derivative being
            # taken, its custom rule has nothing to do: run its function here,
            # as JAX's eager trace does, so the positions follow the sort.
            with core.set_current_trace(self):
                return fun.call_wrapped(*tracers)
        # Under differentiation the custom rule must stay: the positions are
        # dropped at its boundary (a grouped matmul past it then refuses).
        values = [_dense(v.array) if isinstance(v, RowIds) else v for v in values]
    if any(isinstance(v, BatchedLoraArray) for v in values):
        raise UnsupportedOperationError(
            f"A `jax.custom_vjp` function ({getattr(fun, '__name__', fun)}) was "
            "called with a BatchedLoraArray argument under quaxify. Its custom "
            "gradient is defined for plain arrays, so it cannot see adapted "
            "weights: pass it activations only (compute `x @ W` outside the "
            "custom_vjp function), or give it the base weight."
        )
    if not all(type(v) is _DenseArrayValue for v in values):
        # Other quax values (quax's own LoraArray, a user's type): quax's own
        # behaviour, untouched by this patch.
        return _native_process_custom_vjp_call(
            self,
            primitive,
            fun,
            fwd,
            bwd,
            tracers,
            out_trees=out_trees,
            symbolic_zeros=symbolic_zeros,
        )
    arrays = [v.array for v in values]
    with core.set_current_trace(self.parent_trace):
        out = primitive.bind(
            *arrays,
            subfuns=(fun, fwd, bwd),
            out_trees=out_trees,
            symbolic_zeros=symbolic_zeros,
        )
    return [_QuaxTracer(self, _dense(x)) for x in out]


def _differentiating(trace: Any) -> bool:
    """Whether a JVP or linearize trace is beneath `trace` (a derivative is being
    taken of the computation it traces)."""
    from jax._src.interpreters import ad

    kinds = tuple(
        k
        for k in (getattr(ad, "JVPTrace", None), getattr(ad, "LinearizeTrace", None))
        if k is not None
    )
    t = getattr(trace, "parent_trace", None)
    while t is not None:
        if isinstance(t, kinds):
            return True
        t = getattr(t, "parent_trace", None)
    return False


PATCHED_CUSTOM_VJP = should_patch(QUAX_VERSION, QUAX_HANDLES_CUSTOM_VJP)
if PATCHED_CUSTOM_VJP:
    _QuaxTrace.process_custom_vjp_call = _process_custom_vjp_call


# -- shard_map --------------------------------------------------------------------
#
# quax's trace has no `process_shard_map`, so any `jax.shard_map` inside a
# quaxified function raised `AttributeError: '_QuaxTrace' object has no attribute
# 'process_shard_map'` before a rule ran (EasyDeL's fused MoE, Levanter's Mixtral
# with a mesh). A shard_map whose inputs are plain arrays is bound as it is on the
# parent trace (its body sees no quax value). One given a `BatchedLoraArray` (the
# expert weights of a MoE) is bound on the parent trace over the weight's component
# arrays, each split as `_rules/shard_map.py` derives from the weight's in_spec; the
# body rebuilds the weight from its per-shard pieces and runs the user's body under
# a fresh quax trace, so the rules serve it there. Other quax values are refused.
QUAX_HANDLES_SHARD_MAP = "process_shard_map" in _QuaxTrace.__dict__


def _process_shard_map(self, primitive, fun, tracers, **params):
    from .shard_map import split_arguments

    # Positions that stand for no rows (cotangents) are dropped.
    values = [
        _dense(v.array) if isinstance(v, RowIds) and not live(v) else v
        for v in (self.to_value(t) for t in tracers)
    ]
    other = [
        type(v).__name__
        for v in values
        if type(v) is not _DenseArrayValue
        and not isinstance(v, (BatchedLoraArray, RowIds))
    ]
    if other:
        raise UnsupportedOperationError(
            f"`jax.shard_map` was given {', '.join(sorted(set(other)))} argument(s) "
            "under quaxify: lorax_arrays passes plain arrays and adapted weights "
            "(BatchedLoraArray) into shard_map bodies, not other quax values. "
            "Compute with this value outside the shard_map body and pass the "
            "result in as a plain array."
        )
    values = [v.array if type(v) is _DenseArrayValue else v for v in values]
    if any(isinstance(v, (BatchedLoraArray, RowIds)) for v in values):
        arrays, specs, rebuild = split_arguments(
            values, params["in_specs"], params["mesh"]
        )
        dbg = params.get("debug_info")
        if dbg is not None and hasattr(dbg, "with_unknown_names"):
            params = dict(params, debug_info=dbg.with_unknown_names())
        params = dict(params, in_specs=specs)
        fun = _quax_body(fun, rebuild)
    else:
        arrays = values
    with core.set_current_trace(self.parent_trace):
        out = primitive.bind(*arrays, subfuns=(fun,), **params)

    def wrap(x):
        return _QuaxTracer(self, _dense(x))

    # JAX >= 0.10 returns a FlatTree of outputs; older JAX a list.
    return out.map(wrap) if hasattr(out, "map") else [wrap(x) for x in out]


def _quax_body(fun, rebuild):
    """A shard_map body over the split arguments: it rebuilds the adapted weights
    from their per-shard pieces and runs `fun` (the user's body, as shard_map
    wrapped it: flat arguments in, a FlatTree of outputs with their out_specs as
    aux out) on them under a fresh quax trace. Its outputs must be plain arrays."""

    def body(*pieces):
        global _shard_map_bodies
        values = rebuild(pieces)
        with core.take_current_trace() as parent:
            pass
        trace = _QuaxTrace(parent, core.TraceTag())
        _shard_map_bodies += 1
        try:
            with core.set_current_trace(parent):
                tracers = [
                    _QuaxTracer(
                        trace,
                        v if isinstance(v, (BatchedLoraArray, RowIds)) else _dense(v),
                    )
                    for v in values
                ]
            with core.set_current_trace(trace):
                out = fun(*tracers)
        finally:
            _shard_map_bodies -= 1

        def unwrap(x):
            if not (isinstance(x, _QuaxTracer) and x._trace.tag is trace.tag):
                return x
            if type(x.value) is _DenseArrayValue:
                return x.value.array
            if isinstance(x.value, RowIds):  # positions end at the body's edge
                return x.value.array
            raise UnsupportedOperationError(
                f"A `jax.shard_map` body returned a {type(x.value).__name__} (shape "
                f"{tuple(x.aval.shape)}) under quaxify: a body's outputs must be "
                "plain arrays. Return the product of the adapted weight (`x @ W`) "
                "rather than the weight itself."
            )

        return out.map(unwrap) if hasattr(out, "map") else [unwrap(x) for x in out]

    return body


# Inside a body, `check_vma` (on by default) wants the operands of each primitive to
# vary over the same mesh axes, and JAX's own functions (`jnp.einsum`, `x @ w`,
# `lax.dot_general`) make them do so (a `pvary`) from each operand's aval. quax
# gives an adapted weight the aval `ShapedArray(shape, dtype)`, which says it
# varies over no axis, so no `pvary` was inserted for the activation and the
# rule's `dot_general(x, w)` failed ("requires varying manual axes to match"). A
# BatchedLoraArray's tracer made inside a body (by the body or by a rule) takes
# its base weight's aval instead: same shape and dtype, with its varying axes.
_shard_map_bodies = 0  # how many bodies `_quax_body` is tracing now
_native_tracer_init = _QuaxTracer.__init__


def _tracer_init(self, trace, value) -> None:
    _native_tracer_init(self, trace, value)
    if _shard_map_bodies and isinstance(value, (BatchedLoraArray, RowIds)):
        inner = value.w if isinstance(value, BatchedLoraArray) else value.array
        with core.set_current_trace(trace.parent_trace):
            aval = core.typeof(inner) if isinstance(inner, core.Tracer) else None
        mat, own = getattr(aval, "mat", None), self._cached_aval
        if (
            mat is not None
            and mat.varying
            and (aval.shape, aval.dtype) == (own.shape, own.dtype)
        ):
            self._cached_aval = aval


PATCHED_SHARD_MAP = not QUAX_HANDLES_SHARD_MAP
if PATCHED_SHARD_MAP:
    _QuaxTrace.process_shard_map = _process_shard_map
    _QuaxTracer.__init__ = _tracer_init


# -- quax's wrapping of arguments on JAX >= 0.11 ---------------------------------
#
# `quax.quaxify` wraps (and afterwards unwraps) its arguments with `tree_map` inside
# `core.take_current_trace()`. JAX up to 0.10 left `eval_trace` current there; JAX
# 0.11 on leaves *no* trace current. Rebuilding a pytree whose unflattening reads
# the current trace then fails: every Flax NNX `Variable` does (its `TraceState()`
# asks `get_opaque_trace_state`, which asserts a trace is current), so any NNX
# module under `quaxify` raised a bare `AssertionError`. The fix wraps and unwraps
# under the parent trace, where the arguments live (on JAX <= 0.10 that is what
# `eval_trace` was, at the top level). Upstream, quax would do the same in
# `_Quaxify.__call__` (`with core.set_current_trace(parent_trace):` around
# `_partition_and_wrap` and the `_unwrap_tracer` map); until then we replace the
# method, for the quax versions whose `__call__` we copied (QUAX_CALL_VERSIONS) and
# only on a JAX that leaves no trace current.
from quax._quaxify import (  # noqa: E402
    _partition_and_wrap,
    _Quaxify,
    _unwrap_tracer,
)
from quax._values import _is_value  # noqa: E402

QUAX_CALL_VERSIONS = ((0, 4, 6), (0, 5))  # [from, to)


def _take_leaves_no_trace() -> bool:
    """Whether `core.take_current_trace()` leaves no trace current (JAX >= 0.11)."""
    with core.take_current_trace():
        return core.trace_ctx.trace is None


JAX_TAKE_LEAVES_NO_TRACE = _take_leaves_no_trace()


def _quaxify_call(self, *args, **kwargs):
    """quax 0.4.6's `_Quaxify.__call__`, with the arguments wrapped and the
    results unwrapped under the parent trace (see above)."""
    import functools as ft

    import jax.tree_util as jtu

    if self.filter_spec is True and not any(
        map(_is_value, jtu.tree_leaves((self.fn, args, kwargs), is_leaf=_is_value))
    ):
        return self.fn(*args, **kwargs)
    tag = core.TraceTag()
    with core.take_current_trace() as parent_trace:
        trace = _QuaxTrace(parent_trace, tag)
        with core.set_current_trace(parent_trace):
            fn, args, kwargs = _partition_and_wrap(
                (self.fn, args, kwargs), self.filter_spec, trace
            )
        with core.set_current_trace(trace):
            out = fn(*args, **kwargs)
        with core.set_current_trace(parent_trace):
            return jtu.tree_map(ft.partial(_unwrap_tracer, trace), out)


PATCHED_QUAXIFY_CALL = JAX_TAKE_LEAVES_NO_TRACE and (
    QUAX_CALL_VERSIONS[0] <= QUAX_VERSION < QUAX_CALL_VERSIONS[1]
)
# quax's own method, for tests/test_compat.py to show what the patch fixes.
native_quaxify_call = _Quaxify.__call__
if PATCHED_QUAXIFY_CALL:
    _Quaxify.__call__ = _quaxify_call


# -- `tracer.value` seen by model code ------------------------------------------
#
# quax's tracer keeps its Value in a slot named `value`. Model code written for
# Flax NNX duck-types on that name (MaxText's layers: `if hasattr(kernel, "value"):
# kernel = kernel.value`, to read a Variable or take an array as it is), so inside
# `quaxify` it took the bare Value out of its tracer, and the next operation on it
# raised `QuaxifyMissingError` although the call *was* quaxified. The slot is now
# read through a descriptor: quax and lorax_arrays (the modules that own the
# tracer) get the Value as before; any other code gets the tracer itself, which is
# what `.value` means to it (the array), so such code runs unchanged. Upstream,
# quax would name the slot privately (`_quax_value`, say). Applied to the quax
# versions whose tracer we checked (QUAX_CALL_VERSIONS).
_VALUE_OWNERS = ("quax.", "lorax_arrays.")


class _TracerValueSlot:
    """The `value` slot of quax's tracer, as its owners and as model code see it."""

    __slots__ = ("slot",)

    def __init__(self, slot: Any) -> None:
        self.slot = slot

    def __get__(self, tracer: Any, owner: Any = None) -> Any:
        if tracer is None:
            return self
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith(_VALUE_OWNERS):
            return self.slot.__get__(tracer, owner)
        return tracer

    def __set__(self, tracer: Any, value: Any) -> None:
        self.slot.__set__(tracer, value)


PATCHED_TRACER_VALUE = (
    QUAX_CALL_VERSIONS[0] <= QUAX_VERSION < QUAX_CALL_VERSIONS[1]
    and type(_QuaxTracer.__dict__.get("value")).__name__ == "member_descriptor"
)
if PATCHED_TRACER_VALUE:
    _QuaxTracer.value = _TracerValueSlot(_QuaxTracer.__dict__["value"])


def tracing() -> bool:
    """Whether a JAX transformation (`jit`, `vmap`, `grad`, `quaxify`) is tracing
    the code that asks."""
    return not core.trace_state_clean()
