"""'/'-joined pytree paths: how rules and adapters name a leaf."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import jax.tree_util as jtu


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


def flatten_with_paths(
    tree: Any, is_leaf: Callable[[Any], bool] | None = None
) -> tuple[list[tuple[str, Any]], Any]:
    """Leaves with their '/'-joined paths, and the treedef to rebuild the tree."""
    leaves, treedef = jtu.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in leaves], treedef


def close_matches(path: str, known: Iterable[str]) -> str:
    near = difflib.get_close_matches(path, list(known), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(p) for p in near)}?" if near else ""
