"""Shared by the PEFT tests (test_peft, test_peft_export, test_variants_peft,
test_loha_lokr, ...): the golden fixtures made by real PEFT, its export script,
PEFT directories written by hand, and the mixed batch checked against PEFT's own
logits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lorax_arrays as lx
from lorax_arrays._io.safetensors import read_safetensors, write_safetensors

FIXTURES = Path(__file__).parent / "fixtures"
PEFT = FIXTURES / "peft"
RTOL = 2e-4

_spec = importlib.util.spec_from_file_location(
    "export_for_peft", FIXTURES / "export_for_peft.py"
)
export_for_peft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_for_peft)


def rel_err(actual, expected) -> float:
    """The largest difference relative to the largest magnitude of `expected`."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# The prefix of every key PEFT writes for a module.
PREFIX = "base_model.model."


def adapter_tensors(root: Path, name: str) -> dict[str, np.ndarray]:
    """The tensors of the golden adapter `root/adapters/name`."""
    return read_safetensors(root / "adapters" / name / "adapter_model.safetensors")[0]


def adapter_config(root: Path, name: str) -> dict:
    """The `adapter_config.json` of the golden adapter `root/adapters/name`."""
    return json.loads((root / "adapters" / name / "adapter_config.json").read_text())


def flax_kernel_path(module: str) -> str:
    """The Flax Llama's kernel path of a PEFT module name."""
    return "/".join(module.split(".")) + "/kernel"


def module_names(tensors: dict, suffix: str) -> list[str]:
    """The PEFT module names of the keys of `tensors` that end in `suffix`."""
    return sorted(k[len(PREFIX) : -len(suffix)] for k in tensors if k.endswith(suffix))


def same_peft_dir(fresh: Path, golden: Path) -> None:
    """The same tensors (bit for bit) and the same config in both directories."""
    got, _ = read_safetensors(fresh / "adapter_model.safetensors")
    want, _ = read_safetensors(golden / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert json.loads((fresh / "adapter_config.json").read_text()) == json.loads(
        (golden / "adapter_config.json").read_text()
    )


def peft_dir(path: Path, modules: dict, config: dict | None = None, extra=None):
    """A PEFT directory written by hand: `modules` maps a module name to
    `(A (r, in), B (out, r))` (or a `("embedding", A, B)` triple)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, fac in modules.items():
        if isinstance(fac[0], str):
            _, a, b = fac
            tensors[f"base_model.model.{name}.lora_embedding_A"] = a
            tensors[f"base_model.model.{name}.lora_embedding_B"] = b
        else:
            a, b = fac
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    tensors.update(extra or {})
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    ranks = {fac[-2].shape[0] for fac in modules.values()}
    cfg = {
        "peft_type": "LORA",
        "r": max(ranks),
        "lora_alpha": 8,
        "target_modules": sorted({n.split(".")[-1] for n in modules}),
        "rank_pattern": {
            n: fac[-2].shape[0]
            for n, fac in modules.items()
            if fac[-2].shape[0] != max(ranks)
        },
        "alpha_pattern": {},
        "bias": "none",
        "use_rslora": False,
    }
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def check_batch_equals_peft(llama, logits, adapters, names):
    """`adapters` (named `names`) and base rows served in one jitted batch of the
    Flax Llama, in the rows the golden file `logits` lists: each row within RTOL
    of PEFT's logits for its adapter alone, and each adapter's PEFT logits well
    away from the base model's."""
    golden = np.load(logits)
    stack = lx.stack_adapters(adapters, names=names)
    rows = [str(r) for r in golden["rows"]]
    assert set(rows) == {*names, "__base__"}
    forward = jax.jit(lx.quaxify(lambda p, ids: llama(ids, params=p).logits))
    out = forward(
        lx.loraify(llama.params, stack, stack.indices(rows)),
        jnp.asarray(golden["input_ids"], jnp.int32),
    )
    for i, row in enumerate(rows):
        alone = golden["base"] if row == "__base__" else golden[row]
        assert rel_err(out[i], alone[i]) < RTOL, row
        if row != "__base__":
            assert rel_err(golden[row][i], golden["base"][i]) > 50 * RTOL, row
