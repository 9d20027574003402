"""`save_peft_adapter`: an `Adapter` as a PEFT directory."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._adapters import Adapter, AdapterStack
from .._safetensors import write_atomically, write_safetensors
from ._config import _PREFIX, CONFIG_NAME, WEIGHTS_NAME
from ._convert import _most_common
from ._names import _EMBEDDING_MODULES, _entry_namer, _module_parts, _namer


def _flat_factors(lay, a, b) -> tuple[np.ndarray, np.ndarray]:
    """One module's `a (*in, r)`, `b (r, *out)` (in the leaf's group orders) as
    PEFT's `A (r, in)`, `B (out, r)`, flattened row-major over the in- and
    out-axes in increasing order (what `load_peft_adapter` reads)."""
    ins, outs = lay.in_axes, lay.out_axes
    a = np.transpose(a, [*np.argsort(ins), len(ins)])
    b = np.transpose(b, [0, *(1 + np.argsort(outs))])
    return a.reshape(-1, a.shape[-1]).T, b.reshape(b.shape[0], -1).T


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
