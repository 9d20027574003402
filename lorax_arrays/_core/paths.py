"""'/'-joined pytree paths: how rules and adapters name a leaf."""

from __future__ import annotations

import collections
import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax.tree_util as jtu
import quax


def key_str(key: Any) -> str:
    if isinstance(key, jtu.DictKey):
        return str(key.key)
    if isinstance(key, jtu.GetAttrKey):
        return key.name
    if isinstance(key, jtu.SequenceKey):
        return str(key.idx)
    if isinstance(key, jtu.FlattenedIndexKey):
        return str(key.key)
    return str(key).strip(".[]'\"")


def path_str(keypath: Iterable[Any]) -> str:
    """Joins a key path's keys with '/': `'params/Dense_0/kernel'`."""
    return "/".join(key_str(k) for k in keypath)


# A QArray's codes inside a WithAux, flattened by NNX's State into plain leaves.
_QWIX_PART = re.compile(r"(^|/)array/qvalue(/value)?$")


def _is_named_leaf(x: Any) -> bool:
    # A quax value (a quantised weight, a BatchedLoraArray) stands for one array,
    # its `aval`: it is named by its own path, never by those of its parts.
    return isinstance(x, quax.ArrayValue) or _is_qwix_with_aux(x)


def _is_qwix_with_aux(x: Any) -> bool:
    return type(x).__name__ == "WithAux" and type(x).__module__.startswith("qwix.")


def flatten_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[str, Any]], Any]:
    """Leaves with their '/'-joined paths, and the treedef to rebuild the tree.

    A quax value is one leaf. A tree straight from qwix's quantisation is refused:
    `lx.from_qwix` puts its weights at the paths the float model's had.
    """
    stop = (
        _is_named_leaf if is_leaf is None else lambda x: _is_named_leaf(x) or is_leaf(x)
    )
    leaves, treedef = jtu.tree_flatten_with_path(tree, is_leaf=stop)
    named = [(path_str(kp), leaf) for kp, leaf in leaves]
    for path, leaf in named:
        if _is_qwix_with_aux(leaf):
            raise ValueError(
                f"{path!r} is a qwix-quantised weight as qwix stores it (a WithAux "
                "holding a QArray, whose parts have paths such as "
                "'.../array/qvalue'). Convert the tree first with "
                "`lx.from_qwix(tree)`: it puts each quantised weight at the path "
                "the float model's weight had, where rules and adapters find it."
            )
        if _QWIX_PART.search(path):
            raise ValueError(
                f"{path!r} is a piece of a qwix-quantised weight: an nnx.State or "
                "pure dict of a quantised model holds its codes and scales as "
                "separate leaves and no longer says how they were quantised. "
                "Convert the quantised model itself with `lx.from_qwix(model)` "
                "(after `nnx.update(model, state)` if you hold only its state)."
            )
    return named, treedef


# The path names of the treedefs seen lately: a server rebuilds the same tree
# every step, and naming its leaves is Python per leaf.
_NAMES: collections.OrderedDict[Any, list[str]] = collections.OrderedDict()
_NAMES_KEPT = 64


def flatten_with_path_names(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[Any], Any, list[str]]:
    """`flatten_with_paths`, as the leaves, the treedef and the paths, with the
    paths remembered per treedef (so a tree of a known structure costs one
    flatten)."""
    stop = (
        _is_named_leaf if is_leaf is None else lambda x: _is_named_leaf(x) or is_leaf(x)
    )
    leaves, treedef = jtu.tree_flatten(tree, is_leaf=stop)
    try:
        names = _NAMES.get(treedef)
    except (TypeError, ValueError):  # static data that cannot be hashed or compared
        return leaves, treedef, [p for p, _ in flatten_with_paths(tree, is_leaf)[0]]
    if names is None or any(_is_qwix_with_aux(x) for x in leaves):
        names = [p for p, _ in flatten_with_paths(tree, is_leaf)[0]]
        _NAMES[treedef] = names
        while len(_NAMES) > _NAMES_KEPT:
            _NAMES.popitem(last=False)
    else:
        _NAMES.move_to_end(treedef)
    return leaves, treedef, names


def close_matches(path: str, known: Iterable[str]) -> str:
    near = difflib.get_close_matches(path, list(known), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(p) for p in near)}?" if near else ""


# Trailing components that wrap a value rather than name it (NNX's
# `.../kernel/value`).
VALUE_NAMES = ("value", "raw_value")


def unwrapped_parts(path: str) -> tuple[str, ...]:
    """A '/'-joined path's components without trailing value wrappers:
    `'dense/bias/value'` -> `('dense', 'bias')`."""
    parts = path.split("/")
    while len(parts) > 1 and parts[-1] in VALUE_NAMES:
        parts = parts[:-1]
    return tuple(parts)


class PathLeaf(NamedTuple):
    """A leaf of a tree and its '/'-joined path."""

    path: str
    leaf: Any


def bias_leaves(tree: Any) -> dict[tuple[str, ...], PathLeaf]:
    """The tree's leaves named `bias` (`.../k_proj/bias`, NNX's
    `.../bias/value`), by the components of their module."""
    out = {}
    for path, leaf in flatten_with_paths(tree)[0]:
        parts = unwrapped_parts(path)
        if parts[-1] == "bias":
            out[parts[:-1]] = PathLeaf(path, leaf)
    return out
