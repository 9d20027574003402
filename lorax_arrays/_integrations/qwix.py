"""A qwix-quantised base weight: `QwixArray` and `from_qwix`.

[qwix](https://github.com/google/qwix) (the quantisation library that Tunix uses
for QLoRA) quantises a model after training: each weight of a quantised matmul
becomes a `WithAux` holding a `QArray` (integer or 4-bit values `qvalue`, a float
`scale`, maybe a `zero_point`), and the model's method is wrapped so that, while it
runs, `jax.lax.dot_general`, `jnp.einsum` and `jnp.dot` are intercepted and a
`QArray` weight goes to qwix's own `dot_general` (`qwix._src.core.dot_general`; for
a float activation it dequantises the weight and lets XLA fuse that into a float
matmul).

`from_qwix` turns such a model (or parameter tree) into one lorax_arrays serves:
every `WithAux[QArray]` becomes a `QwixArray`, a quax value that stands for the
dequantised weight, placed at the path the float model's weight had (an NNX
`up/kernel/value`, a linen `params/Dense_0/kernel`), so rules, adapters made for
the float model, stacks, banks and PEFT loading find it there. The NNX model loses
qwix's interception: under `lx.quaxify`, dispatch on the weight's type does what
the interception did, `x @ QwixArray` is `qwix.dot_general(x, qarray, ...)`, and a
`BatchedLoraArray` over a `QwixArray` adds its low-rank term in float.

Registers: `dot_general` (either side), `transpose`, `reshape`, `squeeze`,
`convert_element_type` and `copy` on `QwixArray`. Everything else raises an error
(dequantising the whole weight is an explicit `QwixArray.materialise()` or
`qwix.dequantize`, never a silent fallback).

qwix is imported only when a qwix object is met: lorax_arrays does not depend on
it.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import quax
from jax import lax
from jaxtyping import ArrayLike

from .._core.array import register_base_weight
from .._core.errors import UnsupportedOperationError
from .._core.paths import flatten_with_paths


def _qwix() -> Any:
    try:
        import qwix
    except ImportError as e:  # pragma: no cover - qwix is in the test extra
        raise ImportError(
            "This needs qwix (`pip install qwix`), the library that quantised the "
            "model."
        ) from e
    return qwix


def is_qarray(x: Any) -> bool:
    """Whether `x` is a qwix `QArray` (without importing qwix)."""
    if "qwix" not in sys.modules:
        return False
    import qwix

    return isinstance(x, qwix.QArray)


def is_with_aux(x: Any) -> bool:
    """Whether `x` is qwix's PTQ `WithAux` wrapper (without importing qwix)."""
    if "qwix" not in sys.modules:
        return False
    from qwix._src.providers.ptq import WithAux

    return isinstance(x, WithAux)


def _unbox(x: Any) -> Any:
    from qwix._src.utils import flax_util

    return flax_util.unbox(x)


class QwixArray(quax.ArrayValue):
    """A qwix-quantised weight as a quax value: it stands for the dequantised array.

    Under [`lorax_arrays.quaxify`][], `dot_general` with a `QwixArray` on either
    side is qwix's own quantised `dot_general` (`qwix.dot_general(x, qarray, ...)`,
    the function qwix's PTQ models call for that product), and transposes,
    reshapes, squeezes and dtype casts act on the `QArray` (as `QArray.transpose`,
    `qwix`'s reshape and `QArray.astype` do), so the weight is never dequantised
    outside that product. Any other operation is an error.

    Use it as the `w` of a [`lorax_arrays.BatchedLoraArray`][] (which also accepts
    a `QArray` and wraps it for you), or get one at every quantised weight of a
    qwix model with `lx.from_qwix`.

    **Arguments:**

    - `qarray`: a `qwix.QArray` (an unboxed one: plain arrays, not `nnx.Param`s),
        or a qwix PTQ `WithAux` holding one.
    """

    qarray: Any

    def __init__(self, qarray: Any):
        if is_with_aux(qarray):
            qarray = qarray.array
        if not is_qarray(qarray):
            raise TypeError(
                f"QwixArray: expected a qwix QArray, got {type(qarray).__name__}."
            )
        self.qarray = _unbox(qarray)

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.qarray.qvalue.shape, self.qarray.scale.dtype)

    def materialise(self) -> jax.Array:
        """The dequantised weight, `qwix.dequantize(qarray)`: a dense float array.

        Called only when asked for (here, or by a `BatchedLoraArray` with
        `allow_materialise=True`); no operation dequantises silently.

        **Returns:**

        A float array of the weight's shape, in the scale's dtype.
        """
        return _qwix().dequantize(self.qarray)

    @staticmethod
    def default(primitive, values, params):
        raise UnsupportedOperationError(
            f"`{primitive.name}` has no rule for a qwix-quantised weight (QwixArray): "
            "lorax_arrays computes `x @ W` with qwix's quantised dot_general and "
            "never silently dequantises the whole weight. Register a rule "
            f"(`@lx.register(jax.lax.{primitive.name}_p)` for a `QwixArray` "
            "argument), or dequantise explicitly where you mean to "
            "(`w.materialise()`, i.e. `qwix.dequantize(w.qarray)`)."
        )

    # -- used outside quaxify: an error that names the fix ----------------------

    def _outside_quaxify(self, *args, **kwargs):
        raise TypeError(
            f"A qwix-quantised weight (QwixArray of shape {tuple(self.shape)}) was "
            "used as a plain array. Only code under `lx.quaxify` understands it, "
            "where `x @ W` is qwix's quantised dot_general. `lx.merge` cannot fold "
            "an adapter into a quantised weight (W + s·AB is not quantised): to "
            "check or export, dequantise the tree first, e.g. `jax.tree.map(lambda "
            "w: w.materialise() if isinstance(w, lx.QwixArray) else w, tree, "
            "is_leaf=lambda w: isinstance(w, lx.QwixArray))`."
        )

    __add__ = __radd__ = __sub__ = __rsub__ = _outside_quaxify
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _outside_quaxify
    __matmul__ = __rmatmul__ = __neg__ = _outside_quaxify

    def __getitem__(self, key):
        # `variable[...]`, NNX's way to read a Variable's value, is the value.
        if key is Ellipsis:
            return self
        return self._outside_quaxify(key)


