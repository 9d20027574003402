"""Bytes per device of a tensor-parallel model and its `AdapterBank`, on 1, 2, 4 and
8 devices: the bank's slots are sharded like the weights they adapt, so its share
per device falls as the base's does.

The model is a stack of column-parallel up-projections and row-parallel
down-projections (Megatron style) over a `model` axis; the bank holds `slots`
adapters at rank `rank` on every projection. For each device count, the largest
number of bytes any one device holds of the base weights and of the bank's arrays
(factors and scales), against the unsharded bank (all on one device).

Run: python -m benchmarks.sharded_memory            # 8 simulated CPU devices
     python -m benchmarks.sharded_memory --quick    # toy sizes (the tests)
"""

from __future__ import annotations

import argparse
import json
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import lorax_arrays as lx  # noqa: E402


def per_device(arrays) -> int:
    """The most bytes any one device holds of `arrays`."""
    held: dict = {}
    for x in jax.tree.leaves(arrays):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def measure(devices: int, layers: int, d: int, f: int, slots: int, rank: int):
    mesh = jax.make_mesh(
        (devices,),
        ("model",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:devices],
    )
    params = {}
    for i in range(layers):
        up = jnp.zeros((d, f), jnp.bfloat16)
        down = jnp.zeros((f, d), jnp.bfloat16)
        params[f"layer{i}"] = {
            "up": jax.device_put(up, NamedSharding(mesh, P(None, "model"))),
            "down": jax.device_put(down, NamedSharding(mesh, P("model", None))),
        }
    bank = lx.AdapterBank(params, [lx.LoraRule("up|down", rank)], slots=slots)
    state = bank.served()  # the bank's arrays as a step gets them (no copies)
    arrays = [state.factors, state.scales, state.head_scales]
    return per_device(params), per_device(arrays), bank.nbytes


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes")
    args = parser.parse_args(argv)
    if args.quick:
        sizes = dict(layers=2, d=64, f=256, slots=8, rank=8)
    else:
        sizes = dict(layers=8, d=1024, f=4096, slots=64, rank=16)
    rows = []
    for n in (1, 2, 4, 8):
        base, bank, total = measure(n, **sizes)
        rows.append({"devices": n, "base": base, "bank": bank, "bank_total": total})
    one = rows[0]
    print(
        f"{sizes['layers']} layers of {sizes['d']}x{sizes['f']} (bf16), "
        f"a bank of {sizes['slots']} slots at rank {sizes['rank']}:\n"
    )
    print(
        "| devices | base MiB / device | bank MiB / device | base share | bank share |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['devices']} | {r['base'] / 2**20:.2f} | {r['bank'] / 2**20:.2f} | "
            f"{r['base'] / one['base']:.3f} | {r['bank'] / one['bank']:.3f} |"
        )
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
