"""The continuous-batching benchmark runs in quick mode (in this process): every
server (base and adapted, scanned and unscanned) is measured, and the adapted
servers' tokens match each request alone with its adapter merged (the script exits
non-zero otherwise)."""

from __future__ import annotations

import re

from tests.scripts import run_script, tables

HEADER = [
    "layout",
    "server",
    "tok/s",
    "vs base",
    "step ms",
    "routing ms",
    "dispatch ms",
    "host % of step",
    "device ms",
    "loads / 1k tokens",
    "decode-only step ms",
    "bound ms",
    "decode / bound",
]
SPLIT_HEADER = [
    "layout",
    "server",
    "`route` ms",
    "decode dispatch ms",
    "base's decode dispatch ms",
    "`bank.indices` ms (apart)",
    "`loraify` / `served` ms (apart)",
    "arrays into the step",
]
NUMBER = re.compile(r"^\d+(\.\d+)?$")
RATIO = re.compile(r"^\d+\.\d+x$")


def test_continuous_benchmark_quick(tmp_path):
    out_md = tmp_path / "continuous.md"
    out = run_script(["-m", "benchmarks.continuous", "--quick", "--out", str(out_md)])
    text = out_md.read_text()
    found = tables(text)
    assert len(found) == 2, text

    main = found[0]
    assert main[0] == HEADER, main[0]
    rows = [dict(zip(HEADER, r)) for r in main[1:]]
    layouts = sorted({r["layout"].split(" (")[0] for r in rows})
    assert layouts == ["scanned", "unscanned"], rows
    assert "(7 adapted leaves)" in rows[0]["layout"], rows[0]
    assert "(14 adapted leaves)" in rows[-1]["layout"], rows[-1]  # quick: 2 layers
    for layout in layouts:
        servers = [r["server"] for r in rows if r["layout"].startswith(layout + " ")]
        assert servers[0] == "base" and "adapted" in servers, servers
    for r in rows:
        adapted = r["server"] != "base"
        assert RATIO.match(r["vs base"]) and RATIO.match(r["decode / bound"]), r
        assert re.fullmatch(r"\d+\.\d%", r["host % of step"]), r
        for c in ["tok/s", "step ms", "dispatch ms", "device ms", "bound ms"]:
            assert NUMBER.match(r[c]), (c, r)
        assert float(r["tok/s"]) > 0 and float(r["bound ms"]) > 0, r
        if adapted:
            assert NUMBER.match(r["routing ms"]), r
            assert NUMBER.match(r["loads / 1k tokens"]), r
            assert float(r["loads / 1k tokens"]) > 0, r  # 8 adapters, 2 slots
        else:
            assert r["vs base"] == "1.00x", r
            assert r["routing ms"] == r["loads / 1k tokens"] == "-", r

    # The host's part of a decode step, `route` split into `bank.indices` and
    # `loraify`: one row per adapted server.
    split = found[1]
    assert split[0] == SPLIT_HEADER, split[0]
    assert len(split) - 1 == sum(r["server"] != "base" for r in rows), split
    for r in split[1:]:
        assert all(NUMBER.match(c) for c in r[2:]), r

    # One verdict per adapted server on each target, whatever it is.
    verdict = (
        r"^Targets, (scanned|unscanned) adapted.*: tokens/s \d+\.\d+x base "
        r"\(>= 0\.85x\): (met|MISSED); host \d+\.\d% of the step \(<= 5%\): "
        r"(met|MISSED)$"
    )
    assert len(re.findall(verdict, text, re.M)) == len(split) - 1, text
    assert "Memory bandwidth: " in text and " GB/s" in text, text

    # The adapted servers' logits match the merged model's, teacher-forced, and the
    # adapters change the tokens (else the agreement proves nothing).
    assert "Correctness: PASS" in out and "Correctness: PASS" in text, out
    worst = float(re.search(r"worst relative logit error (\S+) over", out)[1])
    assert worst < 1e-3, out
    differ = int(re.search(r"; (\d+) of their \d+ tokens differ", out)[1])
    assert differ > 0, out
    # quick: the slot limit (2) binds, so some admissions wait for a slot
    assert int(re.search(r", (\d+) admissions deferred", out)[1]) > 0, out
