"""Train two adapters in one batch, checkpoint them with orbax, resume exactly.

A small Equinox MLP (frozen, written with no knowledge of LoRA) gets two LoRA
adapters, "task_a" and "task_b", each learning its own target: the base model with
a different low-rank change to its weights. Every batch mixes rows of both tasks,
plus a few rows served by the base model itself (index -1, whose target is the
base model's own output: their loss stays at rounding level). One jitted optax
(Adam) step trains both adapters at once; each adapter's gradient comes only from
its own rows.

Every `--save-every` steps the adapters (the whole `AdapterStack`) and the
optimiser state go into an orbax `CheckpointManager` (keeping `--max-to-keep`
checkpoints); the step is the checkpoint's number, and each step's batch is drawn
from that step number, so nothing else is needed to resume. After step k the run
goes on to step k + 1 uninterrupted. Then, as a new process would, we build fresh
state, restore the latest checkpoint (k) into its abstract shape, take step k + 1
and check that the adapters, the optimiser state and the loss are bit-identical to
the uninterrupted run's.

Run: python examples/train_checkpoint.py [--steps 500] [--save-every 100]
     [--max-to-keep 2] [--ckpt-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import orbax.checkpoint as ocp

import lorax_arrays as lx

NAMES = ("task_a", "task_b")


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 16  # MLP input and output size
    width: int = 64  # hidden width
    rank: int = 4  # adapter rank
    teacher_rank: int = 1  # rank of each task's change to the weights
    rows: int = 28  # rows per adapter in each batch
    base_rows: int = 8  # rows served by the base model
    lr: float = 1e-2
    seed: int = 0

    @property
    def indices(self) -> np.ndarray:
        """Which adapter each row of a batch uses (-1: the base model)."""
        return np.asarray([0, 1] * self.rows + [-1] * self.base_rows, dtype=np.int32)


QUICK = Config(dim=8, width=16, rank=2, rows=16, base_rows=2, lr=3e-2)


class Task(eqx.Module):
    """What stays fixed during training: the frozen model and the data source."""

    model: eqx.nn.MLP  # the frozen base model
    teachers: tuple[eqx.nn.MLP, ...]  # one target model per adapter
    indices: jax.Array
    data_key: jax.Array

    def batch(self, step):
        """Step `step`'s batch: inputs, and each row's target from its teacher."""
        dim = self.model.in_size
        xs = jr.normal(jr.fold_in(self.data_key, step), (len(self.indices), dim))
        outs = [jax.vmap(m)(xs) for m in (*self.teachers, self.model)]
        # Row i's target: teacher indices[i], or the base model for -1.
        ys = jnp.stack(outs)[self.indices, jnp.arange(len(self.indices))]
        return xs, ys


def make_model(cfg: Config) -> eqx.nn.MLP:
    key = jr.fold_in(jr.key(cfg.seed), 0)
    return eqx.nn.MLP(cfg.dim, cfg.dim, cfg.width, 2, activation=jnp.tanh, key=key)


def make_teacher(model: eqx.nn.MLP, key, rank: int) -> eqx.nn.MLP:
    """The base model with a random rank-`rank` change to every weight."""
    weights = []
    for layer, k in zip(model.layers, jr.split(key, len(model.layers))):
        out, inp = layer.weight.shape
        ku, kv = jr.split(k)
        u = jr.normal(ku, (out, rank)) / np.sqrt(rank)
        v = jr.normal(kv, (rank, inp)) / np.sqrt(inp)
        weights.append(layer.weight + 0.7 * u @ v)
    return eqx.tree_at(lambda m: [lay.weight for lay in m.layers], model, weights)


def rules(cfg: Config) -> list[lx.LoraRule]:
    return [lx.LoraRule(r"layers/\d/weight", rank=cfg.rank, alpha=2.0 * cfg.rank)]


def make_task(cfg: Config) -> Task:
    """The frozen part, rebuilt the same way by every process (from the seed)."""
    model = make_model(cfg)
    key = jr.key(cfg.seed)
    teachers = tuple(
        make_teacher(model, jr.fold_in(key, 10 + j), cfg.teacher_rank)
        for j in range(len(NAMES))
    )
    return Task(
        model=model,
        teachers=teachers,
        indices=jnp.asarray(cfg.indices),
        data_key=jr.fold_in(key, 1),
    )


def init_stack(cfg: Config, model: eqx.nn.MLP) -> lx.AdapterStack:
    key = jr.fold_in(jr.key(cfg.seed), 2)
    adapters = [
        lx.init_adapter(model, rules(cfg), key=jr.fold_in(key, j))
        for j in range(len(NAMES))
    ]
    return lx.stack_adapters(adapters, names=NAMES)


def init_state(cfg: Config, model: eqx.nn.MLP, opt) -> dict[str, Any]:
    """Fresh adapters (B = 0) and a fresh optimiser state for their factors."""
    stack = init_stack(cfg, model)
    trainable, _ = eqx.partition(stack, lx.adapter_mask(stack))
    return {"adapters": stack, "opt_state": opt.init(trainable)}


def make_step(opt):
    """One jitted training step, compiled anew for each optimiser (each process)."""

    @eqx.filter_jit
    def train_step(state, step, task: Task):
        """Step number `step`: returns the new state and each adapter's loss."""
        stack = state["adapters"]
        trainable, frozen = eqx.partition(stack, lx.adapter_mask(stack))
        xs, ys = task.batch(step)

        def loss_fn(trainable):
            stack = eqx.combine(trainable, frozen)
            served = lx.loraify(task.model, stack, task.indices)
            out = lx.quaxify(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))(served, xs)
            row = jnp.mean((out - ys) ** 2, axis=-1)
            # Mean squared error of each adapter's rows, then of the base rows.
            groups = [task.indices == j for j in (*range(len(NAMES)), -1)]
            per = jnp.stack([jnp.sum(row, where=g) / jnp.sum(g) for g in groups])
            return jnp.sum(per[:-1]), per

        (_, per), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = opt.update(grads, state["opt_state"], trainable)
        stack = eqx.combine(eqx.apply_updates(trainable, updates), frozen)
        return {"adapters": stack, "opt_state": opt_state}, per

    return train_step


