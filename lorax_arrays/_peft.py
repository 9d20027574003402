"""Hugging Face PEFT LoRA directories in (`load_peft_adapter`) and out
(`save_peft_adapter`), without PyTorch.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors` with
keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
Whatever the torch module, PEFT stores `A` as `(r, in)` and `B` as `(out, r)`
(embeddings: `lora_embedding_A (r, vocab)`, `lora_embedding_B (dim, r)`). Our
`Adapter` keeps `a: (*in, r)` and `b: (r, *out)` on the leaf's own axes, so the
only questions are which tree leaf a module is, and which axis of that leaf is its
input: the answers live here.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._adapters import Adapter, AdapterStack
from ._array import dense
from ._errors import PeftFormatError
from ._paths import flatten_with_paths
from ._safetensors import read_safetensors, write_atomically, write_safetensors
from ._targeting import LeafLayout, candidate_leaves, lora_scale

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Trailing path components that name a module's weight rather than the module:
# NNX wraps values (`.../kernel/value`), Flax calls them `kernel` / `embedding`,
# Equinox and raw trees `weight`, Gemma-style code `w`.
_VALUE_NAMES = ("value", "raw_value")
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
# Config entries that change what the adapter computes and that we do not serve
# yet: loading such an adapter as plain LoRA would be silently wrong.
_UNSUPPORTED = {
    "lora_bias": "a LoRA bias (`lora_bias=True`)",
    "modules_to_save": "fully trained modules (`modules_to_save`)",
    "layer_replication": "layer replication (`layer_replication`)",
    "trainable_token_indices": "trainable tokens (`trainable_token_indices`)",
    "target_parameters": "LoRA on bare parameters (`target_parameters`)",
    "use_qalora": "QALoRA (`use_qalora=True`)",
    "alora_invocation_tokens": "activated LoRA (`alora_invocation_tokens`)",
    "use_bdlora": "block-diagonal LoRA (`use_bdlora`)",
    "arrow_config": "Arrow routing (`arrow_config`)",
    "kasa_config": "KaSA (`kasa_config`)",
    "monteclora_config": "MonteCLoRA (`monteclora_config`)",
    "velora_config": "VeLoRA (`velora_config`)",
}
# Initialisations that rewrite the base weights: the adapter then only makes
# sense on top of a base model we do not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")


# ----------------------------------------------------------------------------
# PEFT's own matching rules (peft.tuners.tuners_utils.check_target_module_exists
# and peft.utils.other.get_pattern_key), which decide the rank and alpha of a
# module and whether it is targeted.


def pattern_key(pattern_keys, key: str) -> str:
    """The first `rank_pattern` / `alpha_pattern` key that matches module `key`, as
    PEFT picks it (`re.match(rf"(.*\\.)?({k})$", key)`), else `key` itself."""
    for k in pattern_keys:
        if re.match(rf"(.*\.)?({k})$", key):
            return k
    return key


def is_targeted(config: Mapping[str, Any], key: str) -> bool:
    """Whether PEFT's `target_modules` / `exclude_modules` / `layers_to_transform`
    select module `key` (a '.'-joined name relative to the base model)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        pattern = config.get("layers_pattern")
        index = None
        if not pattern:
            index = re.match(r".*?\.[^.]*\.(\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                index = re.match(rf".*?\.{p}\.(\d+)\.", key)
                if index is not None:
                    break
        if index is None:
            return False
        i = int(index.group(1))
        return i == layers if isinstance(layers, int) else i in layers
    return found


# ----------------------------------------------------------------------------
# Names: PEFT module names <-> tree leaves.


def _module_parts(path: str) -> tuple[tuple[str, ...], str]:
    """A leaf path's module components and the name of its weight.

    `'transformer/h/0/attn/c_attn/kernel'` -> `(('transformer', 'h', '0', 'attn',
    'c_attn'), 'kernel')`; an NNX `'.../q_proj/kernel/value'` the same.
    """
    parts = path.split("/")
    while len(parts) > 1 and parts[-1] in _VALUE_NAMES:
        parts = parts[:-1]
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


# A module's place among the entries of a leaf's leading stack axes: `(layer,)` in
# a layer stack, `(entry,)` in a fused kernel (q, k, v of a `(3, N, D, H)` QKV
# kernel), `(layer, entry)` in a stack of fused kernels.
Entry = tuple[int, ...]


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


# ----------------------------------------------------------------------------
# Reading.


def _read_config(directory: Path) -> dict:
    file = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"load_peft_adapter: {directory} is not a directory.")
    if not file.exists():
        raise FileNotFoundError(
            f"load_peft_adapter: {directory} has no {CONFIG_NAME}; a PEFT adapter "
            f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME} (as written by "
            "`PeftModel.save_pretrained`)."
        )
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftFormatError(f"{file}: not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{file}: expected a JSON object.")
    return config


_PEFT_TYPES = ("LORA", "IA3", "VERA", "LOHA", "LOKR")


def _peft_type(config: dict) -> str:
    return str(config.get("peft_type", "LORA")).upper()


def _check_config(config: dict, file: Path) -> None:
    peft_type = _peft_type(config)
    if peft_type not in _PEFT_TYPES:
        raise PeftFormatError(
            f"{file}: peft_type is {config.get('peft_type')!r}; load_peft_adapter "
            "reads LoRA adapters only, with the variants DoRA, IA3, VeRA, LoHa and "
            "LoKr (OFT, BOFT, AdaLoRA... are not supported yet)."
        )
    if config.get("modules_to_save"):
        raise PeftFormatError(
            f"{file}: the adapter uses fully trained modules (`modules_to_save`), "
            "which lorax_arrays does not serve yet; loading the rest would give "
            "wrong outputs."
        )
    if peft_type == "IA3":
        for key in ("target_modules", "feedforward_modules"):
            value = config.get(key)
            if value is not None and not isinstance(value, (str, list)):
                raise PeftFormatError(
                    f"{file}: {key!r} is {value!r}; expected a regex or a list of "
                    "module names."
                )
        return
    if peft_type in ("LOHA", "LOKR"):
        for key in ("r", "alpha"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PeftFormatError(
                    f"{file}: {key!r} is {value!r}; expected a number (a "
                    f"{_WHAT[peft_type]} config has 'r' and 'alpha')."
                )
        for key in ("rank_pattern", "alpha_pattern"):
            value = config.get(key) or {}
            if not isinstance(value, dict):
                raise PeftFormatError(f"{file}: {key!r} must be a dict, got {value!r}.")
        return
    bias = config.get("bias", "none")
    if bias != "none":
        raise PeftFormatError(
            f"{file}: bias={bias!r}: the adapter trains the model's biases, which "
            "lorax_arrays does not serve yet (only bias='none')."
        )
    if peft_type == "VERA":
        if not config.get("save_projection", True):
            raise PeftFormatError(
                f"{file}: a VeRA adapter saved with save_projection=False: its "
                "shared projections vera_A / vera_B are not in the file, and "
                "regenerating them from projection_prng_key="
                f"{config.get('projection_prng_key')!r} needs PyTorch's random "
                "number generator. Re-save it in PEFT with "
                "`VeraConfig(save_projection=True)`."
            )
        value = config.get("r")
        if isinstance(value, bool) or not isinstance(value, int):
            raise PeftFormatError(f"{file}: 'r' is {value!r}; expected an integer.")
        return
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise PeftFormatError(
                f"{file}: the adapter uses {what}, which lorax_arrays does not serve "
                "yet; loading the rest as plain LoRA would give wrong outputs."
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise PeftFormatError(
            f"{file}: init_lora_weights={init!r} changes the base weights, so the "
            "adapter only works on that modified base. Convert it in PEFT first "
            "(`save_pretrained(..., path_initial_model_for_weight_conversion=...)`)."
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PeftFormatError(f"{file}: {key!r} is {value!r}; expected a number.")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise PeftFormatError(f"{file}: {key!r} must be a dict, got {value!r}.")


_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<lin>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB])"
    r"|(?P<mag>lora_magnitude_vector)|(?P<ia3>ia3_l)|vera_lambda_(?P<vera>[bd])"
    r"|hada_(?P<loha>w[12]_[ab]|t[12])|lokr_(?P<lokr>w[12](?:_[ab])?|t2))$"
)
# What each peft_type's files hold per module (the `_KEY` groups), for errors.
_EXPECTED = {
    "LORA": "'<module>.lora_A.weight', '<module>.lora_B.weight', "
    "'<module>.lora_embedding_A', '<module>.lora_embedding_B' and, with use_dora, "
    "'<module>.lora_magnitude_vector'",
    "IA3": "'<module>.ia3_l'",
    "VERA": "'base_model.vera_A', 'base_model.vera_B', '<module>.vera_lambda_d' "
    "and '<module>.vera_lambda_b'",
    "LOHA": "'<module>.hada_w1_a', '<module>.hada_w1_b', '<module>.hada_w2_a' and "
    "'<module>.hada_w2_b'",
    "LOKR": "'<module>.lokr_w1' or '<module>.lokr_w1_a' and '<module>.lokr_w1_b', "
    "and '<module>.lokr_w2' or '<module>.lokr_w2_a' and '<module>.lokr_w2_b'",
}
_WHAT = {"LORA": "LoRA", "IA3": "IA3", "VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr"}


