"""The MoE benchmark runs in quick mode: its variants agree with the base layer on
NumPy-merged weights (the script asserts it), and the table has, for every case, a
time, a host time and a ratio per adapted variant, and physical bounds of at least
1 that grow with what the adapters add.
A second table gives the trace-and-lower and compile times of the base and of
the per-token variant (in quick mode) and their ratios to the base's."""

from __future__ import annotations

import re

from tests.scripts import run_script, tables

NUMBER = re.compile(r"^\d+\.\d+$")


def _check_table(out, variants):
    assert f"checked {len(variants)} variants ({', '.join(variants)})" in out, out
    assert ": ok" in out, out
    table, compiled = tables(out)
    assert [r[0] for r in compiled[1:]] == [
        v for v in variants if v in ("base", "per-token")
    ], compiled
    for row in compiled[1:]:
        assert all(NUMBER.match(c) for c in row[1:]), row
        assert float(row[1]) > 0 and float(row[3]) > 0
    header, rows = table[0], table[1:]
    assert header[:3] == ["E", "tokens", "base ms"], header
    for name in variants[1:]:
        for col in (f"{name} ms", f"{name} host ms", f"{name} ratio"):
            assert col in header, (col, header)
    assert len(rows) == 2  # E in {4, 8}, one token count
    for row in rows:
        cells = dict(zip(header, row))
        assert all(NUMBER.match(c) for c in row[2:]), row
        base = float(cells["base ms"])
        for name in variants[1:]:
            ratio = float(cells[f"{name} ratio"])
            assert abs(ratio - float(cells[f"{name} ms"]) / base) < 0.02 * ratio + 0.01
        flops, one = (
            float(cells["bound flops"]),
            float(cells["bound bytes (1 adapter)"]),
        )
        assert flops > 1 and one > 1
        if len(variants) > 2:
            # the batch's distinct adapters are read: at least one adapter's bytes
            assert float(cells["bound bytes (per-token)"]) >= one
    return rows


def test_moe_benchmark_quick_base_and_scalar():
    out = run_script(["-m", "benchmarks.moe", "--quick", "--variants", "base,scalar"])
    _check_table(out, ["base", "scalar"])


def test_moe_benchmark_quick_per_token():
    """Every variant, the per-row ones (the form `auto` picks and each form
    forced) checked row by row against the base layer on merged weights."""
    out = run_script(["-m", "benchmarks.moe", "--quick"])
    _check_table(out, ["base", "scalar", "per-token", "sorted", "expert-grouped"])
