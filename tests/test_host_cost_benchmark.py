"""`benchmarks/host_cost.py` runs in quick mode: the served step and the eager tree
serve the same rows, and every row of the table is printed."""

from __future__ import annotations

import re

from tests.scripts import run_script


def test_host_cost_benchmark_quick():
    out = run_script(["-m", "benchmarks.host_cost", "--quick", "--repeats", "5"])
    assert "14 adapted leaves (unscanned, 2 layers)" in out  # 7 per layer
    for row in (
        "`bank.indices(names)`",
        "`bank.served(idx)`",
        "dispatch, plain params (19 arrays)",  # 9 per layer + the embedding
        "dispatch, params + served",
        "eager `lx.with_indices(tree, idx)`",
    ):
        assert row in out, row
    ratio = re.search(
        r"dispatch, params \+ served \(\d+ arrays\) \| [\d.]+ \| ([\d.]+)x", out
    )
    assert ratio and float(ratio.group(1)) > 0
