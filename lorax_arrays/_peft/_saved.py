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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import PeftFormatError
from .._paths import flatten_with_paths
from ._config import _PREFIX
from ._convert import _bias_modules, _full_factors
from ._files import _KEY
from ._names import _Leaves, _module_parts

# PEFT writes a saved module's tensors without its wrapper's
# `modules_to_save.<adapter name>.` (older versions kept it).
_WRAPPER = re.compile(r"\.modules_to_save\.[^.]+\.")


@dataclass
class SavedLeaf:
    """A saved Linear's weight as a LoRA leaf: `a (in, k)`, `b (k, out)` laid on
    the tree's leaf `path` (`in_axes`, `out_axes`)."""

    module: str
    path: str
    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    a: np.ndarray
    b: np.ndarray


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


def _orientation_of(path: str, shape, weight, orientation, fan_in_fan_out) -> str:
    """`'in_out'` or `'out_in'`: how the tree's 2-D leaf at `path` holds the saved
    torch weight `(out, in)`: `orientation` if it says, else the leaf's
    convention (a Flax `kernel` is `(in, out)`, an `eqx.nn.Linear` `weight`
    `(out, in)`), else a non-square leaf's shape."""
    if isinstance(orientation, str):
        return orientation
    if isinstance(orientation, Mapping):
        for pattern, value in orientation.items():
            if re.search(pattern, path) and isinstance(value, str):
                return value
    name = _module_parts(path)[1]
    out, inp = weight.shape
    if name == "kernel" and not fan_in_fan_out:
        return "in_out"
    if name == "weight":
        return "out_in"
    if out != inp:
        return "in_out" if tuple(shape) == (inp, out) else "out_in"
    raise PeftFormatError(
        f"load_peft_adapter: the saved module's weight at {path!r} is square "
        f"{tuple(shape)} and nothing says which way round the tree holds it: pass "
        "`orientation='in_out'` or `'out_in'` (or a dict from a regex over tree "
        "paths to either)."
    )


def saved_leaves(
    saved: dict[str, dict[str, np.ndarray]],
    leaves: _Leaves,
    tree: Any,
    key_map,
    orientation,
    fan_in_fan_out: bool,
    file: Path,
    is_table,
) -> tuple[list[SavedLeaf], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each saved module as LoRA leaves (where its weight differs from the
    tree's), bias updates (by bias leaf path, where its bias differs), and the
    saved embedding tables (to be checked equal to the tree's, as PEFT's
    `save_embedding_layers` copies are)."""
    out: list[SavedLeaf] = []
    deltas: dict[str, np.ndarray] = {}
    tables: dict[str, np.ndarray] = {}
    biases = _bias_modules(tree)
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
        way = _orientation_of(path, leaf.shape, w, orientation, fan_in_fan_out)
        mine = w.T if way == "in_out" else w
        if tuple(mine.shape) != tuple(leaf.shape):
            raise PeftFormatError(
                f"{what}, a weight of torch shape (out, in) = {tuple(w.shape)}; the "
                f"tree's {path!r} has shape {tuple(leaf.shape)}, which is not "
                f"{tuple(mine.shape)} as its layout ({way}) says. It was saved for "
                "another model (another number of labels?)."
            )
        delta = mine.astype(np.float64) - leaf.astype(np.float64)
        if np.any(delta != 0):
            d_io = delta if way == "in_out" else delta.T
            u, v = _full_factors(d_io)
            dt = w.dtype
            io = way == "in_out"
            out.append(
                SavedLeaf(
                    module=module,
                    path=path,
                    shape=tuple(leaf.shape),
                    in_axes=(0,) if io else (1,),
                    out_axes=(1,) if io else (0,),
                    a=u.astype(dt),
                    b=v.astype(dt),
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
        bias_path = biases.get(_module_parts(path)[0])
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
