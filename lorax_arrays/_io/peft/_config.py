"""PEFT's `adapter_config.json`: reading it, checking what we serve, and PEFT's
own matching rules for `target_modules`, `rank_pattern` and `alpha_pattern`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..._core.errors import NonFiniteAdapterError, PeftFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


# Config entries that change what the adapter computes and that we do not serve
# yet: loading such an adapter as plain LoRA would be silently wrong.
_UNSUPPORTED = {
    "lora_bias": "a LoRA bias (`lora_bias=True`)",
    "layer_replication": "layer replication (`layer_replication`)",
    "target_parameters": "LoRA on bare parameters (`target_parameters`)",
    "use_qalora": "QALoRA (`use_qalora=True`)",
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


def _check_regex(
    pattern: Any, field: str, file: Path, wrap: tuple[str, str] = ("", "")
) -> None:
    """A regex of the config, as PEFT compiles it (between `wrap`'s two parts),
    or an error naming the file, the field and the pattern."""
    if not isinstance(pattern, str):
        raise PeftFormatError(
            f"{file}: {field} holds {pattern!r}; expected a string (a module name "
            "or a regex)."
        )
    try:
        re.compile(wrap[0] + pattern + wrap[1])
    except re.error as e:
        raise PeftFormatError(
            f"{file}: {field} holds {pattern!r}, which is not a valid regular "
            f"expression ({e}); PEFT could not have used it either: the file is "
            "corrupt or hand-edited."
        ) from None


def _check_names_field(config: dict, key: str, file: Path) -> None:
    """`target_modules`-like entries: absent, a regex, or a list of names."""
    value = config.get(key)
    if value is None:
        return
    if isinstance(value, str):
        _check_regex(value, repr(key), file)
        return
    if not isinstance(value, (list, tuple)):
        raise PeftFormatError(
            f"{file}: {key!r} is {value!r}; expected a regex (a string) or a list "
            "of module names."
        )
    for v in value:  # names (PEFT matches them as suffixes), not regexes
        if not isinstance(v, str):
            raise PeftFormatError(
                f"{file}: {key!r} holds {v!r}; expected module names (strings)."
            )


def _non_finite(file: Path, field: str, value: float) -> NonFiniteAdapterError:
    return NonFiniteAdapterError(
        f"{file}: {field} is {value!r}: a non-finite alpha makes every output of "
        "the adapter NaN or infinite (corrupt or diverged); fix the config."
    )


def _check_fields(config: dict, file: Path) -> None:
    """The types and regexes of the fields that decide which modules an adapter
    has and their ranks: each wrong one is an error naming the file and field."""
    for key in ("target_modules", "exclude_modules", "feedforward_modules"):
        _check_names_field(config, key, file)
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise PeftFormatError(f"{file}: {key!r} must be a dict, got {value!r}.")
        for k, v in value.items():
            _check_regex(k, f"{key!r} key", file, wrap=(r"(.*\.)?(", r")$"))
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok and key == "alpha_pattern" and not math.isfinite(v):
                raise _non_finite(file, f"{key}[{k!r}]", v)
            if key == "rank_pattern":
                ok = ok and float(v).is_integer() and v >= 1
            if not ok or not math.isfinite(v):
                want = "a rank >= 1" if key == "rank_pattern" else "a finite number"
                raise PeftFormatError(
                    f"{file}: {key}[{k!r}] is {v!r}; expected {want}."
                )
    layers = config.get("layers_to_transform")
    if layers is not None:
        items = [layers] if not isinstance(layers, list) else layers
        if any(isinstance(i, bool) or not isinstance(i, int) for i in items):
            raise PeftFormatError(
                f"{file}: 'layers_to_transform' is {layers!r}; expected a layer "
                "number or a list of layer numbers."
            )
    pattern = config.get("layers_pattern")
    if pattern is not None:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            _check_regex(p, "'layers_pattern'", file)


def _check_config(config: dict, file: Path) -> None:
    peft_type = _peft_type(config)
    if peft_type not in _PEFT_TYPES:
        raise PeftFormatError(
            f"{file}: peft_type is {config.get('peft_type')!r}; load_peft_adapter "
            "reads LoRA adapters only, with the variants DoRA, IA3, VeRA, LoHa and "
            "LoKr (OFT, BOFT, AdaLoRA... are not supported yet)."
        )
    _check_fields(config, file)
    tokens = config.get("alora_invocation_tokens")
    if tokens is not None:
        ok = (
            isinstance(tokens, list)
            and tokens
            and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
            and min(tokens) >= 0
        )
        if not ok:
            raise PeftFormatError(
                f"{file}: 'alora_invocation_tokens' is {tokens!r}; expected a "
                "non-empty list of token ids."
            )
        if peft_type != "LORA" or config.get("use_dora"):
            raise PeftFormatError(
                f"{file}: activated LoRA (alora_invocation_tokens) with "
                f"{'DoRA' if config.get('use_dora') else peft_type}; PEFT defines "
                "aLoRA for plain LoRA only."
            )
    if config.get("modules_to_save") and peft_type != "LORA":
        raise PeftFormatError(
            f"{file}: the adapter uses fully trained modules (`modules_to_save`) "
            f"with peft_type {peft_type!r}; lorax_arrays serves them next to LoRA "
            "(and DoRA) adapters only."
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
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "lora_alpha" and number and not math.isfinite(value):
            raise _non_finite(file, repr(key), value)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (key == "r" and (value < 1 or not float(value).is_integer()))
        ):
            want = "a rank >= 1" if key == "r" else "a finite number"
            raise PeftFormatError(f"{file}: {key!r} is {value!r}; expected {want}.")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise PeftFormatError(f"{file}: {key!r} must be a dict, got {value!r}.")


_WHAT = {"LORA": "LoRA", "IA3": "IA3", "VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr"}
