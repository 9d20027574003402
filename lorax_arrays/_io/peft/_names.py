"""Names: PEFT module names <-> tree leaves, both ways (`key_map`, the default
matching, layer numbers of scanned stacks)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..._adapters.targeting import candidate_leaves
from ..._core.errors import PeftFormatError
from ..._core.paths import unwrapped_parts
from ._config import _PREFIX
from ._records import Entry

# Trailing path components that name a module's weight rather than the module
# (past NNX's value wrappers, `.../kernel/value`): Flax calls them `kernel` /
# `embedding`, Equinox and raw trees `weight`, Gemma-style code `w`.
_LEAF_NAMES = ("kernel", "weight", "embedding", "w")
# torch `nn.Embedding` modules in transformers: what PEFT saves as
# `lora_embedding_A/B` rather than `lora_A/B.weight`.
_EMBEDDING_MODULES = (
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_in",
    "embed_positions",
    "shared",
)


# ----------------------------------------------------------------------------
# Names: PEFT module names <-> tree leaves.


def _module_parts(path: str) -> tuple[tuple[str, ...], str]:
    """A leaf path's module components and the name of its weight.

    `'transformer/h/0/attn/c_attn/kernel'` -> `(('transformer', 'h', '0', 'attn',
    'c_attn'), 'kernel')`; an NNX `'.../q_proj/kernel/value'` the same.
    """
    parts = list(unwrapped_parts(path))
    leaf = ""
    if len(parts) > 1 and parts[-1] in _LEAF_NAMES:
        leaf = parts[-1]
        parts = parts[:-1]
    return tuple(parts), leaf


def default_module_name(path: str) -> str:
    """The PEFT module name a tree path stands for, by the default convention:
    drop the weight's own name (`kernel`, `weight`, `embedding`, NNX's `value`) and
    a leading `params` (a Flax variables dict), and join with '.'."""
    parts, _ = _module_parts(path)
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    return ".".join(parts)


class _Leaves:
    """The tree's adaptable leaves, indexed for finding a module's leaf."""

    def __init__(self, tree: Any):
        self.entries = candidate_leaves(tree)
        if not self.entries:
            raise PeftFormatError(
                "load_peft_adapter: the tree has no adaptable weight (no floating "
                "leaf with at least 2 axes)."
            )
        self.by_path = {p: (leaf, lin) for p, leaf, lin in self.entries}
        self.exact: dict[tuple[str, ...], list[str]] = {}
        self.suffix: dict[tuple[str, ...], list[str]] = {}
        for p, _, _ in self.entries:
            parts, _ = _module_parts(p)
            self.exact.setdefault(parts, []).append(p)
            for k in range(1, len(parts)):
                self.suffix.setdefault(parts[k:], []).append(p)

    def close(self, name: str) -> str:
        known = sorted({".".join(_module_parts(p)[0]) for p in self.by_path})
        near = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        if not near:
            return ""
        return " Closest modules in the tree: " + ", ".join(repr(n) for n in near)

    def resolve_path(self, target, module: str) -> tuple[str, Entry | None]:
        """A `key_map` answer (a leaf path or a module path, or `(path, entry)` for
        an entry of a stacked or fused leaf's leading stack axes) to `(leaf path,
        entry or None)`, the entry a tuple of ints."""
        if isinstance(target, tuple):
            path, _ = self.resolve_path(target[0], module)
            return path, _as_entry(target[1])
        target = target.strip("/")
        if target in self.by_path:
            return target, None
        below = self.exact.get(tuple(target.split("/")), [])
        if len(below) == 1:
            return below[0], None
        near = difflib.get_close_matches(target, list(self.by_path), n=3, cutoff=0.4)
        hint = f" Closest paths: {', '.join(repr(n) for n in near)}." if near else ""
        what = "several weights" if below else "no adaptable weight"
        raise PeftFormatError(
            f"load_peft_adapter: key_map sends PEFT module {module!r} to "
            f"{target!r}, where the tree has {what}.{hint}"
        )

    def locate(self, module: str, key_map) -> tuple[str, Entry | None]:
        """Where PEFT module `module` goes: `key_map`'s answer if it has one, else
        the default matching (`find`). Returns `(path, entry or None)`."""
        target = _call_key_map(key_map, module)
        if target is None:
            return self.find(module)
        return self.resolve_path(target, module)

    def _tiers(self, parts: tuple[str, ...]) -> list[list[str]]:
        return [
            self.exact.get(parts, []),
            self.suffix.get(parts, []),
            [p for k in range(1, len(parts)) for p in self.exact.get(parts[k:], [])],
        ]

    def find(self, module: str) -> tuple[str, Entry | None]:
        """The leaf of PEFT module `module` by name: the tree's module path equal to
        the '.'-split name, else one that ends with it (the tree has a prefix such
        as `params`), else one the name ends with (the torch model has a prefix
        such as `model.`). Failing those, a stacked leaf (a scanned layer stack,
        stack axis first) whose path is the name without one layer number:
        `model.layers.3.self_attn.q_proj` is layer 3 of
        `model/layers/self_attn/q_proj/kernel`. Returns `(path, (layer,) or
        None)`."""
        parts = tuple(module.split("."))
        ambiguous = lambda hits: PeftFormatError(  # noqa: E731
            f"load_peft_adapter: PEFT module {module!r} could be any of "
            f"{hits}. Say which with `key_map={{{module!r}: 'path/to/leaf'}}`."
        )
        for hits in self._tiers(parts):
            if len(hits) == 1:
                return hits[0], None
            if len(hits) > 1:
                raise ambiguous(hits)
        stacked = {}
        for k, part in enumerate(parts):
            if not part.isdigit():
                continue
            for hits in self._tiers(parts[:k] + parts[k + 1 :]):
                hits = [h for h in hits if len(self.by_path[h][0].shape) >= 3]
                if hits:
                    stacked.update({h: (int(part),) for h in hits})
                    break
        if len(stacked) == 1:
            return next(iter(stacked.items()))
        if len(stacked) > 1:
            raise ambiguous(sorted(stacked))
        raise PeftFormatError(
            f"load_peft_adapter: the adapter has weights for PEFT module {module!r}, "
            f"but the tree has no leaf for it.{self.close(module)} Map the names "
            "with `key_map` (a dict from PEFT module name to tree path, or a "
            "function), or load the adapter onto the model it was trained for."
        )


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_entry(v) -> bool:
    return _is_int(v) or (
        isinstance(v, tuple) and len(v) > 0 and all(_is_int(i) for i in v)
    )


def _as_entry(v) -> Entry:
    return (int(v),) if _is_int(v) else tuple(int(i) for i in v)


def _call_key_map(key_map, module: str) -> str | tuple | None:
    if key_map is None:
        return None
    if callable(key_map):
        out = key_map(module)
    elif isinstance(key_map, Mapping):
        out = key_map.get(module, key_map.get(_PREFIX + module))
    else:
        raise TypeError(
            "key_map must be a dict from PEFT module name to tree path, or a "
            f"function of the module name; got {type(key_map).__name__}."
        )
    entry_pair = (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[0], str)
        and _is_entry(out[1])
    )
    if out is not None and not isinstance(out, str) and not entry_pair:
        raise TypeError(
            f"key_map gave {out!r} for {module!r}; expected a '/'-joined tree path, "
            "`(path, i)` for entry i of a stacked or fused leaf's first axis (a "
            "layer of a stack, q/k/v of a fused QKV kernel), or `(path, (i, j))` "
            "for its first axes (entry j of layer i)."
        )
    return out


# Where torch models number their layers: `model.layers.3`, `transformer.h.3`,
# `encoder.layer.3`, `encoder.block.3`.
_LAYER_LISTS = ("layers", "h", "layer", "blocks", "block")


def _namer(key_map) -> Callable[[str], str]:
    """`key_map` (for saving) as a function from tree path to PEFT module name: a
    dict is inverted once, and paths it lacks take the default name."""
    if key_map is None:
        return default_module_name
    if isinstance(key_map, Mapping):
        inverse = {v.strip("/"): k for k, v in key_map.items() if isinstance(v, str)}
        return lambda path: (
            inverse.get(path)
            or inverse.get("/".join(_module_parts(path)[0]))
            or default_module_name(path)
        )
    if callable(key_map):
        return key_map
    raise TypeError(
        "key_map must be a dict from PEFT module name to tree path, or a "
        f"function of the tree path; got {type(key_map).__name__}."
    )


def _module_name(path: str, name, stacked: bool = False) -> str:
    """A PEFT module name given for a leaf, checked; for a stacked leaf a format
    string with `{i}` where the layer number goes."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"key_map gave {name!r} for {path!r}; expected a module name.")
    name = name.removeprefix(_PREFIX)
    if stacked and "{i}" not in name:
        parts = name.split(".")
        at = [k for k, part in enumerate(parts) if part in _LAYER_LISTS]
        if not at:
            raise ValueError(
                f"save_peft_adapter: {path!r} is a stack of layers, and its module "
                f"name {name!r} has no layer list ({', '.join(_LAYER_LISTS)}) to put "
                "the layer number after. Give `key_map` as a function of the tree "
                "path returning a name with '{i}' for the layer, e.g. "
                "'model.layers.{i}.self_attn.q_proj' (for a fused kernel, a list "
                "of names, one per entry: ['...q_proj', '...k_proj', "
                "'...v_proj']), or as the dict load_peft_adapter takes."
            )
        parts.insert(at[-1] + 1, "{i}")
        name = ".".join(parts)
    return name


def _entry_namer(lay, key_map, namer) -> Callable[[Entry], str]:
    """The PEFT module name of each entry of a leaf's stack axes (`()` for a leaf
    without them): from a dict `key_map`'s `(path, entry)` values, else from the
    leaf's name (`{i}` the layer of a layer stack) or, from a function, a list of
    names for the entries of the last stack axis (a fused kernel's q, k, v)."""
    path, ns = lay.path, len(lay.stack_axes)
    if isinstance(key_map, Mapping):
        module_path = "/".join(_module_parts(path)[0])
        named = {
            _as_entry(t[1]): m.removeprefix(_PREFIX)
            for m, t in key_map.items()
            if isinstance(t, tuple)
            and len(t) == 2
            and isinstance(t[0], str)
            and t[0].strip("/") in (path, module_path)
            and _is_entry(t[1])
        }
        if named:

            def from_dict(entry):
                if entry not in named:
                    raise ValueError(
                        f"save_peft_adapter: key_map names entries {sorted(named)} "
                        f"of {path!r} but not entry {entry}, whose factors are not "
                        "zero: add it to key_map."
                    )
                return named[entry]

            return from_dict
    name = namer(path)
    if isinstance(name, (list, tuple)) and ns in (1, 2):
        if len(name) != lay.stack_shape[-1]:
            raise ValueError(
                f"save_peft_adapter: key_map gave {len(name)} names for {path!r}, "
                f"whose last stack axis has {lay.stack_shape[-1]} entries."
            )
        names = [_module_name(path, n, stacked=ns == 2) for n in name]
        return lambda entry: names[entry[-1]].format(i=entry[0])
    if ns == 0:
        name = _module_name(path, name)
        return lambda entry: name
    if ns == 1:
        name = _module_name(path, name, stacked=True)
        return lambda entry: name.format(i=entry[0])
    raise ValueError(
        f"save_peft_adapter: {path!r} has {ns} stack axes (shape {lay.shape}): name "
        "its entries with key_map, a dict from PEFT module name to `(path, (layer, "
        "entry))` (the dict load_peft_adapter takes), or a function of the tree "
        "path giving one name per entry of the last stack axis, with '{i}' for "
        "the layer (['model.layers.{i}.self_attn.q_proj', ...])."
    )