def compare(a: Any, b: Any) -> tuple[bool, float]:
    """Whether two pytrees are bit-identical (same structure, every leaf equal),
    and the largest absolute difference between their leaves."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False, float("inf")
    equal, worst = True, 0.0
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, float("inf")
        equal &= bool(np.array_equal(x, y))
        if x.size:
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            worst = max(worst, float(diff.max()))
    return equal, worst


def open_manager(directory: Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any]) -> None:
    """Saves the adapters and the optimiser state as checkpoint `step` (async)."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            adapters=ocp.args.StandardSave(state["adapters"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
        ),
    )


def restore(
    directory: Path, cfg: Config, opt, step: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Restores checkpoint `step` (default: the latest) as a new process would.

    The target is the abstract shape of freshly initialised state, from
    `jax.eval_shape` (nothing is allocated). Its structure carries the stack's
    static fields (layouts, ranks, names) and optax's state types, so orbax only
    has to fill in the arrays.
    """
    model = make_model(cfg)
    abstract = jax.eval_shape(lambda: init_state(cfg, model, opt))
    mngr = open_manager(directory)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {directory}.")
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(abstract["adapters"]),
            opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
        ),
    )
    mngr.close()
    state = {"adapters": restored.adapters, "opt_state": restored.opt_state}
    # Back come the same types, holding jax arrays (ready for `lx.loraify`) ...
    if not isinstance(state["adapters"], lx.AdapterStack) or not all(
        isinstance(x, jax.Array) for x in jax.tree.leaves(state)
    ):
        raise TypeError(f"restored an unexpected tree: {state}")
    # ... and Adam's update count, a check that this is step `step`'s state.
    count = int(optax.tree_utils.tree_get(state["opt_state"], "count"))
    if count != step:
        raise ValueError(f"checkpoint {step} holds Adam's state after {count} steps")
    return step, state


def _format(per) -> str:
    per = np.asarray(per)
    cols = [f"{n} {v:.5f}" for n, v in zip(NAMES, per)]
    return "  ".join([*cols, f"base rows {per[-1]:.1g}"])


def train(args, cfg: Config, directory: Path):
    """The uninterrupted run: steps 1..k, saving on the way, then step k + 1."""
    task = make_task(cfg)
    opt = optax.adam(cfg.lr)
    state = init_state(cfg, task.model, opt)
    train_step = make_step(opt)
    mngr = open_manager(directory, args.max_to_keep)
    if mngr.all_steps():
        sys.exit(
            f"{directory} already holds checkpoints {mngr.all_steps()}; pass a new "
            "or empty --ckpt-dir."
        )
    k = args.steps
    print(
        f"MLP {cfg.dim}->{cfg.width}->{cfg.width}->{cfg.dim}, adapters {NAMES} of "
        f"rank {cfg.rank}; each batch: {cfg.rows} rows per adapter and "
        f"{cfg.base_rows} base rows."
    )
    print(
        "loss: mean squared error of each adapter's rows (and of the base rows), "
        "averaged over the steps since the line before"
    )
    print("compiling…", flush=True)
    t0 = time.perf_counter()
    window, history = [], []
    for step in range(1, k + 1):
        state, per = train_step(state, jnp.int32(step), task)
        window.append(np.asarray(per))
        if step == 1:
            print(f"compiled and ran step 1 in {time.perf_counter() - t0:.2f} s")
        if step == 1 or step % args.print_every == 0 or step == k:
            history.append(np.mean(window, axis=0))
            window = []
            print(f"step {step:4d}  {_format(history[-1])}", flush=True)
        if step % args.save_every == 0 or step == k:
            save(mngr, step, state)
    mngr.wait_until_finished()  # saving is asynchronous
    print(
        f"trained {k} steps in {time.perf_counter() - t0:.2f} s; checkpoints kept: "
        f"{mngr.all_steps()}"
    )
    mngr.close()
    # The uninterrupted run goes on: step k + 1.
    state, per = train_step(state, jnp.int32(k + 1), task)
    print(f"step {k + 1:4d}  {_format(per)}  (uninterrupted, this step alone)")
    return history, state, per


def resume(directory: Path, cfg: Config, step: int | None = None, n_steps: int = 1):
    """A new process: rebuild everything, restore, take `n_steps` more steps."""
    task = make_task(cfg)
    opt = optax.adam(cfg.lr)
    start, state = restore(directory, cfg, opt, step)
    train_step = make_step(opt)  # a fresh jit: this process compiles its own
    per = None
    for s in range(start + 1, start + n_steps + 1):
        state, per = train_step(state, jnp.int32(s), task)
    return start, state, per


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="k (default 500; 20 with --quick)")
    parser.add_argument("--save-every", type=int, help="default 100; 5 with --quick")
    parser.add_argument("--max-to-keep", type=int, default=2)
    parser.add_argument("--print-every", type=int, help="default 50; 5 with --quick")
    parser.add_argument(
        "--ckpt-dir", type=Path, help="default: a temporary directory, removed after"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    defaults = (20, 5, 5) if args.quick else (500, 100, 50)
    for name, default in zip(("steps", "save_every", "print_every"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)

    with tempfile.TemporaryDirectory(prefix="lorax_ckpt_") as tmp:
        directory = args.ckpt_dir if args.ckpt_dir is not None else Path(tmp)
        print(f"checkpoints in {directory}")
        history, state, per = train(args, cfg, directory)

        print("restoring the latest checkpoint into fresh state; compiling…")
        start, r_state, r_per = resume(directory, cfg)

    first, last = history[0], history[-1]
    for j, name in enumerate(NAMES):
        if not last[j] < 0.5 * first[j]:
            raise SystemExit(f"{name} did not learn: loss {first[j]} -> {last[j]}")
    if max(h[-1] for h in history) > 1e-10:
        raise SystemExit("the base rows did not see the base model")

    equal, worst = compare((r_state, r_per), (state, per))
    print(f"step {start + 1:4d}  {_format(r_per)}  (restored from step {start})")
    print(
        f"restored step {start + 1} equals the uninterrupted run: {equal} "
        f"(max |diff| {worst})"
    )
    if not equal:
        raise SystemExit("the resumed step differs from the uninterrupted run")
    return equal


if __name__ == "__main__":
    main()
