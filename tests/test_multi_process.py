"""Serving (from a stack and from an AdapterBank) and training (AdapterTrainer) in 2
processes of 4 simulated CPU devices each, on JAX's own runtime
(`jax.distributed`, gloo collectives): every output equals the same program run in
this one process (`examples/multi_process.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location(
        "multi_process", ROOT / "examples" / "multi_process.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_equal_one():
    example = _example()
    reference = example.worker(0, 1, None)  # this process: one device
    assert reference["processes"] == 1
    summary = example.main(2, reference=reference)
    assert summary["processes"] == 2 and summary["devices"] == 8
    assert summary["worst"] < 1e-5, summary
