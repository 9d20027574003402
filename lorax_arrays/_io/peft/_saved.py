"""PEFT's `modules_to_save`: modules trained in full and saved whole with the
adapter (a classification head: `classifier`, `score`, RoBERTa's
`classifier.dense` and `classifier.out_proj`).

Each saved Linear's weight `W_i` becomes an exact full-rank LoRA leaf `W_i - W`
(scale 1; a head has few outputs, so the rank is small), and its bias an update
`b_i - b` of the tree's bias leaf (`Adapter.bias_deltas`, served per row by a
`RowBias`). Anything else a saved module holds is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..._adapters.targeting import lora_alpha
from ..._core.errors import PeftFormatError
from ..._core.paths import bias_leaves, flatten_with_paths
from ._config import _PREFIX
from ._convert import _full_factors
from ._files import _KEY
from ._names import _Leaves, _module_parts
from ._orientation import _orient
from ._records import Module

# PEFT writes a saved module's tensors without its wrapper's
# `modules_to_save.<adapter name>.` (older versions kept it).
_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+\.")


def saved_names(config: Mapping[str, Any], file: Path) -> list[str]:
    """The config's `modules_to_save`, checked."""
    names = config.get("modules_to_save") or []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise PeftFormatError(
            f"{file}: 'modules_to_save' is {config.get('modules_to_save')!r}; "
            "expected a list of module names."
        )
    return names


