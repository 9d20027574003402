"""Everything that reaches into quax's or JAX's private modules, in one place.

Also the one patch we apply to quax: `custom_vjp` support on its trace (below).
"""

from __future__ import annotations

import importlib.metadata
import re

import jax._src.core as core
from jax._src.ad_checkpoint import remat_p
from quax._compat import unpack_scan_args
from quax._dispatch import _default_process as quax_default_process
from quax._primitives import scan_quax
from quax._trace import _QuaxTrace, _QuaxTracer
from quax._values import _dense, _DenseArrayValue

from ._errors import UnsupportedOperationError

__all__ = [
    "PATCHED_CUSTOM_VJP",
    "QUAX_HANDLES_CUSTOM_VJP",
    "QUAX_VERSION",
    "remat_p",
    "unpack_scan_args",
    "quax_default_process",
    "scan_quax",
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
    from ._array import BatchedLoraArray  # _array does not import this module

    values = [self.to_value(t) for t in tracers]
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


PATCHED_CUSTOM_VJP = should_patch(QUAX_VERSION, QUAX_HANDLES_CUSTOM_VJP)
if PATCHED_CUSTOM_VJP:
    _QuaxTrace.process_custom_vjp_call = _process_custom_vjp_call