def _qwix_dot(lhs, rhs, dimension_numbers, params):
    from qwix._src.core import dot_general as qdg

    kwargs = {}
    if params.get("out_sharding") is not None:
        kwargs["out_sharding"] = params["out_sharding"]
    return qdg.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
        **kwargs,
    )


@quax.register(lax.dot_general_p)
def _(lhs: ArrayLike, rhs: QwixArray, *, dimension_numbers, **params):
    return _qwix_dot(lhs, rhs.qarray, dimension_numbers, params)


@quax.register(lax.dot_general_p)
def _(lhs: QwixArray, rhs: ArrayLike, *, dimension_numbers, **params):
    return _qwix_dot(lhs.qarray, rhs, dimension_numbers, params)


def _map(w: QwixArray, fn) -> QwixArray:
    return QwixArray(jtu.tree_map(fn, w.qarray))


@quax.register(lax.transpose_p)
def _(operand: QwixArray, *, permutation):
    # qvalue, scale and zero_point have the same number of axes: QArray.transpose.
    return _map(operand, lambda x: lax.transpose(x, permutation))


@quax.register(lax.squeeze_p)
def _(operand: QwixArray, *, dimensions):
    # A size-1 axis of qvalue is size 1 in scale and zero_point too.
    return _map(operand, lambda x: lax.squeeze(x, dimensions))


@quax.register(lax.reshape_p)
def _(operand: QwixArray, *, new_sizes, dimensions, **params):
    if dimensions is not None:
        raise UnsupportedOperationError(
            "A reshape with `dimensions` (a transpose first) of a QwixArray: "
            "transpose it, then reshape."
        )
    from qwix._src.core import qarray as qa

    try:
        return QwixArray(qa.reshape(operand.qarray, tuple(new_sizes)))
    except ValueError as e:
        raise UnsupportedOperationError(
            f"Cannot reshape a qwix-quantised weight of shape {operand.shape} (scale "
            f"{operand.qarray.scale.shape}) to {tuple(new_sizes)} without "
            f"dequantising it: {e}"
        ) from e


@quax.register(lax.convert_element_type_p)
def _(operand: QwixArray, *, new_dtype, **params):
    if not jnp.issubdtype(new_dtype, jnp.inexact):
        raise UnsupportedOperationError(
            f"Casting a qwix-quantised weight to the non-floating dtype {new_dtype} "
            "has no meaning: a QwixArray stands for its dequantised (float) value."
        )
    # The scale's dtype is the dequantised dtype (QArray.astype).
    q = operand.qarray
    return QwixArray(q.replace(scale=q.scale.astype(new_dtype)))


@quax.register(lax.copy_p)
def _(operand: QwixArray, **params):
    return operand


# -- from_qwix -------------------------------------------------------------------


def _convert(node: Any) -> Any:
    """One `WithAux` as a `QwixArray`, in the box (nnx.Param, nn.Partitioned) its
    `qvalue` was in, so it sits at the float weight's path."""
    from qwix._src.utils import flax_util

    array = node.array
    if not is_qarray(array):
        raise ValueError(
            "from_qwix: this tree holds a qwix-quantised value that is not a weight "
            f"(a WithAux of {type(array).__name__}: the static scale of a quantised "
            "activation). lorax_arrays serves weight-only quantisation (the QLoRA "
            "setting: `qwix.QtRule(weight_qtype=..., act_qtype=None)`): quantise "
            "without activation quantisation."
        )
    box = array.qvalue
    value = QwixArray(array)
    from flax import linen as nn, nnx

    if isinstance(box, nnx.Variable | nn.meta.AxisMetadata):
        return flax_util.update_boxed(box, value=value)
    return value


