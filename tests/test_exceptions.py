"""Every exception a user can meet is exported from `lorax_arrays` and defined in
one module (`_core/errors.py`); each is raised here through the public API and
caught by its exported name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_arrays as lx
from lorax_arrays._core import errors

PACKAGE = Path(lx.__file__).parent
# Raised and caught inside the rules (a reshape that breaks the low-rank form
# becomes an UnsupportedOperationError naming why); never reaches a user.
INTERNAL = {"LayoutError", "RowsNeededError", "CarryLostRowsError"}

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.standard_normal((4, 3)), jnp.float32)
PARAMS = {"w": W}


def _adapter(scale: float = 1.0) -> lx.Adapter:
    fresh = lx.init_adapter(PARAMS, lx.LoraRule("w", 2), key=jax.random.key(0))
    a = jnp.asarray(RNG.standard_normal((4, 2)), jnp.float32)
    b = jnp.asarray(RNG.standard_normal((2, 3)), jnp.float32) * scale
    return eqx.tree_at(lambda ad: ad.weights["w"], fresh, (a, b))


def _served(idx):
    return lx.loraify(PARAMS, [_adapter()], idx)


def unsupported():
    lx.quaxify(lambda p: jnp.sin(p["w"]))(_served([0]))


def lora_index():
    lx.loraify(PARAMS, [_adapter()], [3])


def stale_indices():
    bank = lx.AdapterBank(PARAMS, [lx.LoraRule("w", 2)], slots=1)
    bank.add("x", _adapter())
    idx = bank.indices(["x"])
    bank.remove("x")
    lx.loraify(PARAMS, bank, idx)


def indices_shape():
    x = jnp.ones((3, 4), jnp.float32)  # 3 rows, 2 indices
    lx.quaxify(lambda p, x: x @ p["w"])(_served([0, -1]), x)


def checkpoint(tmp_path):
    lx.load_adapter(tmp_path / "nothing here")


def non_finite():
    lx.stack_adapters([_adapter(scale=float("nan"))])


def peft_format(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PREFIX_TUNING"})
    )
    lx.load_peft_adapter(tmp_path, PARAMS)


def quaxify_missing():
    _served([0])["w"] + 1.0


def safetensors(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["w"]}
        )  # fmt: skip
    )
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08" + b"\0" * 6)
    lx.load_peft_adapter(tmp_path, PARAMS)


def unknown_adapter():
    bank = lx.AdapterBank(PARAMS, [lx.LoraRule("w", 2)], slots=1)
    bank.indices(["nobody"])


def unset_indices():
    x = jnp.ones((1, 4), jnp.float32)
    lx.quaxify(lambda p, x: x @ p["w"])(lx.loraify(PARAMS, [_adapter()]), x)


CASES = {
    "UnsupportedOperationError": unsupported,
    "LoraIndexError": lora_index,
    "StaleIndicesError": stale_indices,
    "IndicesShapeError": indices_shape,
    "CheckpointError": checkpoint,
    "NonFiniteAdapterError": non_finite,
    "PeftFormatError": peft_format,
    "QuaxifyMissingError": quaxify_missing,
    "SafetensorsError": safetensors,
    "UnknownAdapterError": unknown_adapter,
    "UnsetIndicesError": unset_indices,
}


def _exception_classes(tree: ast.Module) -> list[str]:
    return [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(
            getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
            for b in node.bases
        )
    ]


def test_every_exception_is_defined_in_the_errors_module():
    elsewhere = {
        str(path.relative_to(PACKAGE)): names
        for path in PACKAGE.rglob("*.py")
        if path.name != "errors.py"
        and (names := _exception_classes(ast.parse(path.read_text())))
    }
    assert not elsewhere, elsewhere


def test_every_exception_is_exported_and_has_a_case():
    defined = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, Exception)
    }
    assert defined - INTERNAL == set(CASES)
    for name in defined - INTERNAL:
        assert getattr(lx, name) is getattr(errors, name)
    assert not INTERNAL & set(dir(lx))


@pytest.mark.parametrize("name", sorted(CASES))
def test_raised_through_the_public_api(name, tmp_path):
    case = CASES[name]
    takes_path = "tmp_path" in case.__code__.co_varnames[: case.__code__.co_argcount]
    with pytest.raises(getattr(lx, name)) as info:
        case(tmp_path) if takes_path else case()
    # The most specific exported class, not a parent that happens to match.
    assert type(info.value) is getattr(lx, name), type(info.value)
    assert str(info.value)


def test_the_internal_layout_error_never_escapes():
    with pytest.raises(lx.UnsupportedOperationError, match="Cannot reshape"):
        lx.quaxify(lambda p: p["w"].reshape(-1) @ jnp.ones(12))(_served([0]))