def _parse_keys(tensors: dict[str, np.ndarray], file: Path, config: dict):
    """Splits the file's keys into the adapter's tensors per module (`A`, `B`,
    DoRA's `m`, IA3's `l`, VeRA's `d` and `b`), saved base weights, and VeRA's
    shared projections."""
    peft_type = _peft_type(config)
    dora = peft_type == "LORA" and bool(config.get("use_dora"))
    factors: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    base_copies: dict[str, np.ndarray] = {}
    shared: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if peft_type == "VERA" and key in ("base_model.vera_A", "base_model.vera_B"):
            shared[key[-1]] = value
            continue
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        m = _KEY.match(name)
        group = (
            None
            if m is None
            else next(
                g for g in ("lin", "emb", "mag", "ia3", "vera", "loha", "lokr") if m[g]
            )
        )
        if group in ("lin", "emb") and peft_type == "LORA":
            module = m["module"]
            kind = "embedding" if m["emb"] else "linear"
            which = (m["emb"] or m["lin"])[-1]
            if kinds.setdefault(module, kind) != kind:
                raise PeftFormatError(
                    f"{file}: module {module!r} has both lora_A/B and "
                    "lora_embedding_A/B weights."
                )
            factors.setdefault(module, {})[which] = value
            continue
        if group == "mag" and dora:
            factors.setdefault(m["module"], {})["m"] = value
            continue
        if group == "mag" and peft_type == "LORA":
            raise PeftFormatError(
                f"{file}: key {key!r} is a DoRA magnitude vector, but the config "
                "does not set use_dora: the directory's two files do not belong "
                "together."
            )
        if group == "ia3" and peft_type == "IA3":
            factors.setdefault(m["module"], {})["l"] = value
            continue
        if group == "vera" and peft_type == "VERA":
            factors.setdefault(m["module"], {})[m["vera"]] = value
            continue
        if group in ("loha", "lokr") and peft_type == group.upper():
            factors.setdefault(m["module"], {})[m[group]] = value
            continue
        if m is None and "lora_" not in name and name.endswith(".weight"):
            # PEFT's `save_embedding_layers` stores whole embedding layers (when they
            # are targeted or the vocabulary was resized).
            module = name[: -len(".weight")]
            module = module.removesuffix(".base_layer")
            base_copies[module] = value
            continue
        other = (
            ""
            if group is None
            else (
                " It belongs to another PEFT method than the config's (peft_type is "
                f"{config.get('peft_type', 'LORA')!r}): the directory's two files do "
                "not belong together."
            )
        )
        what = _WHAT[peft_type]
        raise PeftFormatError(
            f"{file}: key {key!r} is not a {what} weight lorax_arrays understands "
            f"(expected {_EXPECTED[peft_type]}).{other}"
        )
    for module, parts in factors.items():
        kinds.setdefault(module, "linear")
        if peft_type == "LORA":
            _check_lora_module(module, parts, kinds[module], dora, file)
        elif peft_type == "IA3":
            v = parts["l"]
            if v.ndim != 2 or 1 not in v.shape:
                conv = " (a convolution's IA3?)" if v.ndim == 4 else ""
                raise PeftFormatError(
                    f"{file}: module {module!r} has ia3_l of shape {v.shape}{conv}; "
                    "expected (out, 1) or, for a feedforward module, (1, in). Only "
                    "IA3 on linear layers is supported so far."
                )
        elif peft_type in ("LOHA", "LOKR"):
            _check_lycoris_module(module, parts, peft_type, file)
        else:
            if set(parts) != {"b", "d"}:
                missing = ({"b", "d"} - set(parts)).pop()
                raise PeftFormatError(
                    f"{file}: module {module!r} has no vera_lambda_{missing}: the "
                    "file is incomplete."
                )
            if parts["b"].ndim != 1 or parts["d"].shape != (config["r"],):
                raise PeftFormatError(
                    f"{file}: module {module!r} has vera_lambda_b {parts['b'].shape} "
                    f"and vera_lambda_d {parts['d'].shape}; expected (out,) and "
                    f"(r,) = ({config['r']},)."
                )
    if peft_type == "VERA":
        if set(shared) != {"A", "B"}:
            raise PeftFormatError(
                f"{file}: a VeRA file without its shared projections "
                "'base_model.vera_A' / 'base_model.vera_B' (saved with "
                "save_projection=False?): regenerating them needs PyTorch's random "
                "number generator. Re-save it in PEFT with save_projection=True."
            )
        r = config["r"]
        if (
            shared["A"].ndim != 2
            or shared["B"].ndim != 2
            or shared["A"].shape[0] != r
            or shared["B"].shape[1] != r
        ):
            raise PeftFormatError(
                f"{file}: vera_A {shared['A'].shape} and vera_B {shared['B'].shape}; "
                f"expected (r, max_in) and (max_out, r) with r = {r}."
            )
    return factors, kinds, base_copies, shared


def _check_lycoris_module(module: str, parts: dict, peft_type: str, file: Path):
    """A LoHa or LoKr module's tensors: those of a linear layer, complete."""
    what = _WHAT[peft_type]
    prefix = "hada_" if peft_type == "LOHA" else "lokr_"
    conv = [k for k in ("t1", "t2") if k in parts] or [
        k for k, v in parts.items() if v.ndim != 2
    ]
    if conv:
        raise PeftFormatError(
            f"{file}: module {module!r} has {prefix}{conv[0]} of shape "
            f"{parts[conv[0]].shape}: a convolution's {what} (use_effective_conv2d "
            f"or a conv kernel). lorax_arrays serves {what} on linear layers only."
        )
    if peft_type == "LOHA":
        need = [("w1_a",), ("w1_b",), ("w2_a",), ("w2_b",)]
    else:
        need = [("w1", "w1_a"), ("w2", "w2_a")]
    for alts in need:
        if not any(k in parts for k in alts):
            raise PeftFormatError(
                f"{file}: module {module!r} has no {prefix}{alts[0]}: the file is "
                "incomplete."
            )
    if peft_type == "LOKR":
        for w in ("w1", "w2"):
            lo = [k for k in (f"{w}_a", f"{w}_b") if k in parts]
            if (w in parts and lo) or len(lo) == 1:
                raise PeftFormatError(
                    f"{file}: module {module!r} has "
                    + ", ".join(f"lokr_{k}" for k in (w, *lo) if k in parts)
                    + f": expected lokr_{w}, or lokr_{w}_a and lokr_{w}_b."
                )
    shapes = {k: v.shape for k, v in parts.items()}
    if peft_type == "LOHA":
        ok = (
            shapes["w1_a"][1] == shapes["w1_b"][0]
            and shapes["w2_a"][1] == shapes["w2_b"][0]
            and shapes["w1_a"][0] == shapes["w2_a"][0]
            and shapes["w1_b"][1] == shapes["w2_b"][1]
        )
    else:
        ok = all(
            parts[f"{w}_a"].shape[1] == parts[f"{w}_b"].shape[0]
            for w in ("w1", "w2")
            if w not in parts
        )
    if not ok:
        raise PeftFormatError(
            f"{file}: module {module!r} has {what} tensors of shapes "
            + ", ".join(f"{prefix}{k} {v}" for k, v in sorted(shapes.items()))
            + ", which do not fit together."
        )


