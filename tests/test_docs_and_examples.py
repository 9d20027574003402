"""Every Python block in the README and docs runs as written; every example and
benchmark script runs (in this process, as `__main__`, unless it changes
process-wide state: see tests/scripts.py)."""

from __future__ import annotations

import re

import pytest

from tests.scripts import ROOT, run_script as _run

DOCS = [
    "README.md",
    "docs/quickstart.md",
    "docs/custom-rules.md",
    "docs/coverage.md",
    "docs/peft.md",
    "docs/nnx.md",
    "docs/serving.md",
    "docs/variants.md",
    "docs/training.md",
    "docs/moe.md",
]


@pytest.mark.parametrize("page", DOCS)
def test_doc_code_blocks_run(page, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
    assert blocks, f"{page} has no python blocks"
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks))
    # The custom-rules page registers rules for BatchedLoraArray itself, which
    # would change what every later test in this process sees.
    _run([str(script)], isolated=page == "docs/custom-rules.md")


def test_main_example_serves_mixed_batch():
    out = _run(["examples/serve_adapters.py"])
    # One row per request, every adapter and the base model appear.
    for name in ["support", "legal", "code", "poetry", "base"]:
        assert re.search(rf"^\s+\d+\s+{name}\s", out, re.M), out
    worst = float(
        re.search(r"Largest deviation from the merged models: (\S+) ", out)[1]
    )
    assert worst < 1e-4


def test_peft_example_end_to_end(tmp_path):
    out = _run(["examples/peft_adapters.py", "--workdir", str(tmp_path)])
    worst = float(
        re.search(r"Largest relative deviation from the merged models: (\S+)", out)[1]
    )
    assert worst < 2e-4
    for row in ["support", "legal", "base"]:
        assert re.search(rf"^\s+\d+\s+{row}\s", out, re.M), out
    assert "orbax round trip bit-exact: True" in out
    assert "reads back the same: True" in out
    assert (tmp_path / "export" / "legal" / "adapter_config.json").exists()


def test_conv_example_serves_mixed_batch():
    out = _run(["examples/conv_lora.py"])
    for name in ["sketch", "xray", "satellite", "night", "base"]:
        assert re.search(rf"^\s+\d+\s+{name}\s", out, re.M), out
    worst = float(
        re.search(r"Largest deviation from the merged models: (\S+) ", out)[1]
    )
    assert worst < 1e-4
    assert "no per-image kernel is built" in out


def test_quantised_base_example():
    out = _run(["examples/quantised_base.py"])
    assert out.count("request") == 5


def test_layer_benchmark_runs_quick():
    out = _run(["-m", "benchmarks.layer_overhead", "--quick"])
    for name in ["base", "ours", "merged", "loop", "sub-batch", "one-hot"]:
        assert re.search(rf"^{name}\s+[\d.]+\s+[\d.]+x", out, re.M), out


def test_generation_example_matches_rows_alone():
    out = _run(["examples/generate.py", "--new-tokens", "6"])
    assert "Identical to generating each row alone with its merged model: True" in out
    assert out.count("= alone") == 5, out
    # The adapters must actually change what is generated, or the check is empty.
    differ = int(re.search(r"differ from the base model's: (\d+) of", out)[1])
    assert differ > 0, out


def test_benchmark_suite_runs_quick(tmp_path):
    out_file = tmp_path / "suite.md"
    out = _run(
        ["-m", "benchmarks.suite", "--quick", "--only", "W1", "--out", str(out_file)],
        isolated=True,  # it clears JAX's caches
    )
    row = re.search(r"^\| W1 prefill, adapter per sequence \|.*$", out, re.M)
    assert row, out
    # Quick mode only smoke-tests the script: ratios at toy sizes mean nothing,
    # but our strategies and the alternatives must each have been measured.
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    gather, segment, _dense, auto, merged, loop, sub_batch = cells[2:9]
    for cell in (gather, segment, auto, merged, loop, sub_batch):
        assert re.fullmatch(r"\d+\.\d+x", cell), row[0]
    assert out_file.read_text().count("\n| W") == 1


def test_auto_check_runs_quick():
    """Every strategy is timed on every grid shape and auto's pick is one of them."""
    out = _run(["-m", "benchmarks.auto_check", "--quick"])
    lines = re.findall(r"^\| (?:prefill|decode).*$", out, re.M)
    assert len(lines) == 3, out  # every fourth row of the 10-row grid
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert all(re.fullmatch(r"\d+\.\d+x", c) for c in cells[3:6]), line
        assert cells[6] in ("gather", "dense", "segment"), line
        assert cells[7] in ("gather", "dense", "segment"), line
        assert float(cells[8]) >= 1.0, line


