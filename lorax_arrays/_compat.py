"""Everything that reaches into quax's or JAX's private modules, in one place."""

from __future__ import annotations

import jax._src.core as core
from jax._src.ad_checkpoint import remat_p
from quax._compat import unpack_scan_args
from quax._dispatch import _default_process as quax_default_process
from quax._primitives import scan_quax
from quax._trace import _QuaxTrace, _QuaxTracer
from quax._values import _dense, _DenseArrayValue

from ._errors import UnsupportedOperationError

__all__ = [
    "QUAX_HANDLES_CUSTOM_VJP",
    "remat_p",
    "unpack_scan_args",
    "quax_default_process",
    "scan_quax",
]

# quax 0.4.6 raises NotImplementedError for every `custom_vjp` under `quaxify`, even
# one that only sees plain activations (a gradient clip, a fused attention kernel).
# Until quax handles it, we do: a custom_vjp call whose inputs are all plain arrays
# is bound on the parent trace, custom rule intact. tests/test_compat.py fails when
# quax starts handling it itself, so this patch can be revisited.
QUAX_HANDLES_CUSTOM_VJP = "process_custom_vjp_call" in _QuaxTrace.__dict__


def _process_custom_vjp_call(
    self, primitive, fun, fwd, bwd, tracers, /, *, out_trees, symbolic_zeros
):
    values = [self.to_value(t) for t in tracers]
    if not all(type(v) is _DenseArrayValue for v in values):
        kinds = sorted({type(v).__name__ for v in values} - {"_DenseArrayValue"})
        raise UnsupportedOperationError(
            f"A `jax.custom_vjp` function ({getattr(fun, '__name__', fun)}) was "
            f"called with {', '.join(kinds)} arguments under quaxify. Its custom "
            "gradient is defined for plain arrays, so it cannot see adapted "
            "weights: pass it activations only (compute `x @ W` outside the "
            "custom_vjp function), or give it the base weight."
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


if not QUAX_HANDLES_CUSTOM_VJP:
    _QuaxTrace.process_custom_vjp_call = _process_custom_vjp_call
