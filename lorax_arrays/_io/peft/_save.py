"""`save_peft_adapter`: an `Adapter` as a PEFT directory (LoRA, DoRA, IA3)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..._adapters.adapter import Adapter
from ..._adapters.kinds import KINDS
from ..._adapters.stack import AdapterStack
from ..._core.paths import flatten_with_paths, unwrapped_parts
from ..safetensors import write_atomically, write_safetensors
from ._config import _PREFIX, CONFIG_NAME, WEIGHTS_NAME
from ._convert import _most_common
from ._names import (
    _EMBEDDING_MODULES,
    _entry_namer,
    _module_name,
    _module_parts,
    _namer,
)

# The PEFT method each kind of leaf is written as; one directory holds one.
# PEFT's name for what `Adapter.kind` reports at a leaf.
_METHOD = {k: KINDS[k].peft_type for k in ("lora", "vera", "dora", "ia3")}


def _flat_factors(lay, a, b) -> tuple[np.ndarray, np.ndarray]:
    """One module's `a (*in, r)`, `b (r, *out)` (in the leaf's group orders) as
    PEFT's `A (r, in)`, `B (out, r)`, flattened row-major over the in- and
    out-axes in increasing order (what `load_peft_adapter` reads)."""
    ins, outs = lay.in_axes, lay.out_axes
    a = np.transpose(a, [*np.argsort(ins), len(ins)])
    b = np.transpose(b, [0, *(1 + np.argsort(outs))])
    return a.reshape(-1, a.shape[-1]).T, b.reshape(b.shape[0], -1).T


def _flat_vector(axes, v) -> np.ndarray:
    """A vector over a module's in- or out-axes (in the leaf's group order),
    flattened as `_flat_factors` flattens that side."""
    return np.transpose(v, np.argsort(axes)).reshape(-1)


def _conv_kind(lay) -> str | None:
    """`'flax'` when a module weight of `lay` (after its stack axes) is laid out as
    a Flax conv kernel `(*k, I, O)` (in-axes all but the last), `'torch'` as an
    Equinox / torch weight `(O, I, *k)` (out-axis the first), for 1-D to 3-D
    kernels; else None. These are the two layouts `load_peft_adapter` reads a
    PEFT conv LoRA onto."""
    ns = len(lay.stack_axes)
    nd = len(lay.shape) - ns
    if not 3 <= nd <= 5:
        return None
    ins = tuple(sorted(ax - ns for ax in lay.in_axes))
    outs = tuple(sorted(ax - ns for ax in lay.out_axes))
    if ins == tuple(range(nd - 1)) and outs == (nd - 1,):
        return "flax"
    if outs == (0,) and ins == tuple(range(1, nd)):
        return "torch"
    return None


def _names_a_conv(lay, kind: str | None) -> bool:
    """The default answer to "is this leaf a convolution": a conv layout of 2-D and
    3-D kernels always; a 3-axis one only when the leaf is an Equinox-style
    `weight` `(O, I, k)` or its path names a convolution (Whisper's `conv1`, Flax's
    `Conv_0`), since a Flax `(k, I, O)` kernel is laid out exactly as a
    `DenseGeneral` kernel `(N, H, D)` contracting two axes (linen attention's
    `out`), which PEFT's torch model holds as a `Linear`."""
    if kind is None:
        return False
    if len(lay.shape) - len(lay.stack_axes) > 3:
        return True
    parts, weight_name = _module_parts(lay.path)
    if kind == "torch" and weight_name == "weight":
        return True
    return any("conv" in part.lower() for part in parts)


