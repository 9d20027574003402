"""Test configuration: default float32 JAX, a fast deterministic hypothesis profile.

`HYPOTHESIS_PROFILE=thorough` runs many more random examples (slow; for bug hunts).
"""

import importlib.metadata
import os
import sys

import jax
from hypothesis import settings

# Keep JAX's default float32 (x64 off): the references are float64 NumPy.
jax.config.update("jax_enable_x64", False)

# Compile without most of XLA's optimisation passes: they only make programs
# faster (never change what they compute), and at the tests' toy sizes compiling
# is most of the time: the suite runs in about half the time. The subprocesses of
# tests/scripts.py do the same. `JAX_DISABLE_MOST_OPTIMIZATIONS=0` runs the suite
# fully optimised, as users compile.
FAST_COMPILES = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "1") not in (
    "0",
    "false",
)
jax.config.update("jax_disable_most_optimizations", FAST_COMPILES)


def _legacy_cpu_emitters() -> bool:
    """jaxlib 0.10's XLA:CPU generates fused kernels with its new MLIR emitters,
    which take about twice the compile time of the older ones at the tests' sizes
    (the same HLO, so the same computation). `--xla_cpu_use_fusion_emitters=false`
    selects the older ones there; the flag is gone by jaxlib 0.12, and XLA aborts
    on a flag it does not know, so only the 0.10 series gets it."""
    version = importlib.metadata.version("jaxlib").split(".")
    return FAST_COMPILES and version[:2] == ["0", "10"]


# Before the backend starts (the first compile); subprocesses inherit it.
if _legacy_cpu_emitters() and "xla_cpu_use_fusion_emitters" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false"
    ).strip()

# 10 fixed (derandomized) examples per property test keep the whole suite under 6
# minutes on CI's 2 cores; `HYPOTHESIS_PROFILE=thorough` draws 400 fresh ones.
settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=True, print_blob=True
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, derandomize=False, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    """The versions under test, so each CI leg's log says which it ran."""
    names = ["jax", "jaxlib", "flax", "equinox", "quax", "optax", "orbax-checkpoint"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"lorax_arrays under Python {sys.version.split()[0]}: " + ", ".join(found)


# The files with the longest single tests (scripts run in quick mode, doc pages,
# one big model compiled per test), longest first. They run first, so that the
# two workers share them out while there is still plenty left to balance with,
# instead of one worker finishing a 20-second test after the other is idle.
# Whole files move, so module-scoped fixtures still serve contiguous tests.
RUN_FIRST = [
    "test_serving_benchmark.py",
    "test_docs_and_examples.py",
    "test_continuous_benchmark.py",
    "test_sharding.py",
    "test_peft_ports.py",
    "test_nnx_families.py",
    "test_train_checkpoint.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    # sorted() is stable: within a file, and for every other file, the order holds.
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))
