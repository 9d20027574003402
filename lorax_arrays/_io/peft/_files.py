"""The adapter file's keys: which tensors belong to which module, and whether
each module's tensors are complete and fit together."""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..._core.errors import PeftFormatError
from ._config import _PREFIX, _WHAT, _peft_type

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
    spelled: dict[str, str] = {}  # name without PEFT's prefix -> key
    for key, value in tensors.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise PeftFormatError(
                f"{file}: tensor {key!r} has dtype {value.dtype} {tuple(value.shape)}; "
                "adapter weights are floating point (PEFT writes float32, bfloat16 "
                "or float16): the file is corrupt or was not written by PEFT."
            )
        short = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        other = spelled.setdefault(short, key)
        if other != key:
            if not np.array_equal(tensors[other], value):
                raise PeftFormatError(
                    f"{file}: {other!r} and {key!r} are the same weight under two "
                    "spellings (with and without PEFT's 'base_model.model.' "
                    "prefix), with different values: which one PEFT would use "
                    "depends on its version. Keep one of them."
                )
            continue  # the same values twice: one copy is enough
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