def _check_lora_module(module: str, parts: dict, kind: str, dora: bool, file: Path):
    if not {"A", "B"} <= set(parts):
        missing = "A" if "A" not in parts else "B"
        have = "".join(k for k in "AB" if k in parts)
        raise PeftFormatError(
            f"{file}: module {module!r} has "
            + (f"lora_{have} but " if have else "a DoRA magnitude but ")
            + f"no lora_{missing}: the file is incomplete."
        )
    a, b = parts["A"], parts["B"]
    conv = (
        3 <= a.ndim <= 5
        and b.ndim == a.ndim
        and a.shape[0] == b.shape[1]
        and all(n == 1 for n in b.shape[2:])
        and kind == "linear"
    )
    if not conv and (a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]):
        raise PeftFormatError(
            f"{file}: module {module!r} has A {a.shape} and B {b.shape}; expected "
            "A (r, in) and B (out, r) with the same r (a linear or embedding "
            "layer), or a convolution's A (r, in, *kernel) and B (out, r, 1, ...)."
        )
    if not dora:
        return
    if conv:
        raise PeftFormatError(
            f"{file}: module {module!r} is a convolution with DoRA (use_dora=True); "
            "lorax_arrays serves DoRA on linear layers only."
        )
    if kind == "embedding":
        raise PeftFormatError(
            f"{file}: module {module!r} is an embedding with DoRA (use_dora=True); "
            "lorax_arrays serves DoRA on linear layers only (an embedding's DoRA "
            "normalises the table per embedding dimension, which the lookup rule "
            "does not do)."
        )
    if "m" not in parts:
        raise PeftFormatError(
            f"{file}: the config sets use_dora (DoRA), but module {module!r} has "
            "no lora_magnitude_vector: the file is incomplete."
        )
    if parts["m"].shape != (b.shape[0],):
        raise PeftFormatError(
            f"{file}: module {module!r} has a DoRA magnitude of shape "
            f"{parts['m'].shape} for out={b.shape[0]} (lora_B {b.shape}); expected "
            f"({b.shape[0]},)."
        )


_ORIENTATIONS = ("in_out", "out_in")
# The in- and out-axes of a 2-D module weight in each orientation.
_GROUPS = {"in_out": ((0,), (1,)), "out_in": ((1,), (0,))}
_NAMES = {g: o for o, g in _GROUPS.items()}


def _orientation_override(orientation, path: str):
    """The `orientation` given for `path`: `'in_out'`, `'out_in'`, a pair
    `(in_axes, out_axes)` of the leaf's axes, or None."""
    if orientation is None:
        return None
    if isinstance(orientation, (str, tuple, list)):
        choice = orientation
    elif isinstance(orientation, Mapping):
        choice = next(
            (v for pat, v in orientation.items() if re.search(pat, path)), None
        )
        if choice is None:
            return None
    else:
        raise TypeError(
            "orientation must be 'in_out', 'out_in', a pair (in_axes, out_axes), "
            "or a dict from a regex over tree paths to one of those; got "
            f"{type(orientation).__name__}."
        )
    if isinstance(choice, (tuple, list)):
        ok = len(choice) == 2 and all(
            isinstance(g, (tuple, list)) and g and all(_is_int(ax) for ax in g)
            for g in choice
        )
        if not ok:
            raise ValueError(
                f"orientation {choice!r} for {path!r}: a pair gives the leaf's "
                "(in_axes, out_axes), two non-empty tuples of axes, as in its "
                "LoraRule: ((2,), (1, 3)) for a (3, N, D, H) QKV kernel."
            )
        return tuple(tuple(int(ax) for ax in g) for g in choice)
    if choice not in _ORIENTATIONS:
        raise ValueError(
            f"orientation {choice!r} for {path!r}: use 'in_out' (the leaf is "
            "(in, out), as a Flax Dense kernel) or 'out_in' (the leaf is (out, in), "
            "as a torch Linear weight, an eqx.nn.Linear weight or the Flax GPT-2 "
            "Conv1D kernel), or for a multi-axis leaf the pair (in_axes, out_axes) "
            "of its axes."
        )
    return choice


def _splits(shape: tuple[int, ...], n_in: int, n_out: int) -> list:
    """Every way to split a module weight's axes into an in group and an out group
    (both non-empty, each in increasing order) of `n_in` and `n_out` elements.
    For more than two axes, splits that differ only in where size-1 axes go (the
    same matrix either way) count once."""
    nd, found, seen = len(shape), [], set()
    for mask in itertools.product((False, True), repeat=nd):
        ins = tuple(ax for ax in range(nd) if not mask[ax])
        outs = tuple(ax for ax in range(nd) if mask[ax])
        if not ins or not outs:
            continue
        if math.prod(shape[ax] for ax in ins) != n_in:
            continue
        if math.prod(shape[ax] for ax in outs) != n_out:
            continue
        key = tuple(m for ax, m in enumerate(mask) if shape[ax] != 1 or nd == 2)
        if key not in seen:
            seen.add(key)
            found.append((ins, outs))
    return found


def _on_leaf(f: dict, groups) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A module weight's `(in_axes, out_axes)` as axes of its leaf (after the
    stack entries)."""
    k = 0 if f["at"] is None else len(f["at"])
    return tuple(tuple(ax + k for ax in g) for g in groups)


def _forced_groups(forced, f: dict, fits: list):
    """An `orientation` override as the module weight's groups, checked."""
    shape, nd = f["shape"], len(f["shape"])
    k = 0 if f["at"] is None else len(f["at"])
    if isinstance(forced, str):
        if nd != 2:
            raise PeftFormatError(
                f"load_peft_adapter: orientation {forced!r} for {f['path']!r} "
                f"describes a 2-D weight, but PEFT module {f['module']!r} has a "
                f"{nd}-axis weight {shape} there; give the leaf's (in_axes, "
                f"out_axes), as in its LoraRule (here one of "
                f"{', '.join(str(_on_leaf(f, g)) for g in fits) or 'none'})."
            )
        groups = _GROUPS[forced]
    else:
        groups = tuple(tuple(ax - k for ax in g) for g in forced)
        if any(ax < 0 for g in groups for ax in g):
            raise PeftFormatError(
                f"load_peft_adapter: orientation {forced} for {f['path']!r} names "
                f"its stack axes {tuple(range(k))} (the entries PEFT module "
                f"{f['module']!r} is placed at)."
            )
        groups = tuple(tuple(sorted(g)) for g in groups)
    if groups not in fits:
        raise PeftFormatError(
            f"load_peft_adapter: orientation {forced!r} for {f['path']!r} "
            f"contradicts its shape {shape} (in={f['a'].shape[1]}, "
            f"out={f['b'].shape[0]})."
        )
    return groups


