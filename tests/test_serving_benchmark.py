"""The end-to-end serving benchmark runs in quick mode: every variant is measured,
the batched generation matches the merged models, the bank writes in place, and
the table and plot are written."""

from __future__ import annotations

import re

from tests.scripts import run_script, tables

GEN_VARIANTS = ["auto", "compact", "merged", "per-adapter"]
PHASE_VARIANTS = [
    f"{phase} {s}"
    for phase in ("prefill", "decode")
    for s in ("auto", "gather", "segment", "dense", "compact")
]
RATIO = re.compile(r"^\d+\.\d+x$")


def ratio_cells(table, columns) -> list[str]:
    header, rows = table[0], table[1:]
    assert rows, table
    missing = [c for c in columns if c not in header]
    assert not missing, (missing, header)
    return [row[header.index(c)] for row in rows for c in columns]


def test_serving_benchmark_quick(tmp_path):
    out_md, out_png = tmp_path / "serving.md", tmp_path / "serving.png"
    out = run_script(
        [
            "-m",
            "benchmarks.serving",
            "--quick",
            "--out",
            str(out_md),
            "--plot",
            str(out_png),
        ]
    )
    text = out_md.read_text()
    found = {t[0][1]: t for t in tables(text)}

    # Every variant of every workload measured: each cell a ratio like 0.97x.
    gen = found["base ms"]
    phase = found["base prefill ms"]
    bank = found["cost"]
    # quick: 2 workloads, the phases of the second only
    assert len(gen) - 1 == 2 and len(phase) - 1 == 1, text
    cells = ratio_cells(gen, GEN_VARIANTS) + ratio_cells(phase, PHASE_VARIANTS)
    cells += ratio_cells(bank, ["ratio"])
    bad = [c for c in cells if not RATIO.match(c) or float(c[:-1]) <= 0]
    assert not bad, (bad, text)
    for row in gen[1:]:
        assert re.fullmatch(r"\d+", row[2]), row  # base tokens/s
        assert re.fullmatch(r"(yes|\*\*no\*\*) / (yes|\*\*no\*\*)", row[-1]), row
    assert len(bank) - 1 == 11, bank

    # The batched program agrees with each row alone with its adapter merged, and
    # the adapters change what is generated (else the agreement proves nothing).
    assert "Correctness: PASS" in out, out
    worst = float(re.search(r"worst relative logit error (\S+) over", out)[1])
    assert worst < 1e-3, out
    differ = int(re.search(r"; (\d+) of the adapted rows' \d+ tokens differ", out)[1])
    assert differ > 0, out
    assert out.count("greedy tokens identical to the merged model's: True") == 4, out

    # A new adapter is served without recompiling; a slot write is in place.
    assert "First use of a new adapter recompiled: False." in out, out
    assert "buffer addresses unchanged: True, old arrays deleted: True." in out, out
    verdict = r"^Target, .*: (met|MISSED) / (met|MISSED)$"
    assert len(re.findall(verdict, out, re.M)) == 2, out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