def _conv_selector(conv) -> Callable[[Any, str | None], bool]:
    """`conv` (None, a regex over tree paths, or a collection of paths) as a
    function of a leaf's layout and conv kind: whether to write it as PEFT's conv
    LoRA. A leaf `conv` names must have a conv layout."""
    if conv is None:
        return _names_a_conv
    if isinstance(conv, str):
        pattern = re.compile(conv)
        named = lambda path: pattern.search(path) is not None  # noqa: E731
    elif isinstance(conv, Collection):
        paths = {str(p).strip("/") for p in conv}
        named = lambda path: (  # noqa: E731
            path in paths or "/".join(_module_parts(path)[0]) in paths
        )
    else:
        raise TypeError(
            "save_peft_adapter: conv must be a regex over tree paths or a "
            f"collection of paths; got {type(conv).__name__}."
        )

    def select(lay, kind):
        if not named(lay.path):
            return False
        if kind is None:
            raise ValueError(
                f"save_peft_adapter: conv= names {lay.path!r}, whose layout "
                f"(shape {lay.shape}, in_axes={lay.in_axes}, out_axes="
                f"{lay.out_axes}, stack_axes={lay.stack_axes}) is not a "
                "convolution kernel's: a Flax (*k, I, O) kernel has the last "
                "axis out and the others in, an Equinox (O, I, *k) weight the "
                "first out, with 1 to 3 spatial axes (after any stack axes)."
            )
        return True

    return select


def _conv_factors(kind: str, shape, a_l, b_l) -> tuple[np.ndarray, np.ndarray]:
    """A conv module's flat `A (r, in)`, `B (out, r)` (in flattened over the
    kernel's in-axes in increasing order) as PEFT's `lora_A.weight (r, I, *k)`
    and `lora_B.weight (O, r, 1, ...)`; `shape` is the module's kernel."""
    r, nk = a_l.shape[0], len(shape) - 2
    if kind == "flax":  # (*k, I, O): in is (*k, I)
        a = a_l.reshape(r, *shape[:-1])
        a = np.transpose(a, (0, nk + 1, *range(1, nk + 1)))
    else:  # (O, I, *k): in is (I, *k)
        a = a_l.reshape(r, *shape[1:])
    return a, b_l.reshape(b_l.shape[0], r, *(1,) * nk)


def _method(adapter: Adapter) -> str:
    """The PEFT method (`"LoRA"`, `"DoRA"` or `"IA3"`) the adapter is written as;
    refuses leaves and mixes of leaves that no one PEFT config expresses."""
    leaves: dict[str, list[str]] = {}
    head_only = getattr(adapter, "head_only", ()) or ()
    for j, lay in enumerate(adapter.layouts):
        p, r = lay.path, adapter.ranks[j]
        kind = adapter.kind(p)
        if j < len(head_only) and head_only[j]:
            raise ValueError(
                f"save_peft_adapter: {p!r} holds the update of a head tied to it "
                "(head_only), which PEFT keeps on the head module (lm_head), not "
                "on the table; writing it is not supported yet. Save an adapter "
                "without that leaf."
            )
        if kind == "lora+ia3":
            field = "in_scales" if p in adapter.in_scales else "out_scales"
            raise ValueError(
                f"save_peft_adapter: {p!r} has both LoRA factors (rank {r}) and "
                f"an IA3 vector ({field}); PEFT's IA3 modules have no LoRA factors "
                "and its LoRA modules no IA3 vectors, so no PEFT adapter computes "
                "that leaf (PEFT's mixed-adapter models do not take IA3 either). "
                "Save an adapter without it."
            )
        if kind == "ia3" and p in adapter.in_scales and p in adapter.out_scales:
            raise ValueError(
                f"save_peft_adapter: {p!r} has IA3 vectors on both its input "
                "(in_scales) and its output (out_scales); a PEFT IA3 module scales "
                "one side only (the input of a feedforward_modules module, else "
                "the output), so no PEFT adapter computes that leaf. Save an "
                "adapter without it."
            )
        if kind == "lora" and r == 0:
            continue  # an empty leaf: the identity, nothing to write
        leaves.setdefault(_METHOD[kind], []).append(p)
    if len(leaves) > 1:
        listed = "; ".join(
            f"{m} leaves {sorted(ps)}" for m, ps in sorted(leaves.items())
        )
        if set(leaves) == {"LoRA", "DoRA"}:
            why = (
                "PEFT's use_dora is one flag of the whole LoraConfig (there is no "
                "per-module DoRA, and no rank_pattern-like dora pattern)"
            )
            fix = (
                " (PEFT loads both onto one model, and with both active their "
                "disjoint modules compute this adapter)"
            )
        else:
            why = (
                "a PEFT directory holds one method (peft_type), IA3 modules have "
                "no LoRA factors, and PEFT's mixed-adapter models do not take IA3"
            )
            fix = ""
        raise ValueError(
            f"save_peft_adapter: the adapter mixes {listed} (VeRA leaves are written "
            f"as plain LoRA); {why}, so no single PEFT adapter expresses it. Split "
            f"it into one adapter per method and save each{fix}."
        )
    return next(iter(leaves), "LoRA")