def _orient(found: list[dict], orientation) -> None:
    """Decides, per leaf, which axes of the module's weight are its input and
    which its output (`f["groups"]`); for 2-D weights that is `(in, out)` or
    `(out, in)`."""
    undecided = []
    for f in found:
        shape, (r, n_in), (n_out, _) = f["shape"], f["a"].shape, f["b"].shape
        del r
        fits = _splits(shape, n_in, n_out)
        f["fits"] = fits
        if not fits:
            raise PeftFormatError(
                f"load_peft_adapter: PEFT module {f['module']!r} has in={n_in}, "
                f"out={n_out}, but its leaf {f['path']!r} has shape {shape}"
                + ("" if f["at"] is None else f" (after the stack entry {f['at']})")
                + ": the adapter was made for another model, or key_map points at "
                "the wrong leaf."
            )
        forced = _orientation_override(orientation, f["path"])
        if f.get("conv_groups") is not None:
            f["groups"] = f["conv_groups"]
        elif forced is not None:
            f["groups"] = _forced_groups(forced, f, fits)
        elif f["is_linear"] and len(shape) == 2:
            f["groups"] = _GROUPS["out_in"]  # eqx.nn.Linear.weight is (out, in)
            if f["groups"] not in fits:
                raise PeftFormatError(
                    f"load_peft_adapter: PEFT module {f['module']!r} has in={n_in}, "
                    f"out={n_out}, but the eqx.nn.Linear weight {f['path']!r} has "
                    f"shape {shape} (an (out, in) weight): wrong model or key_map."
                )
        elif f["kind"] == "embedding" and len(shape) == 2:
            f["groups"] = _GROUPS["in_out"]  # JAX embedding tables are (vocab, dim)
            if f["groups"] not in fits:
                raise PeftFormatError(
                    f"load_peft_adapter: embedding {f['module']!r} has vocab={n_in}, "
                    f"dim={n_out}, but {f['path']!r} has shape {shape}; pass "
                    "orientation={...: 'out_in'} if that table is stored (dim, vocab)."
                )
        elif len(fits) == 1:
            f["groups"] = fits[0]
        else:
            f["groups"] = None
            undecided.append(f)
    decided = [g for g in found if g["groups"] is not None]
    for f in undecided:
        seen = {
            g["groups"]
            for g in decided
            if g["kind"] == "linear"
            and not g["is_linear"]
            and g["weight_name"] == f["weight_name"]
            and len(g["shape"]) == len(f["shape"])
        }
        if len(seen) == 1 and next(iter(seen)) in f["fits"]:
            f["groups"] = seen.pop()
            continue
        why = (
            "the adapter's other leaves disagree"
            if len(seen) > 1
            else "no non-square leaf of the adapter shows the convention"
            if not seen
            else "the adapter's other leaves follow a convention that does not fit"
        )
        if len(f["shape"]) == 2:
            raise PeftFormatError(
                f"load_peft_adapter: {f['path']!r} (PEFT module {f['module']!r}) "
                f"is square, {f['shape']}, and {why}, so it cannot tell whether the "
                "leaf is (in, out) as a Flax Dense kernel or (out, in) as a torch "
                "Linear weight; a wrong guess is a silently wrong model. Say which "
                "with `orientation='in_out'` or `'out_in'` (or a dict from a regex "
                "over tree paths to one of those)."
            )
        if not seen:
            why = f"no other {len(f['shape'])}-axis leaf of the adapter decides it"
        options = [_on_leaf(f, g) for g in f["fits"]]
        raise PeftFormatError(
            f"load_peft_adapter: PEFT module {f['module']!r} (in={f['a'].shape[1]}, "
            f"out={f['b'].shape[0]}) fits the axes of {f['path']!r} (shape "
            f"{f['leaf_shape']}) in {len(options)} ways, as (in_axes, out_axes) "
            f"{', '.join(map(str, options))}, and {why}; a wrong guess is a "
            "silently wrong model. Say which with `orientation={"
            f"{re.escape(f['path'])!r}: {options[0]}}}` (the leaf's axes, as in "
            "its LoraRule)."
        )


