"""`examples/train_checkpoint.py`: two adapters trained in one batch, checkpointed
with orbax and resumed bit-exactly; and the example's equality check can fail."""

from __future__ import annotations

import importlib.util
import re
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import lorax_arrays as lx
from tests.scripts import ROOT, run_script as _run

QUICK_STEPS, SAVE_EVERY = 20, 5  # the example's --quick schedule
OLDER = QUICK_STEPS - SAVE_EVERY  # the other checkpoint kept (max_to_keep=2)
LINE = re.compile(
    r"^step\s+(\d+)\s+task_a (\S+)\s+task_b (\S+)\s+base rows (\S+)(.*)$", re.M
)


@pytest.fixture(scope="module")
def example():
    """The example as a module, for its helpers."""
    name = "train_checkpoint_example"
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "examples" / "train_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs the example with --quick in its own process; its checkpoints stay."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    out = _run(["examples/train_checkpoint.py", "--quick", "--ckpt-dir", str(ckpt)])
    return out, ckpt


def _quick_run_learns_and_resumes_exactly(quick_run):
    out, ckpt = quick_run
    lines = LINE.findall(out)
    training = [line for line in lines if not line[4].strip()]
    steps = [int(line[0]) for line in training]
    assert steps[0] == 1 and steps[-1] == QUICK_STEPS, out
    first, last = training[0], training[-1]
    for j in (1, 2):  # task_a, task_b: each adapter's own loss went down
        assert float(last[j]) < 0.5 * float(first[j]), out
    assert all(float(line[3]) < 1e-10 for line in lines), out  # base rows
    # The uninterrupted and the restored step k + 1 print the same losses.
    after = [line for line in lines if int(line[0]) == QUICK_STEPS + 1]
    assert len(after) == 2 and "uninterrupted" in after[0][4], out
    assert f"restored from step {QUICK_STEPS}" in after[1][4], out
    assert after[0][1:4] == after[1][1:4], out
    final = out.strip().splitlines()[-1]
    assert final == (
        f"restored step {QUICK_STEPS + 1} equals the uninterrupted run: True "
        "(max |diff| 0.0)"
    ), out
    # Saved at 5, 10, 15, 20; max_to_keep=2 kept the last two only.
    kept = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert kept == [OLDER, QUICK_STEPS], kept


@pytest.fixture(scope="module")
def stepper(example):
    """The frozen task, an optimiser and one jitted step, compiled once here."""
    cfg = example.QUICK
    opt = optax.adam(cfg.lr)
    train_step = example.make_step(opt)
    task = example.make_task(cfg)

    def step(state, n):
        return train_step(state, jnp.int32(n), task)

    return opt, step


@pytest.fixture(scope="module")
def reference(quick_run, example, stepper):
    """Step 21 from checkpoint 20, which the example checked against its run."""
    _, ckpt = quick_run
    opt, step = stepper
    start, state = example.restore(ckpt, example.QUICK, opt)
    assert start == QUICK_STEPS
    return step(state, start + 1)


def _resuming_from_either_checkpoint_gives_the_same_run(
    quick_run, example, stepper, reference
):
    """Steps 16..21 replayed from checkpoint 15 end bit-identical to checkpoint
    20 + step 21: the whole trajectory is reproducible."""
    _, ckpt = quick_run
    opt, step = stepper
    start, state = example.restore(ckpt, example.QUICK, opt, step=OLDER)
    assert start == OLDER
    for n in range(start + 1, QUICK_STEPS + 2):
        state, per = step(state, n)
    assert example.compare((state, per), reference) == (True, 0.0)
    # The restored stack is a usable AdapterStack (loraify ran on it above).
    assert isinstance(state["adapters"], lx.AdapterStack)
    assert state["adapters"].names == example.NAMES


def _the_equality_check_can_fail(quick_run, example, stepper, reference):
    _, ckpt = quick_run
    cfg = example.QUICK
    ref, ref_per = reference
    opt, train_step = stepper

    # An older checkpoint, stepped once: a true step 16, not step 21.
    step, state = example.restore(ckpt, cfg, opt, step=OLDER)
    state, per = train_step(state, step + 1)
    equal, worst = example.compare((state, per), reference)
    assert not equal and worst > 0

    # The right adapters but a fresh optimiser state: the loss of step 21 (taken
    # before the update) agrees, the updated adapters do not.
    step, state = example.restore(ckpt, cfg, opt)
    assert step == QUICK_STEPS
    # (Adam's initial state is all zeros; zeros_like keeps the restored arrays'
    # placement, so the step is not compiled again.)
    state["opt_state"] = jax.tree.map(jnp.zeros_like, state["opt_state"])
    state, per = train_step(state, step + 1)
    assert example.compare(per, ref_per) == (True, 0.0)
    equal, worst = example.compare(state["adapters"], ref["adapters"])
    assert not equal and worst > 0

    # The right state but the wrong step number: another batch, another update.
    step, state = example.restore(ckpt, cfg, opt)
    state, per = train_step(state, step)
    equal, worst = example.compare((state, per), reference)
    assert not equal and worst > 0

    # A structure mismatch (here, a leaf missing) never counts as equal.
    assert example.compare((1.0, 2.0), (1.0,)) == (False, float("inf"))


def _refuses_a_directory_that_holds_checkpoints(quick_run, example):
    _, ckpt = quick_run
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        example.main(["--quick", "--ckpt-dir", str(ckpt)])


def test_train_checkpoint_example(quick_run, example, stepper, reference):
    """One test, so that the example's run and its compiled step are made once
    (pytest-xdist would otherwise build the module's fixtures on each worker)."""
    _quick_run_learns_and_resumes_exactly(quick_run)
    _resuming_from_either_checkpoint_gives_the_same_run(
        quick_run, example, stepper, reference
    )
    _the_equality_check_can_fail(quick_run, example, stepper, reference)
    _refuses_a_directory_that_holds_checkpoints(quick_run, example)
