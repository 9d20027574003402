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
jax.config.update(
    "jax_disable_most_optimizations",
    os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "1") not in ("0", "false"),
)

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