def load_peft_adapter(
    path: str | os.PathLike,
    tree: Any,
    *,
    key_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
    dtype: Any = None,
    orientation: str | Mapping[str, str] | None = None,
) -> Adapter:
    """Reads a Hugging Face PEFT LoRA, DoRA, IA3, VeRA, LoHa or LoKr directory as
    an `Adapter` for `tree`.

    No PyTorch is needed. Every weight in the file must find its leaf, and every
    config entry must be one lorax_arrays serves faithfully: anything else (a
    trained bias, `modules_to_save`, another `peft_type`, an unknown key) is an
    error that names it, never a partial load.

    - **Variants.** Each maps onto the fields of [`lorax_arrays.Adapter`][]:
        - DoRA (`use_dora: true`): `lora_A`/`lora_B` as for LoRA, and each
          module's `lora_magnitude_vector (out,)` becomes `magnitudes[path]`,
          `(*stack, *out)`, laid on the out-axes as `lora_B`'s rows are. The
          norm is that of the tree's base weight plus the update, per
          out-feature, with no gradient, as in PEFT. DoRA on an embedding is
          refused.
        - IA3 (`peft_type: "IA3"`): a rank-0 leaf with one vector. `ia3_l (out,
          1)` scales the output (`out_scales[path]`); for a module in
          `feedforward_modules` (PEFT's matching: a regex full match, or a name
          suffix), `ia3_l (1, in)` scales the input (`in_scales[path]`). PEFT
          also scales the bias of an output-scaled module, and lorax_arrays
          scales only the matmul: a bias leaf next to such a weight
          (`.../k_proj/bias`) is refused.
        - VeRA (`peft_type: "VERA"`): a plain LoRA with scale 1 (alpha = rank),
          exact: `A = diag(vera_lambda_d) vera_A[:, :in]`, `B = diag(vera_lambda_b)
          vera_B[:out]`. The shared projections must be in the file
          (`save_projection=True`); regenerating them needs PyTorch's RNG.
        - LoHa (`peft_type: "LOHA"`) and LoKr (`"LOKR"`) on linear layers: the
          exact plain LoRA they equal, scale 1 (PEFT's `alpha / r` folded into
          `B`). LoHa's `(w1_a w1_b) ⊙ (w2_a w2_b)` has rank `r²`; LoKr's
          `kron(w1, w2)` (each factor full or `_a @ _b`) rank `rank(w1)·rank(w2)`;
          both at most `min(out, in)`. Convolutions are refused.

    - **Names.** A PEFT key `base_model.model.<module>.lora_A.weight` names a
      torch module such as `model.layers.0.self_attn.q_proj`. By default it maps to
      the tree leaf whose path, without its weight's own name (`kernel`,
      `weight`, `embedding`, NNX's `value`), is that module's '/'-joined name, with
      any prefix on either side (`params/...` in a Flax variables dict, `model.` on
      a torch `...ForCausalLM`). This works unmodified for the Flax ports in
      `transformers` (GPT-2, Llama, Mistral, BERT, T5, ...). `key_map` overrides it.
    - **Orientation.** PEFT stores `A (r, in)` and `B (out, r)`. A 2-D leaf may be
      `(in, out)` (Flax `Dense`) or `(out, in)` (an `eqx.nn.Linear` weight, the Flax
      GPT-2 `Conv1D` kernel); a non-square leaf says which by its shape, and a
      square one (`q_proj`, `c_proj`) takes the orientation of the adapter's
      non-square leaves with the same weight name. Where nothing decides it, an
      error asks for `orientation`. Embedding tables are `(vocab, dim)`, as in
      every JAX library.
    - **Layer stacks.** A leaf of shape `(L, ., .)` (a scanned stack: `nnx.scan`,
      Flax `nn.scan`, `eqx.filter_vmap`-built layers, stack axis first) takes one
      module per layer: `model.layers.3.self_attn.q_proj` is layer 3 of
      `model/layers/self_attn/q_proj/kernel` (its name without the layer number).
      Layers the adapter lacks are zero; ranks are padded to the largest, and a
      layer whose scale differs from the others' (by `rank_pattern` /
      `alpha_pattern`) has the ratio folded into its `B`.
    - **Fused kernels.** Several PEFT modules can share one leaf as entries of
      its leading stack axes: `key_map` sends `q_proj`, `k_proj`, `v_proj` to
      `(path, 0)`, `(path, 1)`, `(path, 2)` of a Gemma-style `(3, N, D, H)`
      `qkv_einsum` (and to `(path, (layer, entry))` in a `(L, 3, N, D, H)`
      layer stack), handled like layers: padded ranks, scales folded into `B`,
      zero factors for an entry no module names.
    - **Multi-axis weights.** What is left of a leaf after its entries may have
      more than two axes (`(N, D, H)`): PEFT's flat `in` and `out` are split
      row-major over the in- and out-axes in increasing order, which the shapes
      decide when only one split of the axes fits; otherwise (`D == N * H`) the
      error asks for `orientation={path: (in_axes, out_axes)}`.
    - **Config.** `r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` (PEFT's
      matching: the first pattern `k` with `re.match(rf"(.*\\.)?({k})$", module)`),
      `use_rslora`, `target_modules` / `exclude_modules` / `layers_to_transform`
      (every module in the file must be one the config targets), LoRA on
      embeddings (`lora_embedding_A/B`). A whole embedding layer saved with the
      adapter (PEFT's `save_embedding_layers`) must equal the tree's.

    **Arguments:**

    - `path`: the adapter directory (`adapter_config.json`,
        `adapter_model.safetensors`).
    - `tree`: the model or parameter tree the adapter is for (a Flax `params`
        dict, an Equinox or NNX module, a dict of arrays).
    - `key_map`: a dict from PEFT module name (`'model.layers.0.self_attn.q_proj'`,
        with or without `base_model.model.`) to a tree path (a leaf's path, or its
        module's; `(path, i)` for entry `i` of a stacked or fused leaf's first
        axis, `(path, (i, j))` for its first two), or a function of the module
        name returning one; a module it leaves out (or maps to `None`) uses the
        default matching.
    - `dtype`: cast the factors to this dtype; by default they keep the file's.
    - `orientation`: `'in_out'` or `'out_in'` for every 2-D leaf, the leaf's
        `(in_axes, out_axes)` (as in its LoraRule) for a multi-axis one, or a
        dict from a regex over tree paths to one of those; checked against the
        shapes.

    **Returns:**

    An [`lorax_arrays.Adapter`][] with `a: (in, r)` and `b: (r, out)` per leaf, the
    rank, alpha and rsLoRA flag of each module, in the order of the tree's leaves.
    """
    directory = Path(path)
    config = _read_config(directory)
    config_file = directory / CONFIG_NAME
    _check_config(config, config_file)
    weights_file = directory / WEIGHTS_NAME
    if not weights_file.exists():
        other = directory / "adapter_model.bin"
        hint = (
            f" It has {other.name} (a pickled torch file): re-save it with "
            "`save_pretrained(..., safe_serialization=True)`."
            if other.exists()
            else ""
        )
        raise FileNotFoundError(f"load_peft_adapter: {weights_file} missing.{hint}")
    tensors, _ = read_safetensors(weights_file)
    peft_type = _peft_type(config)
    factors, kinds, base_copies, shared = _parse_keys(tensors, weights_file, config)
    if not factors:
        raise PeftFormatError(f"{weights_file}: the file holds no adapter weights.")

    leaves = _Leaves(tree)
    rank_pattern, alpha_pattern, rslora = {}, {}, False
    if peft_type in ("LORA", "LOHA", "LOKR"):
        default_r = config["r"]
        default_alpha = config["lora_alpha" if peft_type == "LORA" else "alpha"]
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora", False))
    biases = _bias_modules(tree) if peft_type == "IA3" else {}

    placed: dict[str, tuple[str, str]] = {}  # leaf path -> module
    found: list[dict] = []
    for module in sorted(factors):
        if not is_targeted(config, module):
            raise PeftFormatError(
                f"{weights_file}: it has weights for {module!r}, which the config's "
                f"target_modules={config.get('target_modules')!r} (with "
                f"layers_to_transform={config.get('layers_to_transform')!r}) does not "
                "select: the directory's two files do not belong together."
            )
        leaf_path, at = leaves.locate(module, key_map)
        if (leaf_path, at) in placed:
            where = leaf_path if at is None else f"entry {at} of {leaf_path!r}"
            raise PeftFormatError(
                f"load_peft_adapter: PEFT modules {placed[leaf_path, at]!r} and "
                f"{module!r} both map to {where}."
            )
        placed[leaf_path, at] = module
        leaf, is_linear = leaves.by_path[leaf_path]
        shape = tuple(leaf.shape)
        if at is not None:
            k = len(at)
            if len(shape) < k + 2 or not all(0 <= i < n for i, n in zip(at, shape)):
                raise PeftFormatError(
                    f"load_peft_adapter: PEFT module {module!r} is entry {at} of "
                    f"{leaf_path!r}, whose shape {shape} has no such entry: its "
                    f"first {k} axes are the stack (layers, or a fused kernel's "
                    "q/k/v entries), and at least two axes must remain for the "
                    "module's weight."
                )
            shape = shape[k:]
        parts = factors[module]
        vec = None  # (Adapter field, flat vector)
        conv_groups = None  # a convolution's (in_axes, out_axes)
        if peft_type == "LORA":
            a, b = parts["A"], parts["B"]
            r = a.shape[0]
            r_cfg = rank_pattern.get(pattern_key(rank_pattern, module), default_r)
            if r != r_cfg:
                raise PeftFormatError(
                    f"{weights_file}: module {module!r} has rank {r} in the file but "
                    f"{r_cfg} by the config (r={default_r}, rank_pattern="
                    f"{rank_pattern}): the directory's two files do not belong "
                    "together."
                )
            alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), default_alpha)
            if "m" in parts:
                vec = ("magnitudes", parts["m"])
            conv_groups = None
            if a.ndim > 2:
                a, b, conv_groups = _conv_module(module, a, b, shape, leaf_path)
        elif peft_type == "IA3":
            a, b, r, alpha, vec = _ia3_module(
                module, parts["l"], shape, config, weights_file
            )
            bias = biases.get(_module_parts(leaf_path)[0])
            if vec[0] == "out_scales" and bias is not None:
                raise PeftFormatError(
                    f"load_peft_adapter: IA3 scales the output of {module!r} "
                    "(not a feedforward module), and PEFT multiplies that output "
                    f"including its bias, but lorax_arrays scales only the "
                    f"matmul of {leaf_path!r} and the tree has a bias {bias!r} "
                    "next to it: serving it would be silently wrong. (IA3 on "
                    "feedforward modules, which scales the input, is fine.)"
                )
        elif peft_type in ("LOHA", "LOKR"):
            r_cfg = rank_pattern.get(pattern_key(rank_pattern, module), default_r)
            alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), default_alpha)
            a, b, r = _lycoris_module(
                module, parts, peft_type, r_cfg, alpha, shape, leaf_path, weights_file
            )
            alpha = float(r)  # the scale alpha / r is folded into b
        else:
            a, b, r = _vera_module(module, parts, shared, shape, weights_file)
            alpha = float(r)  # VeRA has no scale: alpha / r = 1
        found.append(
            dict(
                module=module,
                path=leaf_path,
                at=at,
                leaf_shape=tuple(leaf.shape),
                kind=kinds[module],
                a=a,
                b=b,
                rank=r,
                alpha=float(alpha),
                shape=shape,
                is_linear=is_linear,
                weight_name=_module_parts(leaf_path)[1],
                vec=vec,
                conv_groups=conv_groups,
            )
        )

    _check_base_copies(base_copies, leaves, key_map, weights_file)
    _orient(found, orientation)

    groups: dict[str, list[dict]] = {}
    for f in found:
        groups.setdefault(f["path"], []).append(f)
    order = [p for p, _, _ in leaves.entries if p in groups]
    weights, layouts, ranks, alphas, lookup = {}, [], [], [], []
    vectors: dict[str, dict] = {"magnitudes": {}, "in_scales": {}, "out_scales": {}}
    for p in order:
        fs = groups[p]
        in_ax, out_ax = fs[0]["groups"]
        if fs[0]["at"] is None:
            f = fs[0]
            a, b = _leaf_factors(f)
            rank, alpha = f["rank"], f["alpha"]
            layouts.append(LeafLayout(p, f["shape"], in_ax, out_ax, ()))
        else:
            if (
                any(f["at"] is None for f in fs)
                or len({len(f["at"]) for f in fs}) != 1
                or len({f["groups"] for f in fs}) != 1
            ):
                raise PeftFormatError(
                    f"load_peft_adapter: {p!r} gets both whole-leaf and per-entry "
                    "modules, entries over different numbers of stack axes "
                    f"({sorted({f['at'] for f in fs if f['at']})}), or entries of "
                    "different orientations."
                )
            a, b, rank, alpha = _stack_entries(fs, rslora)
            k = len(fs[0]["at"])
            shift = lambda axes: tuple(ax + k for ax in axes)  # noqa: E731, B023
            layouts.append(
                LeafLayout(
                    p,
                    fs[0]["leaf_shape"],
                    shift(in_ax),
                    shift(out_ax),
                    tuple(range(k)),
                )
            )
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        weights[p] = (jnp.asarray(a), jnp.asarray(b))
        for field, v in _leaf_vectors(fs, leaves.by_path[p][0]).items():
            vectors[field][p] = jnp.asarray(v if dtype is None else v.astype(dtype))
        ranks.append(rank)
        alphas.append(alpha)
        # PEFT's embedding LoRA changes the embedding module only; a head tied to
        # the same table (GPT-2) keeps the base table.
        lookup.append(fs[0]["kind"] == "embedding")
    adapter = Adapter(
        weights=weights,
        layouts=tuple(layouts),
        ranks=tuple(ranks),
        alphas=tuple(alphas),
        use_rslora=tuple(rslora for _ in order),
        lookup_only=tuple(lookup),
        **vectors,
    )
    adapter.check_finite(f"load_peft_adapter({str(path)!r})")
    return adapter


