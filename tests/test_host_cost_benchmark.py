"""`benchmarks/host_cost.py` runs in quick mode: the served step and the eager tree
serve the same rows, and every row of the table is printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_cost_benchmark_quick():
    proc = subprocess.run(
        [sys.executable, "benchmarks/host_cost.py", "--quick", "--repeats", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "28 adapted leaves (unscanned, 4 layers)" in out  # 7 per layer
    for row in (
        "`bank.indices(names)`",
        "`bank.served(idx)`",
        "dispatch, plain params (37 arrays)",  # 9 per layer + the embedding
        "dispatch, params + served",
        "eager `lx.with_indices(tree, idx)`",
    ):
        assert row in out, row
    ratio = re.search(
        r"dispatch, params \+ served \(\d+ arrays\) \| [\d.]+ \| ([\d.]+)x", out
    )
    assert ratio and float(ratio.group(1)) > 0
