"""Serving and training across processes, on JAX's own runtime.

The same programs as on one machine: a tensor-parallel model (column-parallel
up-projection, row-parallel down-projection over a `model` axis, the batch over a
`data` axis) serves per-row adapters from a stack and from an `AdapterBank`, and an
`AdapterTrainer` trains two tenants in one step. Every process runs the same
Python: it builds the global arrays it holds shards of
(`jax.make_array_from_callback` for weights, `jax.make_array_from_process_local_data`
for its slice of the batch), names the same adapters per row, and calls the same
jitted functions; XLA's collectives do the rest.

Run: `python examples/multi_process.py` launches 2 processes of 4 simulated CPU
devices each (gloo collectives) and a single-process reference on 4 devices, and
checks that every output is the same.

On a cluster, run the worker on every host instead (`jax.distributed.initialize()`
reads the coordinator and process ids from SLURM, TPU or Kubernetes environments):

    python examples/multi_process.py --worker --process-id $RANK \\
        --num-processes $WORLD --coordinator $HEAD:1234
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

D, F, B = 16, 24, 8
NAMES = ["n0", "n1", None, "n2", "n1", "n0", "n2", None]
TENANTS = ["n0", "n1", None, "n0", "n1", "n0", "n1", None]


def worker(process_id: int, num_processes: int, coordinator: str | None) -> dict:
    """One process's part; returns the (replicated) results."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    import jax

    if coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator, num_processes=num_processes, process_id=process_id
        )
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import lorax_arrays as lx

    auto = (jax.sharding.AxisType.Auto,) * 2
    n = len(jax.devices())
    data = 2 if n % 2 == 0 else 1
    mesh = jax.make_mesh((data, n // data), ("data", "model"), axis_types=auto)

    def global_array(x, spec):  # every process holds its shards of x
        x = np.asarray(x)
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    def my_rows(x):  # this process's slice of the batch, assembled globally
        x = np.asarray(x)
        n = len(x) // num_processes
        part = x[process_id * n : (process_id + 1) * n]
        sharding = NamedSharding(mesh, P("data"))
        return jax.make_array_from_process_local_data(sharding, part, x.shape)

    def on_host(x):  # replicated, so every process can read all of it
        full = jax.jit(lambda v: v, out_shardings=NamedSharding(mesh, P()))(x)
        return np.asarray(full.addressable_shards[0].data)

    rng = np.random.default_rng(0)
    host = {
        "up": rng.normal(size=(D, F)).astype(np.float32) / D**0.5,
        "down": rng.normal(size=(F, D)).astype(np.float32) / F**0.5,
    }
    params = {
        "up": global_array(host["up"], P(None, "model")),
        "down": global_array(host["down"], P("model", None)),
    }
    rules = [lx.LoraRule("up|down", 4)]
    adapters = []
    for i in range(3):
        fresh = lx.init_adapter(host, rules, key=jax.random.key(i))
        adapters.append(
            jax.tree.map(lambda a, i=i: np.asarray(a) + 0.1 * (i + 1), fresh)
        )
    x = my_rows(rng.normal(size=(B, D)).astype(np.float32))
    y = my_rows(rng.normal(size=(B, D)).astype(np.float32))

    def forward(p, x):
        return jax.nn.gelu(x @ p["up"]) @ p["down"]

    # Serving from a stack: the adapters replicated, the indices with the batch.
    stack = jax.tree.map(lambda a: global_array(a, P()), lx.stack_adapters(adapters))
    ids = my_rows(np.array([-1 if n is None else int(n[1]) for n in NAMES], np.int32))
    serve = jax.jit(lambda p, s, i, x: lx.quaxify(forward)(lx.loraify(p, s, i), x))
    from_stack = on_host(serve(params, stack, ids, x))

    # Serving from a bank: every process makes the same loads, in the same order.
    bank = lx.AdapterBank(params, rules, slots=4)
    for i, adapter in enumerate(adapters):
        bank.add(f"n{i}", adapter)
    step = jax.jit(lambda p, s, x: lx.quaxify(forward)(lx.loraify(p, s), x))
    from_bank = on_host(step(params, bank.served(bank.indices(NAMES)), x))

    # Training two tenants in one step.
    def loss_fn(tree, batch):
        x, y = batch
        return jnp.mean((forward(tree, x) - y) ** 2, axis=-1)

    trainer = lx.AdapterTrainer(params, rules, slots=2, optimizer=optax.adam(1e-2))
    trainer.add("n0", adapters[0])
    trainer.add("n1", adapters[1])
    for _ in range(2):
        losses = trainer.step(loss_fn, (x, y), TENANTS)
    trained = on_host(trainer.adapter("n0").weights["up"][1])
    return {
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "stack": from_stack.tolist(),
        "bank": from_bank.tolist(),
        "losses": {k: float(v) for k, v in losses.items()},
        "trained": trained.tolist(),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(args: list[str], timeout: int = 300) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"a worker failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main(num_processes: int = 2, reference: dict | None = None) -> dict:
    """Launches the processes (and, unless `reference` is given, a reference
    process); returns the comparison."""
    import numpy as np

    coordinator = f"localhost:{_free_port()}"
    procs = [
        _run([
            "--process-id", str(i),
            "--num-processes", str(num_processes),
            "--coordinator", coordinator,
        ])
        for i in range(num_processes)
    ]  # fmt: skip
    if reference is None:
        reference = _result(_run(["--process-id", "0", "--num-processes", "1"]))
    results = [_result(p) for p in procs]
    worst = 0.0
    for r in results:
        assert r["processes"] == num_processes, r["processes"]
        for key in ("stack", "bank", "trained"):
            worst = max(
                worst, float(np.max(np.abs(np.subtract(r[key], reference[key]))))
            )
        for name, loss in r["losses"].items():
            worst = max(worst, abs(loss - reference["losses"][name]))
    print(
        f"{num_processes} processes x {results[0]['devices'] // num_processes} devices "
        f"against 1 process x {reference['devices']} devices: stack, bank and "
        f"trainer outputs agree to {worst:.2e}"
    )
    return {
        "worst": worst,
        "processes": num_processes,
        "devices": results[0]["devices"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", default=None)
    args = parser.parse_args()
    if args.worker:
        out = worker(args.process_id, args.num_processes, args.coordinator)
        print(json.dumps(out))
    else:
        summary = main(args.num_processes)
        print(json.dumps(summary))
        if summary["worst"] > 1e-5:
            raise SystemExit("the processes disagree with the reference")