def _conv_module(module: str, a, b, shape, path: str):
    """A PEFT convolution LoRA (`lora_A (r, I, *k)`, `lora_B (O, r, 1, ...)`) as
    `A (r, in)`, `B (out, r)` flattened over the leaf's in-axes in increasing
    order, and those axes: a Flax kernel `(*k, I, O)` has in-axes `(*k, I)` and
    out-axis `O`, an Equinox / torch weight `(O, I, *k)` in-axes `(I, *k)` and
    out-axis `O` (by its shape; by the weight's name, `kernel` or `weight`,
    where both fit)."""
    r, n_in, kernel, n_out = a.shape[0], a.shape[1], a.shape[2:], b.shape[0]
    nd = len(shape)
    fits = {}
    if shape == (*kernel, n_in, n_out):  # Flax HWIO
        perm = (*range(2, 2 + len(kernel)), 1, 0)
        fits["kernel"] = (perm, (tuple(range(nd - 1)), (nd - 1,)))
    if shape == (n_out, n_in, *kernel):  # Equinox / torch OIHW
        perm = (*range(1, 2 + len(kernel)), 0)
        fits["weight"] = (perm, (tuple(range(1, nd)), (0,)))
    if not fits:
        raise PeftFormatError(
            f"load_peft_adapter: PEFT module {module!r} is a convolution with "
            f"in={n_in}, out={n_out} and kernel {kernel}, but its leaf {path!r} "
            f"has shape {shape}, neither a Flax kernel {(*kernel, n_in, n_out)} "
            f"nor an Equinox weight {(n_out, n_in, *kernel)}: the adapter was "
            "made for another model, or key_map points at the wrong leaf."
        )
    if len(fits) == 2:
        name = _module_parts(path)[1]
        if name not in fits:
            raise PeftFormatError(
                f"load_peft_adapter: the convolution {module!r} fits {path!r} "
                f"(shape {shape}) both as a Flax (*kernel, in, out) kernel and an "
                "Equinox (out, in, *kernel) weight, and its name does not say "
                "which ('kernel' or 'weight'); give key_map to a leaf so named."
            )
        fits = {name: fits[name]}
    perm, groups = next(iter(fits.values()))
    a = np.transpose(a, perm).reshape(-1, r).T
    return a, b.reshape(n_out, r), groups


def _bias_modules(tree: Any) -> dict[tuple[str, ...], str]:
    """The tree's bias leaves (`.../k_proj/bias`, NNX's `.../bias/value`) by the
    path components of their module."""
    out = {}
    for path, _ in flatten_with_paths(tree)[0]:
        parts = path.split("/")
        while len(parts) > 1 and parts[-1] in _VALUE_NAMES:
            parts = parts[:-1]
        if len(parts) > 1 and parts[-1] == "bias":
            out[tuple(parts[:-1])] = path
    return out


def _is_feedforward(config: Mapping[str, Any], key: str) -> bool | None:
    """PEFT's IA3 `_check_target_module_feedforward` (a regex full match, or a
    suffix of the name, without a dot); None when the config has none."""
    ff = config.get("feedforward_modules")
    if ff is None:
        return None
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


