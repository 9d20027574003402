"""Batched multi-LoRA under `jax.jit` with `NamedSharding` over a device mesh.

The batch is split over a `data` axis, the base weights over a `model` axis
(column-parallel up-projection, row-parallel down-projection, Megatron style); the
adapters are either replicated or split along with the base weight axis they share.
Nothing in the model or the rewrite knows about sharding: XLA's SPMD partitioner
places the low-rank term next to the base product.

Checks: the sharded outputs equal a single-device run, and the compiled program
never all-gathers a base weight.

Without accelerators this simulates 8 CPU devices (it sets XLA_FLAGS before JAX
starts). Multi-host: call `jax.distributed.initialize()` first on every host; the
same code then runs over the global mesh (build inputs with
`jax.make_array_from_process_local_data`).

Run: python examples/sharded_serving.py
"""

from __future__ import annotations

import os
import re

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import lorax_arrays as lx  # noqa: E402

D_MODEL, D_FF, LAYERS, BATCH, SEQ = 48, 160, 2, 8, 6


def mlp(params, x):
    def layer(h, p):
        return h + jax.nn.gelu(h @ p["w_up"]) @ p["w_down"], None

    return jax.lax.scan(layer, x, params)[0]


def build(key):
    k1, k2, k3, k4 = jr.split(key, 4)
    params = {
        "w_up": jr.normal(k1, (LAYERS, D_MODEL, D_FF)) / D_MODEL**0.5,
        "w_down": jr.normal(k2, (LAYERS, D_FF, D_MODEL)) / D_FF**0.5,
    }
    adapters = []
    for i, r in enumerate([2, 4, 8]):
        rules = [lx.LoraRule("w_", rank=r, alpha=2 * r, stack_axes=0)]
        ad = lx.init_adapter(params, rules, key=jr.fold_in(k3, i))
        leaves, tree = jax.tree.flatten(ad)
        ks = jr.split(jr.fold_in(k4, i), len(leaves))
        leaves = [x + 0.1 * jr.normal(k, x.shape) for x, k in zip(leaves, ks)]
        adapters.append(jax.tree.unflatten(tree, leaves))
    stack = lx.stack_adapters(adapters)
    indices = jnp.array([0, 2, -1, 1, 1, 0, -1, 2])
    x = jr.normal(jr.fold_in(key, 9), (BATCH, SEQ, D_MODEL))
    return params, stack, indices, x


def shardings(mesh, served, split_adapters: bool):
    """A NamedSharding for every leaf of the loraified tree."""
    up = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731

    def for_array(path_name, lora):
        # w_up: (L, d_model, d_ff), out (d_ff) split over "model";
        # w_down: (L, d_ff, d_model), in (d_ff) split over "model".
        if path_name == "w_up":
            w = up(None, None, "model")
            a = up()  # a: (L, n, d_model, r)
            b = up(None, None, None, "model") if split_adapters else up()
        else:
            w = up(None, "model", None)
            a = up(None, None, "model", None) if split_adapters else up()
            b = up()  # b: (L, n, r, d_model)
        return _same_structure(lora, w, a, b, up(), up("data"))

    return {k: for_array(k, v) for k, v in served.items()}


def _same_structure(lora, w, a, b, scale, indices):
    """The loraified leaf with its arrays replaced by shardings (a pytree prefix)."""
    leaves, tree = jax.tree.flatten(lora)
    # BatchedLoraArray leaves, in field order: w, a, b, scale, indices.
    return jax.tree.unflatten(tree, [w, a, b, scale, indices][: len(leaves)])


def base_weight_gathers(hlo: str) -> list[str]:
    """The all-gather instructions in compiled HLO whose result is a whole base
    weight (one layer or the stack), in either orientation."""
    shapes = (f"{D_MODEL},{D_FF}]", f"{D_FF},{D_MODEL}]")
    lines = re.findall(r"[^\n]*all-gather[^\n]*", hlo)
    return [ln for ln in lines if any(s in ln.split("all-gather")[0] for s in shapes)]


def main(verbose: bool = True):
    n_dev = len(jax.devices())
    if n_dev < 8:
        raise SystemExit(f"needs 8 devices, found {n_dev}")
    # Auto axes: the classic jit + NamedSharding (GSPMD) mode. (JAX's explicit
    # sharding mode is not supported yet: its gathers need `out_sharding`s.)
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
    params, stack, indices, x = build(jr.PRNGKey(0))
    served = lx.loraify(params, stack, indices)
    forward = lx.quaxify(mlp)
    one_device = jax.device_put((served, x), jax.devices()[0])
    print("Compiling the single-device reference…", flush=True)
    expected = np.asarray(jax.jit(forward)(*one_device))

    results = {}
    for split in (False, True):
        in_sh = (shardings(mesh, served, split), NamedSharding(mesh, P("data")))
        args = jax.device_put((served, x), in_sh)
        f = jax.jit(forward, in_shardings=in_sh, out_shardings=in_sh[1])
        out = f(*args)
        hlo = f.lower(*args).compile().as_text()
        gathered = [
            m
            for m in re.findall(r"all-gather[^\n]*", hlo)
            if f"{D_MODEL},{D_FF}]" in m or f"{D_FF},{D_MODEL}]" in m
        ]
        err = float(np.max(np.abs(np.asarray(out) - expected)))
        results[split] = (err, len(gathered))
        if verbose:
            kind = "split with the base weight" if split else "replicated"
            print(
                f"adapters {kind}: max |sharded - single device| = {err:.1e}, "
                f"all-gathers of a base weight: {len(gathered)}"
            )
            print(f"  output sharding: {out.sharding.spec}")
    return results


if __name__ == "__main__":
    res = main()
    bad = {k: v for k, v in res.items() if v[0] > 1e-4 or v[1] > 0}
    if bad:
        raise SystemExit(f"sharded run differs or gathers the base weight: {bad}")
