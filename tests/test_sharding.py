"""Sharded serving on 8 simulated CPU devices: equal to one device, and no
all-gather of a base weight. Runs in a subprocess, which sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
sys.path.insert(0, "examples")
import sharded_serving as ex  # sets XLA_FLAGS before importing jax
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

results = ex.main(verbose=False)
# Negative control: a program that does gather a base weight is caught.
mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
w = jnp.ones((ex.D_MODEL, ex.D_FF))
w = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
f = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P()))
control = len(ex.base_weight_gathers(f.lower(w).compile().as_text()))
results = {str(k): v for k, v in results.items()}
report = {"devices": len(jax.devices()), "results": results, "control": control}
print(json.dumps(report))
"""


def test_sharded_serving_matches_single_device_without_gathering_weights():
    # Compiled as the rest of the suite is (tests/conftest.py): the partitioner,
    # which decides what is gathered, runs whatever the optimisation level.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for split, (err, gathers) in report["results"].items():
        assert err < 1e-4, (split, err)
        assert gathers == 0, (split, gathers)
    assert report["control"] > 0, "the all-gather check cannot see a gathered weight"