def _ia3_module(module: str, vec, shape, config, file: Path):
    """An IA3 module as a rank-0 LoRA (`A (0, in)`, `B (out, 0)`) and its vector:
    `ia3_l (out, 1)` scales the output (`out_scales`), `(1, in)` of a
    feedforward module the input (`in_scales`)."""
    ff = _is_feedforward(config, module)
    if ff is None:  # no feedforward_modules saved: the vector's shape says
        ff = vec.shape[0] == 1 and vec.shape[1] != 1
    n = vec.shape[1] if ff else vec.shape[0]
    want = (1, n) if ff else (n, 1)
    if tuple(vec.shape) != want:
        role = "is" if ff else "is not"
        raise PeftFormatError(
            f"{file}: module {module!r} {role} one of the config's "
            f"feedforward_modules={config.get('feedforward_modules')!r}, so its "
            f"ia3_l should be {'(1, in)' if ff else '(out, 1)'}, but it is "
            f"{tuple(vec.shape)}: the directory's two files do not belong together."
        )
    total = math.prod(shape)
    if total % n:
        raise PeftFormatError(
            f"load_peft_adapter: PEFT module {module!r} has an IA3 vector of "
            f"{n} {'in' if ff else 'out'}-features, which does not divide its "
            f"leaf's weight of shape {shape}: the adapter was made for another "
            "model, or key_map points at the wrong leaf."
        )
    n_in, n_out = (n, total // n) if ff else (total // n, n)
    a, b = np.zeros((0, n_in), vec.dtype), np.zeros((n_out, 0), vec.dtype)
    return a, b, 0, 0.0, ("in_scales" if ff else "out_scales", vec.reshape(-1))


def _vera_module(module: str, parts, shared, shape, file: Path):
    """A VeRA module as a plain LoRA with scale 1: PEFT computes
    `Δy = λ_b ⊙ ((λ_d ⊙ (x A[:, :in]ᵀ)) B[:out]ᵀ)`, which is
    `A' = diag(λ_d) A[:, :in]` `(r, in)` and `B' = diag(λ_b) B[:out]` `(out, r)`."""
    lb, ld = parts["b"], parts["d"]
    n_out, total = lb.shape[0], math.prod(shape)
    pa, pb = shared["A"], shared["B"]
    n_in = total // n_out
    if total % n_out or n_in > pa.shape[1] or n_out > pb.shape[0]:
        raise PeftFormatError(
            f"load_peft_adapter: VeRA module {module!r} has out={n_out} "
            f"(vera_lambda_b), and its leaf's weight has shape {shape}, which "
            f"does not fit that or the shared projections vera_A {pa.shape} and "
            f"vera_B {pb.shape}: the adapter was made for another model, or "
            "key_map points at the wrong leaf."
        )
    dt = np.result_type(pa, pb, lb, ld)
    a = (ld[:, None].astype(dt) * pa[:, :n_in].astype(dt)).astype(dt)
    b = (pb[:n_out].astype(dt) * lb[:, None].astype(dt)).astype(dt)
    return a, b, ld.shape[0]


def _full_factors(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An exact factorisation `w = u @ v` (float64) of least inner size: the
    identity on the smaller side when `w` has full rank (no rounding at all), else
    the thin SVD truncated at its numerical rank (float64)."""
    w = w.astype(np.float64)
    n, m = w.shape
    k = int(np.linalg.matrix_rank(w)) if min(n, m) else 0
    if k == min(n, m):
        return (np.eye(n), w) if n <= m else (w, np.eye(m))
    k = max(k, 1)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :k] * s[:k], vt[:k]


def _lycoris_module(module, parts, peft_type, r_cfg, alpha, shape, path, file):
    """A LoHa or LoKr module as an exact plain LoRA `A (R, in)`, `B (out, R)`
    with scale 1 (PEFT's `alpha / r` folded into `B`), computed in float64.

    - LoHa: `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`, and the Hadamard product
      of `U1 V1` and `U2 V2` is `U V` with `U[o, (p, q)] = U1[o, p] U2[o, q]` and
      `V[(p, q), i] = V1[p, i] V2[q, i]`: rank `R = r²`.
    - LoKr: `ΔW = kron(w1, w2) · alpha / r` (PEFT's scale, whether the factors
      are full or low-rank), `w1 = lokr_w1` or `lokr_w1_a lokr_w1_b`, likewise
      `w2`; `kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)`, a full factor
      factorised exactly (`_full_factors`): rank `R = r1 · r2`.

    Where `R` exceeds `min(out, in)`, the update itself is used (`A = ΔW`,
    `B = I` or `A = I`, `B = ΔW`), of rank `min(out, in)`."""
    what = _WHAT[peft_type]
    dt = np.result_type(*parts.values())
    f64 = {k: v.astype(np.float64) for k, v in parts.items()}
    if peft_type == "LOHA":
        u1, v1, u2, v2 = f64["w1_a"], f64["w1_b"], f64["w2_a"], f64["w2_b"]
        r_file = u1.shape[1]
        if r_file != r_cfg or u2.shape[1] != r_cfg:
            raise PeftFormatError(
                f"{file}: module {module!r} has LoHa rank {r_file} / {u2.shape[1]} "
                f"in the file but {r_cfg} by the config (r, rank_pattern): the "
                "directory's two files do not belong together."
            )
        u = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
        v = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
    else:
        uv = []
        for w in ("w1", "w2"):
            if w in f64:
                uv.append(_full_factors(f64[w]))
                continue
            lo_a, lo_b = f64[f"{w}_a"], f64[f"{w}_b"]
            if lo_a.shape[1] != r_cfg:
                raise PeftFormatError(
                    f"{file}: module {module!r} has lokr_{w}_a of rank "
                    f"{lo_a.shape[1]} in the file but r={r_cfg} by the config (r, "
                    "rank_pattern): the directory's two files do not belong together."
                )
            uv.append((lo_a, lo_b))
        (u1, v1), (u2, v2) = uv
        u, v = np.kron(u1, u2), np.kron(v1, v2)
    n_out, n_in = u.shape[0], v.shape[1]
    if len(shape) != 2 or shape not in ((n_in, n_out), (n_out, n_in)):
        raise PeftFormatError(
            f"load_peft_adapter: {what} module {module!r} has a weight of "
            f"(out, in) = ({n_out}, {n_in}), and its leaf {path!r} has shape "
            f"{shape}: lorax_arrays serves {what} on 2-D linear weights (of a "
            "leaf, or of an entry of a layer stack or fused kernel) only, not on "
            "convolutions or multi-axis kernels. Either the adapter was made for "
            "another model, or key_map points at the wrong leaf."
        )
    u = u * (float(alpha) / float(r_cfg))
    if u.shape[1] > min(n_out, n_in):
        delta = u @ v
        u, v = (np.eye(n_out), delta) if n_out <= n_in else (delta, np.eye(n_in))
    return v.astype(dt), u.astype(dt), u.shape[1]


def _leaf_vectors(fs: list[dict], leaf) -> dict[str, np.ndarray]:
    """The variants' vectors of one leaf's modules on its axes: `(*out)`
    (`(*in)` for `in_scales`) in the leaf's group orders, `(*stack, ...)` for
    per-entry modules. Entries without a vector get the identity: 1 for IA3,
    the base weight's norm for a DoRA magnitude."""
    out = {}
    shape, (ins, outs) = fs[0]["shape"], fs[0]["groups"]
    at0 = fs[0]["at"]
    for field in sorted({f["vec"][0] for f in fs if f["vec"] is not None}):
        axes = ins if field == "in_scales" else outs
        part = tuple(shape[ax] for ax in axes)
        mine = [f for f in fs if f["vec"] is not None and f["vec"][0] == field]
        dt = np.result_type(*[f["vec"][1].dtype for f in mine])
        if at0 is None:
            out[field] = mine[0]["vec"][1].reshape(part).astype(dt)
            continue
        k = len(at0)
        stack = fs[0]["leaf_shape"][:k]
        if field == "magnitudes" and len(mine) < math.prod(stack):
            w = np.asarray(dense(leaf), np.float32)  # a quantised leaf too
            v = np.sqrt(np.sum(np.square(w), axis=tuple(ax + k for ax in ins)))
            v = v.astype(dt)
        else:
            v = np.ones((*stack, *part), dt)
        for f in mine:
            v[f["at"]] = f["vec"][1].reshape(part)
        out[field] = v
    return out


def _leaf_factors(f: dict) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's `A (r, in)`, `B (out, r)` on the module weight's axes: `a (*in, r)`,
    `b (r, *out)`, the flat `in`/`out` unflattened row-major over the in- and
    out-axes in increasing order (as `w.reshape` makes a multi-axis kernel from a
    torch `(out, in)` weight's transpose)."""
    shape, (ins, outs) = f["shape"], f["groups"]
    a = f["a"].T.reshape(*(shape[ax] for ax in ins), f["rank"])
    b = f["b"].T.reshape(f["rank"], *(shape[ax] for ax in outs))
    return a, b


def _stack_entries(fs: list[dict], rslora: bool):
    """The per-entry modules of one stacked or fused leaf as `a (*stack, *in, r)`,
    `b (*stack, r, *out)`, `stack` the leaf's first `len(entry)` axes.

    Ranks are zero-padded to the largest, entries the adapter lacks are zero, and
    one scale serves the leaf: that of most entries; an entry with another scale
    (another rank or alpha by `rank_pattern` / `alpha_pattern`) has the ratio
    folded into its `B`, which keeps its product `s_e · A_e B_e` (to float
    rounding)."""
    k = len(fs[0]["at"])
    stack = fs[0]["leaf_shape"][:k]
    shape, (ins, outs) = fs[0]["shape"], fs[0]["groups"]
    r_max = max(f["rank"] for f in fs)
    # An IA3 entry (rank 0) has no scale.
    scales = [
        lora_scale(f["alpha"], f["rank"], rslora) if f["rank"] else None for f in fs
    ]
    live = [sc for sc in scales if sc is not None]
    s_leaf = _most_common(live) if live else 0.0
    dtype = np.result_type(*[f["a"].dtype for f in fs], *[f["b"].dtype for f in fs])
    a = np.zeros((*stack, *(shape[ax] for ax in ins), r_max), dtype)
    b = np.zeros((*stack, r_max, *(shape[ax] for ax in outs)), dtype)
    for f, s in zip(fs, scales):
        r, at = f["rank"], f["at"]
        a_e, b_e = _leaf_factors(f)
        if s is not None and s != s_leaf:
            b_e = (b_e.astype(np.float64) * (s / s_leaf)).astype(dtype)
        a[(*at, Ellipsis, slice(0, r))] = a_e
        b[(*at, slice(0, r))] = b_e
    # The alpha that gives the leaf's scale at rank r_max (`lora_scale` inverted).
    return a, b, r_max, s_leaf * (math.sqrt(r_max) if rslora else r_max)


def _check_base_copies(base_copies, leaves: _Leaves, key_map, file: Path) -> None:
    for module, value in base_copies.items():
        try:
            p, at = leaves.locate(module, key_map)
        except PeftFormatError as e:
            raise PeftFormatError(
                f"{file}: the adapter ships the whole weight of {module!r} (PEFT "
                "saves embedding layers when they are targeted or the vocabulary was "
                "resized), and it has no leaf in the tree to check it against. "
                f"Point `key_map` at the leaf. ({e})"
            ) from None
        leaf = np.asarray(leaves.by_path[p][0])
        leaf = leaf if at is None else leaf[at]
        # torch keeps a Linear's weight as (out, in) (an untied lm_head ships
        # (vocab, hidden)), Flax a kernel as (in, out): the copy equals the leaf
        # in the leaf's own layout or in torch's. Only compared, never used.
        views = [value] + ([value.T] if value.ndim == 2 else [])
        same = any(
            leaf.shape == v.shape
            and np.array_equal(leaf.astype(np.float32), v.astype(np.float32))
            for v in views
        )
        if not same:
            raise PeftFormatError(
                f"{file}: the adapter ships its own copy of the weight of {module!r} "
                f"(shape {value.shape}), and it differs from the tree's {p!r} (shape "
                f"{leaf.shape}): it was trained with a changed (resized?) embedding, "
                "which lorax_arrays cannot apply as a low-rank update. Load that "
                "weight into the model first."
            )


# ----------------------------------------------------------------------------
# Writing.


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


def _flat_factors(lay, a, b) -> tuple[np.ndarray, np.ndarray]:
    """One module's `a (*in, r)`, `b (r, *out)` (in the leaf's group orders) as
    PEFT's `A (r, in)`, `B (out, r)`, flattened row-major over the in- and
    out-axes in increasing order (what `load_peft_adapter` reads)."""
    ins, outs = lay.in_axes, lay.out_axes
    a = np.transpose(a, [*np.argsort(ins), len(ins)])
    b = np.transpose(b, [0, *(1 + np.argsort(outs))])
    return a.reshape(-1, a.shape[-1]).T, b.reshape(b.shape[0], -1).T


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def save_peft_adapter(
    path: str | os.PathLike,
    adapter: Adapter,
    *,
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
    base_model_name_or_path: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Writes `adapter` as a PEFT LoRA directory that `PeftModel.from_pretrained`
    loads onto the torch model.

    Leaves of different ranks, alphas or rsLoRA flags go through `rank_pattern` /
    `alpha_pattern` (escaped full module names), so PEFT computes the same
    `alpha / r` (or `alpha / sqrt(r)`) scale for every module.
    `target_modules` lists the full module names. A leaf is written as an
    embedding (`lora_embedding_A/B`) when its weight is named `embedding` (Flax
    `Embed`) or its module is one of transformers' `nn.Embedding` names
    (`embed_tokens`, `wte`, `word_embeddings`, ...).

    **Arguments:**

    - `path`: the directory to write (created if needed; the two files in it are
        replaced atomically).
    - `adapter`: one [`lorax_arrays.Adapter`][] (take one out of a stack with
        `stack[i]`). A leaf with stack axes (leading ones: a layer stack, a
        fused kernel such as Gemma's `(3, N, D, H)` QKV, or both) becomes one
        module per entry, `model.layers.{i}.self_attn.q_proj`, and entries whose
        factors are all zero are left out. Multi-axis in- and out-groups are
        flattened row-major in increasing axis order (the order
        `load_peft_adapter` reads back).
    - `key_map`: the module names: a dict from PEFT module name to tree path, or
        to `(path, entry)` for an entry of a leaf's stack axes (the same dict
        [`lorax_arrays.load_peft_adapter`][] takes), or a function from tree
        path to module name (for a layer stack, a name with `{i}` where the
        layer number goes; for a fused kernel, a list of names, one per entry
        of its last stack axis, each with `{i}` if a layer axis comes first).
        By default the tree path without its weight's name and a leading
        `params`, joined with '.' (`transformer/h/0/attn/c_attn/kernel` ->
        `transformer.h.0.attn.c_attn`).
    - `base_model_name_or_path`: recorded in `adapter_config.json` (PEFT and the
        Hub use it to find the base model).
    - `config`: extra `adapter_config.json` entries (`{"task_type": "CAUSAL_LM"}`).

    **Returns:**

    Nothing; writes `adapter_config.json` and `adapter_model.safetensors`.
    """
    if isinstance(adapter, AdapterStack):
        raise TypeError(
            "save_peft_adapter: a PEFT directory holds one adapter; save "
            "`stack[i]` (or `stack['name']`) for each."
        )
    if not isinstance(adapter, Adapter):
        raise TypeError(
            f"save_peft_adapter: expected an Adapter, got {type(adapter).__name__}."
        )
    for field, what in (
        ("magnitudes", "DoRA magnitudes"),
        ("in_scales", "IA3 input scales"),
        ("out_scales", "IA3 output scales"),
    ):
        if getattr(adapter, field):
            raise ValueError(
                f"save_peft_adapter: the adapter has {what} (at "
                f"{sorted(getattr(adapter, field))}); writing DoRA and IA3 adapters "
                "in PEFT's format is not supported yet, and writing the LoRA "
                "factors alone would be a different adapter."
            )
    namer = _namer(key_map)
    modules, tensors = [], {}
    for lay, r, alpha, rs in zip(
        adapter.layouts, adapter.ranks, adapter.alphas, adapter.use_rslora
    ):
        ns = len(lay.stack_axes)
        if lay.stack_axes != tuple(range(ns)):
            raise ValueError(
                f"save_peft_adapter: {lay.path!r} has stack_axes={lay.stack_axes} "
                f"(shape {lay.shape}); PEFT modules are read back from the leading "
                "axes of a leaf (layers, a fused kernel's entries), so the stack "
                "axes must come first, in order: transpose the leaf."
            )
        # A VeRA leaf is written as the LoRA it is served as.
        a, b = (np.asarray(x) for x in adapter.lora_factors(lay.path))
        name_of = _entry_namer(lay, key_map, namer)
        per_layer = [
            (name_of(e), *_flat_factors(lay, a[e], b[e]))
            for e in np.ndindex(*lay.stack_shape)
            # an entry (layer) the adapter leaves alone
            if not ns or (np.any(a[e]) and np.any(b[e]))
        ]
        weight_name = _module_parts(lay.path)[1]
        for name, a_l, b_l in per_layer:
            if name in {m[0] for m in modules}:
                raise ValueError(
                    f"save_peft_adapter: two leaves map to PEFT module {name!r} (or "
                    "two entries of one leaf's stack axes); give key_map."
                )
            embedding = weight_name == "embedding" or name.split(".")[-1] in (
                _EMBEDDING_MODULES
            )
            key = _PREFIX + name
            if embedding:
                tensors[f"{key}.lora_embedding_A"] = a_l
                tensors[f"{key}.lora_embedding_B"] = b_l
            else:
                tensors[f"{key}.lora_A.weight"] = a_l
                tensors[f"{key}.lora_B.weight"] = b_l
            modules.append((name, r, float(alpha), bool(rs)))
    if not modules:
        raise ValueError("save_peft_adapter: the adapter has no leaves.")

    use_rslora = _most_common([m[3] for m in modules])
    # Express each module's scale with the common rsLoRA flag: alpha' / r (or
    # alpha' / sqrt(r)) equal to its own scale.
    effective = []
    for name, r, alpha, rs in modules:
        if rs != use_rslora:
            alpha = alpha * math.sqrt(r) if rs else alpha / math.sqrt(r)
        effective.append((name, r, alpha))
    r0 = _most_common([m[1] for m in effective])
    alpha0 = _most_common([m[2] for m in effective if m[1] == r0])
    rank_pattern = {re.escape(n): r for n, r, _ in effective if r != r0}
    alpha_pattern = {re.escape(n): a for n, _, a in effective if a != alpha0}
    out = {
        "peft_type": "LORA",
        "r": int(r0),
        "lora_alpha": _as_json_number(alpha0),
        "rank_pattern": {k: int(v) for k, v in rank_pattern.items()},
        "alpha_pattern": {k: _as_json_number(v) for k, v in alpha_pattern.items()},
        "use_rslora": use_rslora,
        "target_modules": sorted(m[0] for m in modules),
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
        "revision": None,
    }
    out.update(dict(config or {}))
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
    text = json.dumps(out, indent=2, sort_keys=True) + "\n"
    write_atomically(directory / CONFIG_NAME, [text.encode("utf-8")])


def _as_json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
