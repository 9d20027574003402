"""The multi-tenant training benchmark runs in quick mode: every variant is timed
and the ratios against both targets are printed."""

from __future__ import annotations

import re

from tests.scripts import run_script


def test_multi_tenant_benchmark_quick():
    out = run_script(["-m", "benchmarks.multi_tenant", "--quick", "--repeats", "1"])
    for variant in ("multi-tenant", "(a) sequential", "(b) one adapter, same batch"):
        assert re.search(rf"^\| {re.escape(variant)} \| [\d.]+ \| \d+ \|$", out, re.M)
    assert re.search(r"^throughput vs \(a\) sequential: \d+\.\d+x \(target", out, re.M)
    assert re.search(r"^step time vs \(b\) one adapter: \d+\.\d+x \(target", out, re.M)