def save_peft_adapter(
    path: str | os.PathLike,
    adapter: Adapter,
    *,
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
    base_model_name_or_path: str | None = None,
    config: Mapping[str, Any] | None = None,
    conv: str | Collection[str] | None = None,
    tree: Any = None,
    untied_embeddings: bool = False,
) -> None:
    """Writes `adapter` as a PEFT directory that `PeftModel.from_pretrained` loads
    onto the torch model, meaning there what it means here (the exact inverse of
    [`lorax_arrays.load_peft_adapter`][]).

    What each kind of leaf becomes, one PEFT method per directory:

    - LoRA (and VeRA, LoHa, LoKr leaves: the plain LoRA they are served as):
      `peft_type: "LORA"`, `lora_A.weight (r, in)` and `lora_B.weight (out, r)`
      per module; on an embedding `lora_embedding_A (r, vocab)` and
      `lora_embedding_B (dim, r)`; on a convolution `lora_A.weight (r, I, *k)`
      and `lora_B.weight (O, r, 1, ...)`.
    - DoRA: the same with `use_dora: true`, and `lora_magnitude_vector (out,)`.
    - IA3: `peft_type: "IA3"`, `ia3_l (out, 1)` for a vector on the output
      (`out_scales`), `ia3_l (1, in)` for one on the input (`in_scales`), whose
      modules `feedforward_modules` lists.

    How they are written, and what is refused:

    - **Scales.** Leaves of different ranks, alphas or rsLoRA flags go through
      `rank_pattern` / `alpha_pattern` (escaped full module names), so PEFT
      computes the same `alpha / r` (or `alpha / sqrt(r)`) scale for every
      module. `target_modules` (and IA3's `feedforward_modules`) list the full
      module names.
    - **Orientation.** `fan_in_fan_out` is set when a 2-D `kernel` leaf is laid
      out `(out, in)` (`in_axes=1`: the Flax GPT-2 port's `Conv1D` kernels), as
      PEFT sets it for GPT-2's `Conv1D`: it tells `load_peft_adapter` not to read
      `kernel` leaves as Flax's `(in, out)`, and PEFT's forward ignores it.
    - **Embeddings.** A leaf whose weight is named `embedding` (Flax `Embed`) or
      whose module is one of transformers' `nn.Embedding` names (`embed_tokens`,
      `wte`, `word_embeddings`, ...) is written as PEFT's embedding LoRA.
    - **Convolutions.** A leaf laid out as a conv kernel, Flax `(*k, I, O)`
      (in-axes all but the last) or Equinox / torch `(O, I, *k)` (out-axis the
      first), with 1 to 3 spatial axes, is written as PEFT's conv LoRA (for
      `nn.Conv1d` / `Conv2d` / `Conv3d`): `A` as `(r, I, *k)` in torch's axis
      order, `B` as a 1x1 conv `(O, r, 1, ...)`. A 3-axis Flax `(k, I, O)` kernel
      is laid out exactly as a `DenseGeneral` kernel `(N, H, D)` contracting two
      axes (a `Linear` in torch), so it counts as a convolution only when its
      path names one (`conv1`, `Conv_0`, ...); an `(O, I, k)` leaf named
      `weight` (Equinox's `Conv1d`) always does. `conv` overrides the guess.
    - **Multi-axis weights.** Other multi-axis in- and out-groups are flattened
      row-major in increasing axis order (the order `load_peft_adapter` reads
      back), as are DoRA magnitudes and IA3 vectors.
    - **Refused**, with an error naming the leaves: DoRA leaves mixed with plain
      LoRA ones (`use_dora` is one flag for the whole PEFT config), IA3 leaves
      mixed with LoRA or DoRA ones, a leaf with both LoRA factors and an IA3
      vector or with IA3 vectors on both sides, DoRA or IA3 on an embedding or a
      convolution (not served here), and stack axes that are not leading.
    - PEFT's IA3 scales an output-scaled module's bias too, and lorax_arrays only
      its matmul: export `out_scales` for torch modules without a bias (Llama's
      `k_proj` / `v_proj`), as `load_peft_adapter` refuses them next to one.

    **Arguments:**

    - `path`: the directory to write (created if needed; the two files in it are
        replaced atomically).
    - `adapter`: one [`lorax_arrays.Adapter`][] (take one out of a stack with
        `stack[i]`). A leaf with stack axes (leading ones: a layer stack, a
        fused kernel such as Gemma's `(3, N, D, H)` QKV, or both) becomes one
        module per entry, `model.layers.{i}.self_attn.q_proj`. Entries the
        adapter leaves alone are left out: zero LoRA factors, IA3 vectors of
        ones; a DoRA entry with zero factors still scales its output, so it is
        written whenever it has a module name (with a dict `key_map` that names
        no such entry, reading back gives it the base weight's norm).
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
    - `conv`: which leaves are convolutions, instead of the guess above: a regex
        searched in each tree path, or a collection of leaf (or module) paths;
        every leaf it names must have a conv layout, and no other leaf is
        written as one (`conv=()` for none).
    - `tree`: the model's parameters, needed (and only read) when the adapter
        updates biases (`bias_deltas`: modules trained in full, PEFT's
        `modules_to_save`): each such module is written whole, as PEFT saves
        it, `<module>.weight` = the tree's weight plus the adapter's update
        there (torch's `(out, in)`) and `<module>.bias` = the tree's bias plus
        its update, and listed in `modules_to_save`.
    - `untied_embeddings`: say that no output head reads the adapter's embedding
        tables (an untied model: Llama, Mistral). PEFT's embedding LoRA changes
        lookups only, so an update that applies to every read of a table (made
        with `lx.init_adapter`, or PEFT's trainable tokens) is only written as
        one when this is set; on a model whose head is tied to the table
        (GPT-2, GPT-Neo) PEFT would serve the head without it.

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
    method = _method(adapter)
    is_conv = _conv_selector(conv)
    namer = _namer(key_map)
    # name -> (rank, alpha, rsLoRA) for LoRA / DoRA, whether feedforward for IA3
    modules: dict[str, Any] = {}
    tensors = {}
    whole, saved_names = saved_modules(adapter, tree, namer, tensors)
    # PEFT's mark of GPT-2's `Conv1D`, whose Flax port keeps `(out, in)` kernels:
    # set when a 2-D `kernel` leaf is laid out that way (PEFT's torch Linear
    # ignores it; load_peft_adapter reads `kernel` leaves as Flax's `(in, out)`
    # without it).
    fan_in_fan_out = False
    for lay, r, alpha, rs in zip(
        adapter.layouts, adapter.ranks, adapter.alphas, adapter.use_rslora
    ):
        kind = adapter.kind(lay.path)
        if (kind == "lora" and r == 0) or lay.path in whole:
            continue
        ns = len(lay.stack_axes)
        if lay.stack_axes != tuple(range(ns)):
            raise ValueError(
                f"save_peft_adapter: {lay.path!r} has stack_axes={lay.stack_axes} "
                f"(shape {lay.shape}); PEFT modules are read back from the leading "
                "axes of a leaf (layers, a fused kernel's entries), so the stack "
                "axes must come first, in order: transpose the leaf."
            )
        weight_shape = lay.shape[ns:]
        conv_kind = _conv_kind(lay)
        as_conv = is_conv(lay, conv_kind)
        if as_conv and kind != "lora" and kind != "vera":
            raise ValueError(
                f"save_peft_adapter: {lay.path!r} is a convolution with "
                f"{'DoRA' if kind == 'dora' else 'IA3'}; lorax_arrays serves conv "
                "LoRA as plain LoRA only (and load_peft_adapter refuses conv DoRA "
                "and IA3), so it is not written either. If the leaf is not a "
                "convolution, say so with conv=() (or a conv= that leaves it out)."
            )
        weight_name = _module_parts(lay.path)[1]
        name_of = _entry_namer(lay, key_map, namer)
        # A VeRA leaf is written as the LoRA it is served as.
        a, b = (np.asarray(x) for x in adapter.lora_factors(lay.path))
        field = next(
            (
                f
                for f in ("magnitudes", "in_scales", "out_scales")
                if lay.path in getattr(adapter, f)
            ),
            None,
        )
        vec = None if field is None else np.asarray(getattr(adapter, field)[lay.path])
        side = (
            tuple(ax - ns for ax in lay.in_axes)
            if field == "in_scales"
            else tuple(ax - ns for ax in lay.out_axes)
        )
        for e in np.ndindex(*lay.stack_shape):
            if method == "IA3":
                live = not ns or bool(np.any(vec[e] != 1))
            else:
                live = not ns or (np.any(a[e]) and np.any(b[e]))
            # A DoRA entry with zero factors still scales its output by its
            # magnitude: written when it has a module name.
            if not live and method != "DoRA":
                continue
            try:
                name = name_of(e)
            except ValueError:
                if live:
                    raise
                continue
            if name in modules:
                raise ValueError(
                    f"save_peft_adapter: two leaves map to PEFT module {name!r} (or "
                    "two entries of one leaf's stack axes); give key_map."
                )
            embedding = not as_conv and (
                weight_name == "embedding" or name.split(".")[-1] in _EMBEDDING_MODULES
            )
            if embedding and method != "LoRA":
                raise ValueError(
                    f"save_peft_adapter: {lay.path!r} (PEFT module {name!r}) is an "
                    f"embedding with {method}; lorax_arrays serves {method} on "
                    "linear layers only (PEFT's DoRA normalises an embedding per "
                    "embedding dimension, and its IA3 has no embedding layer), "
                    "and load_peft_adapter refuses it. Save an adapter without "
                    "that leaf."
                )
            j = adapter.paths.index(lay.path)
            if embedding and not adapter.lookup_only[j] and not untied_embeddings:
                raise ValueError(
                    f"save_peft_adapter: {lay.path!r} (PEFT module {name!r}) is "
                    "written as PEFT's embedding LoRA, which changes lookups only, "
                    "but this adapter's update there applies to every read of the "
                    "table (an adapter made with lx.init_adapter, or trainable "
                    "tokens): on a model whose output head is tied to this table "
                    "(GPT-2, GPT-Neo) PEFT would serve the head without it. If no "
                    "head reads the table (an untied model: Llama, Mistral), pass "
                    "`untied_embeddings=True`."
                )
            if (
                weight_name == "kernel"
                and not embedding
                and len(weight_shape) == 2
                and tuple(ax - ns for ax in lay.in_axes) == (1,)
            ):
                fan_in_fan_out = True
            key = _PREFIX + name
            if method == "IA3":
                v = _flat_vector(side, vec[e])
                ff = field == "in_scales"
                tensors[f"{key}.ia3_l"] = v[None, :] if ff else v[:, None]
                modules[name] = ff
                continue
            a_l, b_l = _flat_factors(lay, a[e], b[e])
            if as_conv:
                a_l, b_l = _conv_factors(conv_kind, weight_shape, a_l, b_l)
            if embedding:
                tensors[f"{key}.lora_embedding_A"] = a_l
                tensors[f"{key}.lora_embedding_B"] = b_l
            else:
                tensors[f"{key}.lora_A.weight"] = a_l
                tensors[f"{key}.lora_B.weight"] = b_l
            if method == "DoRA":
                tensors[f"{key}.lora_magnitude_vector"] = _flat_vector(side, vec[e])
            modules[name] = (r, float(alpha), bool(rs))
    if not modules and not saved_names:
        raise ValueError(
            "save_peft_adapter: nothing to write: the adapter has no leaves, or "
            "only rank-0 leaves without vectors and stack entries it leaves alone."
        )
    if method == "IA3":
        out = _ia3_config(modules)
    else:
        out = _lora_config(modules, dora=method == "DoRA")
    out["fan_in_fan_out"] = fan_in_fan_out
    if saved_names:
        if method != "LoRA":
            raise ValueError(
                f"save_peft_adapter: modules trained in full (bias updates at "
                f"{sorted(adapter.bias_deltas)}) next to {method} leaves; write "
                "them with LoRA adapters only."
            )
        out["modules_to_save"] = saved_names
    out["base_model_name_or_path"] = base_model_name_or_path
    tokens = getattr(adapter, "invocation_tokens", None)
    if tokens is not None:
        if method != "LoRA":
            raise ValueError(
                f"save_peft_adapter: an activated LoRA (invocation_tokens) with "
                f"{method} leaves: PEFT defines aLoRA for plain LoRA only."
            )
        # PEFT applies aLoRA to causal language models only (`task_type`).
        out["alora_invocation_tokens"] = list(tokens)
        out["task_type"] = "CAUSAL_LM"
    out.update(dict(config or {}))
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
    text = json.dumps(out, indent=2, sort_keys=True) + "\n"
    write_atomically(directory / CONFIG_NAME, [text.encode("utf-8")])


def _lora_config(modules: dict[str, tuple[int, float, bool]], dora: bool) -> dict:
    """A `LoraConfig` that gives every module its own rank and scale."""
    use_rslora = _most_common([rs for _, _, rs in modules.values()])
    # Express each module's scale with the common rsLoRA flag: alpha' / r (or
    # alpha' / sqrt(r)) equal to its own scale.
    effective = []
    for name, (r, alpha, rs) in modules.items():
        if rs != use_rslora:
            alpha = alpha * math.sqrt(r) if rs else alpha / math.sqrt(r)
        effective.append((name, r, alpha))
    r0 = _most_common([m[1] for m in effective])
    alpha0 = _most_common([m[2] for m in effective if m[1] == r0])
    rank_pattern = {re.escape(n): r for n, r, _ in effective if r != r0}
    alpha_pattern = {re.escape(n): a for n, _, a in effective if a != alpha0}
    return {
        "peft_type": "LORA",
        "r": int(r0),
        "lora_alpha": _as_json_number(alpha0),
        "rank_pattern": {k: int(v) for k, v in rank_pattern.items()},
        "alpha_pattern": {k: _as_json_number(v) for k, v in alpha_pattern.items()},
        "use_rslora": use_rslora,
        "target_modules": sorted(modules),
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": dora,
        "task_type": None,
        "revision": None,
    }


def _ia3_config(feedforward: dict[str, bool]) -> dict:
    """An `IA3Config`: every module in `target_modules`, the input-scaled ones in
    `feedforward_modules`. PEFT takes a module as feedforward when its name ends
    with a listed one; where that would also catch an output-scaled module
    (`mlp.fc` listed, `enc.mlp.fc` not), the list becomes a regex of the exact
    names instead, which PEFT full-matches."""
    ff = sorted(n for n, is_ff in feedforward.items() if is_ff)
    others = [n for n, is_ff in feedforward.items() if not is_ff]
    listed: list[str] | str = ff
    if any(n.endswith(f) for n in others for f in ff):
        listed = "|".join(f"(?:{re.escape(f)})" for f in ff)
    return {
        "peft_type": "IA3",
        "target_modules": sorted(feedforward),
        "feedforward_modules": listed,
        "exclude_modules": None,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "task_type": None,
        "revision": None,
    }


def _as_json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def saved_modules(
    adapter: Adapter, tree: Any, namer, tensors: dict
) -> tuple[set[str], list[str]]:
    """The modules trained in full (`modules_to_save`) of `adapter`: one per bias
    it updates, the Linear whose weight sits next to that bias. Writes their
    `weight` (the tree's plus the adapter's update, torch's `(out, in)`) and
    `bias` into `tensors`; returns the weight leaves so written (not to be
    written again as LoRA) and the module names."""
    if not adapter.bias_deltas:
        return set(), []
    if tree is None:
        raise ValueError(
            "save_peft_adapter: the adapter updates the biases "
            f"{sorted(adapter.bias_deltas)}: modules trained in full (PEFT's "
            "`modules_to_save`, a classification head), which PEFT stores as "
            "whole weights, the model's plus the update. Pass the model's "
            "parameters: `lx.save_peft_adapter(path, adapter, tree=params)`."
        )
    values = dict(flatten_with_paths(tree)[0])
    by_module = {}
    for p in values:
        parts, name = _module_parts(p)
        if name in ("kernel", "weight"):
            by_module.setdefault(parts, []).append(p)
    layouts = {lay.path: lay for lay in adapter.layouts}
    whole, names = set(), []
    for bias_path, delta in sorted(adapter.bias_deltas.items()):
        if bias_path not in values:
            raise ValueError(
                f"save_peft_adapter: the adapter updates the bias {bias_path!r}, "
                "which `tree` does not have: pass the model it was made for."
            )
        parts = unwrapped_parts(bias_path)[:-1]
        weights = [p for p in by_module.get(parts, []) if np.ndim(values[p]) == 2]
        if len(weights) != 1:
            raise ValueError(
                f"save_peft_adapter: the bias {bias_path!r} has "
                f"{'no' if not weights else 'more than one'} 2-D weight "
                f"(`kernel` or `weight`) next to it in `tree` ({weights}); a "
                "module saved in full is a Linear with its weight and bias."
            )
        (w_path,) = weights
        w = np.asarray(values[w_path], np.float64)
        lay = layouts.get(w_path)
        name = _module_parts(w_path)[1]
        in_out = name == "kernel" if lay is None else lay.in_axes == (0,)
        if lay is not None:
            if lay.stack_axes or len(lay.shape) != 2:
                raise ValueError(
                    f"save_peft_adapter: {w_path!r}, saved in full, has layout "
                    f"{lay.shape} with stack axes {lay.stack_axes}; a saved "
                    "module is one 2-D Linear."
                )
            a, b = (np.asarray(x, np.float64) for x in adapter.lora_factors(w_path))
            update = adapter.scale(w_path) * (a @ b)  # (in, out)
            w = w + (update if in_out else update.T)
            whole.add(w_path)
        module = _module_name(w_path, namer(w_path))
        bias = np.asarray(values[bias_path])
        dt = np.result_type(np.asarray(delta).dtype, bias.dtype)
        key = _PREFIX + module
        tensors[f"{key}.weight"] = np.ascontiguousarray(
            (w.T if in_out else w).astype(dt)
        )
        tensors[f"{key}.bias"] = (
            bias.astype(np.float64) + np.asarray(delta, np.float64)
        ).astype(dt)
        names.append(module)
    return whole, sorted(names)