def _providers(obj: Any, seen: set[int], depth: int = 0):
    """The qwix providers a quantised model's wrapped methods close over."""
    import functools

    import qwix

    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if isinstance(obj, qwix.QuantizationProvider):
        yield obj
    elif isinstance(obj, functools.partial):
        for o in (obj.func, *obj.args, *obj.keywords.values()):
            yield from _providers(o, seen, depth + 1)
    elif callable(obj):
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            yield from _providers(contents, seen, depth + 1)
        if getattr(obj, "__wrapped__", None) is not None:
            yield from _providers(obj.__wrapped__, seen, depth + 1)


def _check_weight_only(model: Any) -> None:
    """Refuses a model whose qwix quantisation is not weight-only PTQ: serving it
    with float activations would silently compute something else."""
    import qwix

    seen: set[int] = set()
    for method in vars(type(model)).values():
        for provider in _providers(method, seen):
            if isinstance(provider, qwix.LoraProvider):
                raise ValueError(
                    "from_qwix: this model carries qwix's own LoRA "
                    "(qwix.LoraProvider, Tunix's QLoRA), which would be dropped. "
                    "lorax_arrays serves many adapters over the quantised base "
                    "instead: quantise the float model with qwix.PtqProvider (the "
                    "same weight_qtype), convert that, and bring each trained qwix "
                    "LoRA as an `lx.Adapter`: a kernel's `<name>_lora_a` "
                    "(*in, rank) and `<name>_lora_b` (rank, *out) are its A and B "
                    "at the kernel's path, with the rule's alpha."
                )
            if not isinstance(provider, qwix.PtqProvider):
                raise ValueError(
                    "from_qwix: this model was quantised with "
                    f"{type(provider).__name__}, not qwix.PtqProvider. lorax_arrays "
                    "serves the weights of post-training quantisation "
                    "(`qwix.quantize_model(model, qwix.PtqProvider(rules), x)`)."
                )
            acts = [r for r in provider._rules if r.act_qtype is not None]
            if acts:
                raise ValueError(
                    "from_qwix: this model's qwix rules also quantise activations "
                    f"(act_qtype={acts[0].act_qtype!r} for module_path="
                    f"{acts[0].module_path!r}), which lorax_arrays does not "
                    "reproduce: it serves weight-only quantisation (QLoRA's "
                    "setting). Quantise with `act_qtype=None`."
                )


def from_qwix(tree: Any) -> Any:
    """A qwix-quantised model or parameter tree, ready for adapters.

    After qwix's post-training quantisation (`qwix.quantize_model(model,
    qwix.PtqProvider(rules), x)` for NNX, `qwix.quantize_params` or the quantised
    model's `init` for linen) each quantised weight is a `WithAux` holding a
    `QArray`, under paths such as `up/kernel/array/qvalue/value`. This returns a
    copy in which each becomes a `lx.QwixArray` at the path the float
    weight had (`up/kernel/value`), so a `LoraRule`, an adapter made for the float
    model, `lx.stack_adapters`, `lx.AdapterBank` and `lx.load_peft_adapter` all
    address it as before, and only the weights (never the scales) are adaptable.

    An NNX model also loses qwix's interception of its method: call it under
    [`lorax_arrays.quaxify`][], where `x @ W` on a `QwixArray` is qwix's own
    `dot_general` (the function the intercepted model called). A linen module
    passed here comes back as its float class (apply it to the converted
    parameters under `lx.quaxify`).

    **Arguments:**

    - `tree`: the quantised NNX model, linen module or parameter tree (any
        pytree). Only weight quantisation is supported (QLoRA's setting:
        `act_qtype=None`): a model whose qwix rules quantise activations is
        refused, and so is a tree holding static activation scales. (A bare
        parameter tree does not record dynamic activation quantisation: serve
        it only if its rules had `act_qtype=None`.)

    **Returns:**

    The same kind of object with every `WithAux[QArray]` replaced. The quantised
    values and scales are shared with `tree`, not copied.
    """
    _qwix()  # an ImportError that says to install qwix, if it is missing
    from qwix._src.providers.ptq import WithAux

    try:
        from flax import linen as nn
    except ImportError:  # pragma: no cover - qwix depends on flax
        nn = None
    if hasattr(type(tree), "_unquantized_type"):  # a model qwix wrapped
        _check_weight_only(tree)
    if nn is not None and isinstance(tree, nn.Module):
        out = tree.copy()
        float_type = getattr(type(out), "_unquantized_type", None)
        if float_type is not None:
            object.__setattr__(out, "__class__", float_type)
        return out
    out = jtu.tree_map(
        lambda x: _convert(x) if isinstance(x, WithAux) else x,
        tree,
        is_leaf=lambda x: isinstance(x, WithAux),
    )
    flatten_with_paths(out)  # refuses a quantised state split into pieces
    float_type = getattr(type(out), "_unquantized_type", None)
    if float_type is not None:
        out.__class__ = float_type
    return out


def _hold_qwix(w: Any) -> QwixArray | None:
    """The core's base-weight hook: a `QArray` or `WithAux` becomes a `QwixArray`."""
    return QwixArray(w) if is_qarray(w) or is_with_aux(w) else None


register_base_weight(_hold_qwix)

__all__ = ["QwixArray", "from_qwix"]