def split_saved(
    tensors: dict[str, np.ndarray], names: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The file's tensors without those of saved modules, and those, by the
    torch module that owns them (`classifier.out_proj`) and parameter name
    (`weight`, `bias`). A module is saved when it or a module above it ends with
    one of `names` (PEFT's matching, `key.endswith(target)`)."""
    if not names:
        return tensors, {}
    rest, saved = {}, {}
    for key, value in tensors.items():
        short = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        short = _WRAPPER.sub(".", short)
        owner, _, param = short.rpartition(".")
        parts = owner.split(".") if owner else []
        chain = [".".join(parts[: k + 1]) for k in range(len(parts))]
        if (
            _KEY.match(short) is None
            and "lora_" not in short
            and any(p.endswith(t) for p in chain for t in names)
        ):
            saved.setdefault(owner, {})[param] = value
        else:
            rest[key] = value
    return rest, saved


def _orientation_of(module, path, leaf, is_linear, w, orientation, fan_in_fan_out):
    """`'in_out'` or `'out_in'`: how the tree's 2-D leaf at `path` holds the saved
    torch weight `w (out, in)`, decided as for a LoRA module (`_orient`: an
    `orientation` override, the tree's convention, the leaf's shape)."""
    n_out, n_in = w.shape
    record = Module(
        module=module,
        path=path,
        at=None,
        leaf_shape=tuple(leaf.shape),
        kind="linear",
        a=np.zeros((0, n_in), w.dtype),
        b=np.zeros((n_out, 0), w.dtype),
        rank=0,
        alpha=0.0,
        shape=tuple(leaf.shape),
        is_linear=is_linear,
        weight_name=_module_parts(path)[1],
    )
    _orient([record], orientation, fan_in_fan_out)
    return "in_out" if record.groups == ((0,), (1,)) else "out_in"


def saved_leaves(
    saved: dict[str, dict[str, np.ndarray]],
    leaves: _Leaves,
    tree: Any,
    key_map,
    orientation,
    fan_in_fan_out: bool,
    file: Path,
    is_table,
    rslora: bool,
) -> tuple[list[Module], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each saved module's weight as an exact LoRA module of scale 1 (where it
    differs from the tree's; its groups already decided), bias updates (by bias
    leaf path, where its bias differs), and the saved embedding tables (to be
    checked equal to the tree's, as PEFT's `save_embedding_layers` copies
    are)."""
    out: list[Module] = []
    deltas: dict[str, np.ndarray] = {}
    tables: dict[str, np.ndarray] = {}
    biases = bias_leaves(tree)
    values = dict(flatten_with_paths(tree)[0])
    for module in sorted(saved):
        params = saved[module]
        what = (
            f"{file}: the adapter saves module {module!r} in full (`modules_to_save`)"
        )
        extra = sorted(set(params) - {"weight", "bias"})
        w = params.get("weight")
        if extra or w is None or w.ndim != 2:
            have = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(params.items()))
            raise PeftFormatError(
                f"{what}, with {have}. lorax_arrays serves saved Linear layers "
                "(weight (out, in), optional bias (out,)) only: a saved "
                "LayerNorm, convolution or other module would be silently "
                "dropped, so the adapter is refused."
            )
        try:
            path, at = leaves.locate(module, key_map)
        except PeftFormatError as e:
            raise PeftFormatError(
                f"{what}, and it has no leaf in the tree. {e}"
            ) from None
        leaf = np.asarray(leaves.by_path[path][0])
        if at is not None or leaf.ndim != 2:
            raise PeftFormatError(
                f"{what}, whose weight goes to {path!r} (shape {leaf.shape}"
                f"{'' if at is None else f', entry {at}'}); only a 2-D leaf of its "
                "own can hold a saved Linear."
            )
        if is_table(path, tuple(leaf.shape)):
            if "bias" in params:
                raise PeftFormatError(f"{what}: an embedding table with a bias?")
            tables[module] = w
            continue
        if tuple(leaf.shape) not in (tuple(w.shape), tuple(w.shape[::-1])):
            raise PeftFormatError(
                f"{what}, a weight of torch shape (out, in) = {tuple(w.shape)}; the "
                f"tree's {path!r} has shape {tuple(leaf.shape)}, which is neither "
                "way round. It was saved for another model (another number of "
                "labels?)."
            )
        is_linear = leaves.by_path[path][1]
        way = _orientation_of(
            module, path, leaf, is_linear, w, orientation, fan_in_fan_out
        )
        mine = w.T if way == "in_out" else w
        delta = mine.astype(np.float64) - leaf.astype(np.float64)
        if np.any(delta != 0):
            d_io = delta if way == "in_out" else delta.T
            u, v = _full_factors(d_io)  # (in, k), (k, out)
            k = u.shape[1]
            out.append(
                Module(
                    module=module,
                    path=path,
                    at=None,
                    leaf_shape=tuple(leaf.shape),
                    kind="linear",
                    a=u.T.astype(w.dtype),  # PEFT's A (k, in), B (out, k)
                    b=v.T.astype(w.dtype),
                    rank=k,
                    alpha=lora_alpha(1.0, k, rslora),  # scale 1
                    shape=tuple(leaf.shape),
                    is_linear=is_linear,
                    weight_name=_module_parts(path)[1],
                    known_groups=((0,), (1,)) if way == "in_out" else ((1,), (0,)),
                )
            )
        if "bias" not in params:
            continue
        bias = params["bias"]
        if bias.shape != (w.shape[0],):
            raise PeftFormatError(
                f"{what}, with a bias of shape {tuple(bias.shape)} for a weight "
                f"{tuple(w.shape)}; expected ({w.shape[0]},)."
            )
        bias_path = biases.get(_module_parts(path)[0], (None,))[0]
        if bias_path is None:
            if np.any(bias != 0):
                raise PeftFormatError(
                    f"{what}, with a bias, but the tree has no bias leaf next to "
                    f"{path!r} to add it to."
                )
            continue
        base = np.asarray(values[bias_path])
        if base.shape != bias.shape:
            raise PeftFormatError(
                f"{what}, with a bias of shape {tuple(bias.shape)}; the tree's "
                f"{bias_path!r} has shape {tuple(base.shape)}."
            )
        d = bias.astype(np.float64) - base.astype(np.float64)
        if np.any(d != 0):
            deltas[bias_path] = d.astype(bias.dtype)
    return out, deltas, tables