def test_compile_time_runs_quick():
    """The quick-mode program is compiled in every variant (quax included);
    the script also asserts that ours with one adapter equals quax's LoraArray."""
    out = _run(["-m", "benchmarks.compile_time", "--quick"], isolated=True)
    assert "| generate" not in out  # the decoder programs: full runs only
    for label, has_quax in [("mlp", True)]:
        row = re.search(rf"^\| {re.escape(label)} \|.*$", out, re.M)
        assert row, out
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d+x", cells[2]) and re.fullmatch(
            r"\d+\.\d+x", cells[3]
        ), row[0]
        assert (cells[4] != "-") == has_quax, row[0]


def test_index_guard_benchmark_runs_quick():
    """The three programs are timed on both workloads; the guard adds at most one
    jaxpr equation per adapted matmul (4 in the two-layer MLP), and decoding a
    bank's issued indices a handful more per matmul."""
    out = _run(["-m", "benchmarks.index_guard", "--quick"])
    cell = r"([^|]*)\|"
    rows = re.findall(r"^\| (W[13] [^|]*)\|" + cell * 6 + "$", out, re.M)
    assert [r[0].split()[0] for r in rows] == ["W1", "W3"], out
    for _, bare, guarded, issued, ratio, issued_ratio, added in rows:
        assert float(bare) > 0 and float(guarded) > 0 and float(issued) > 0
        assert re.fullmatch(r"\s*\d+\.\d+x\s*", ratio)
        assert re.fullmatch(r"\s*\d+\.\d+x\s*", issued_ratio)
        by_guard, by_issue = (int(v) for v in added.split("/"))
        assert by_guard <= 4 and by_guard < by_issue <= 4 * 12
    assert re.search(r"W1 cost of the guard: [+-]\d+\.\d+%", out)
    assert re.search(r"W1 cost of the guard \+ issued indices: [+-]\d+\.\d+%", out)


def test_variants_benchmark_runs_quick():
    """Every LoRA variant (and the mixed batches) is checked row by row against its
    adapters merged alone, then timed on both workloads: a row per variant, each
    cell a measured ratio; the mixed stack is padded to VeRA's rank."""
    out = _run(["-m", "benchmarks.variants", "--quick"])
    assert out.count("every row matches its adapter merged alone") == 2, out
    rows = {}
    for name in ["base", "lora", "dora", "ia3", "vera", "mixed", "mixed-r16"]:
        row = re.search(rf"^\| {re.escape(name)} \|.*$", out, re.M)
        assert row, out
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        rows[name] = cells
        # W1 then W3: ms, / base, / lora, temp MiB, auto's pick.
        for ms, to_base, to_lora in (cells[2:5], cells[7:10]):
            assert float(ms) > 0, row[0]
            assert re.fullmatch(r"\d+\.\d+x", to_base), row[0]
            assert re.fullmatch(r"\d+\.\d+x", to_lora), row[0]
    assert rows["base"][3] == rows["lora"][4] == "1.00x"
    assert [rows[k][1] for k in ("lora", "dora", "ia3")] == ["16", "16", "0"]
    assert rows["mixed"][1] == rows["vera"][1] and rows["mixed-r16"][1] == "16"
    assert len(re.findall(r"^- W[13] .*: lora .* ms, dora .* ms", out, re.M)) == 2


def test_mixed_variants_example_trains_and_serves_every_kind():
    out = _run(["examples/mixed_variants.py", "--steps", "8"])
    for kind in ("lora", "dora", "ia3", "vera"):
        first, last = map(
            float, re.search(rf"trained {kind}\s.*loss (\S+) -> (\S+)", out).groups()
        )
        assert last < first, (kind, out)  # training reduced each kind's loss
    rows = re.findall(
        r"row \d: (\w+)\s+\|batched - alone\| = (\S+), moved .* (\S+)", out
    )
    assert len(rows) == 8, out
    for name, err, moved in rows:
        assert float(err) < 1e-4
        assert (float(moved) > 1e-2) if name != "base" else (float(moved) == 0.0)


def test_rl_tenants_example_learns_and_publishes():
    out = _run(["examples/rl_tenants.py", "--steps", "40"])
    found = re.findall(r"reward: first 10 steps ([\d.]+), last 10 steps ([\d.]+)", out)
    assert len(found) == 3, out
    assert all(float(last) > float(first) for first, last in found), out
    assert "bank versions: [41, 41, 41]" in out, out


def test_moe_experts_example_serves_each_request_its_adapter():
    out = _run(["examples/moe_experts.py", "--steps", "8"])
    rows = re.findall(r"request \d \(([\w-]+)\): predicts .*= ([\d.e+-]+)", out)
    assert [name for name, _ in rows] == ["shift-1", "base", "shift-3", "shift-2"]
    assert all(float(err) < 1e-3 for _, err in rows), out
    predictions = re.findall(r"predicts (\[[\d, ]+\])", out)
    assert len(set(predictions)) == 4, out  # the adapters tell the requests apart
    assert "per-token logits: (4, 6, 64) finite: True" in out, out
