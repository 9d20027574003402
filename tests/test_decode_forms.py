"""The decode-forms benchmark runs in quick mode: every form agrees with the float64
per-row reference (base rows exact, NaN-scale rows NaN, a non-finite adapter
changes only its own rows; the script asserts these), and the timing table has a
ratio for every form it times."""

from __future__ import annotations

import re

from tests.scripts import run_script, tables

NUMBER = re.compile(r"^\d+\.\d+$")


def test_decode_forms_quick():
    from benchmarks.decode_forms import FORMS

    out = run_script(["-m", "benchmarks.decode_forms", "--quick"])
    assert f"checked {len(FORMS)} forms" in out and ": ok" in out, out
    [table] = tables(out)
    header, rows = table[0], table[1:]
    timed = header[header.index("bound") + 1 : -1]
    assert header[-1] == "best" and timed and set(timed) <= set(FORMS), header
    assert rows
    for row in rows:
        assert all(NUMBER.match(c) for c in row[-1 - len(timed) : -1]), row
        assert row[-1] in timed
