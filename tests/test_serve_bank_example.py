"""examples/serve_bank.py, run as a user would: 200 requests over 20 adapters
through an 8-slot AdapterBank, every output checked against its adapter merged
alone, one trace for the whole stream."""

from __future__ import annotations

import re

import pytest

from tests.scripts import run_script

N_REQUESTS, N_ADAPTERS, SLOTS, BATCH = 200, 20, 8, 10
BATCH_RE = re.compile(
    r"^  batch +(\d+)  requests +(\d+)-(\d+) +(\d+) adapters?  (.*)$", re.M
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve_bank")
    out = run_script(["examples/serve_bank.py", "--workdir", str(workdir)])
    return out, workdir


def test_every_output_matches_its_adapter_merged_alone(run):
    out, _ = run
    assert "Compiling the batched forward pass…" in out
    assert "Compiled once: True (1 trace)" in out, out
    m = re.search(
        rf"All {N_REQUESTS} outputs equal their adapter merged alone: True "
        r"\(largest deviation (\S+)\)",
        out,
    )
    assert m, out
    worst = float(m[1])
    assert worst < 1e-4, out
    # The check means something only if a missing (base) or wrong adapter would
    # be far outside the tolerance.
    effect, other = map(
        float,
        re.search(
            r"by at least (\S+); the next adapter's output is at least (\S+) ", out
        ).groups(),
    )
    assert min(effect, other) > 1e-2 > 100 * worst, out


def test_bank_filled_from_disk(run):
    out, workdir = run
    assert re.search(
        rf"Filled the bank from {N_ADAPTERS} adapter directories \(18 lorax_arrays "
        rf"checkpoints, 2 PEFT\): {N_ADAPTERS} adapters",
        out,
    ), out
    dirs = sorted((workdir / "adapters").iterdir())
    assert len(dirs) == N_ADAPTERS
    assert sum((d / "adapter_config.json").exists() for d in dirs) == 2
    assert sum((d / "lorax_adapter.json").exists() for d in dirs) == N_ADAPTERS - 2


def test_events_replay_to_a_consistent_bank(run):
    """The printed loads, evictions and removal, replayed in order, never put an
    adapter into an occupied slot, never evict what a slot does not hold, and leave
    every batch's adapters on the device; all requests are served, in order."""
    out, _ = run
    slots: dict[int, str] = {}
    counts = {"load": 0, "evict": 0, "remove": 0}
    removed = None
    served, batches = 0, 0

    def apply(kind, name, slot):
        counts[kind] += 1
        assert 0 <= slot < SLOTS
        if kind == "load":
            assert slot not in slots, (name, slot, slots)
            assert name not in slots.values(), (name, slots)
            assert name != removed, f"{name} loaded after its removal"
            slots[slot] = name
        else:
            assert slots.pop(slot, None) == name, (kind, name, slot)

    lines = out.splitlines()
    for line in lines:
        if m := re.match(r"  -- bank\.remove\('(\w+)'\): remove (\w+)@(\d+)$", line):
            removed = m[1]
            assert m[2] == removed
            apply("remove", removed, int(m[3]))
        elif m := BATCH_RE.match(line):
            number, first, last, distinct, events = m.groups()
            assert int(number) == batches and int(first) == served, line
            size = int(last) - int(first) + 1
            assert 1 <= size <= BATCH and 1 <= int(distinct) <= SLOTS, line
            served, batches = int(last) + 1, batches + 1
            if events != "(all adapters already loaded)":
                for event in events.split(", "):
                    if e := re.fullmatch(r"load (\w+)→(\d+)", event):
                        apply("load", e[1], int(e[2]))
                    else:
                        e = re.fullmatch(r"evict (\w+)@(\d+)", event)
                        assert e, event
                        apply("evict", e[1], int(e[2]))
            assert len(slots) <= SLOTS
    assert served == N_REQUESTS and batches > N_REQUESTS // BATCH - 1
    assert removed is not None, out
    # 20 adapters through 8 slots: the bank must have had to evict.
    assert counts["evict"] > 0 and counts["load"] > SLOTS, counts
    summary = re.search(
        rf"Served {N_REQUESTS} requests in {batches} batches in \S+ s \(compilation "
        r"included\): (\d+) loads, (\d+) evictions, (\d+) removal\.",
        out,
    )
    assert summary, out
    assert tuple(map(int, summary.groups())) == (
        counts["load"],
        counts["evict"],
        counts["remove"],
    )
    assert counts["remove"] == 1


def test_bad_requests_are_refused_with_clear_errors(run):
    out, _ = run
    removed = re.search(r"bank\.remove\('(\w+)'\)", out)[1]
    assert re.search(
        rf"a request for {removed} now: KeyError: AdapterBank\.indices: no adapter "
        rf"named '{removed}'\..*add it with `bank\.add\(name, adapter\)`",
        out,
    ), out
    assert re.search(
        r"unknown name: KeyError: AdapterBank\.indices: no adapter named 'tenant1'\. "
        r"Did you mean 'tenant\d\d'",
        out,
    ), out
    assert (
        f"{SLOTS + 1} adapters in one batch: ValueError: AdapterBank.indices: this "
        f"batch uses {SLOTS + 1} distinct adapters, but the bank has {SLOTS} slots."
    ) in out, out
    assert "slots and events unchanged: True" in out, out
