"""Test configuration: default float32 JAX, a fast deterministic hypothesis profile.

`HYPOTHESIS_PROFILE=thorough` runs many more random examples (slow; for bug hunts).
"""

import os

import jax
from hypothesis import settings

# Keep JAX's default float32 (x64 off): the references are float64 NumPy.
jax.config.update("jax_enable_x64", False)

# 15 fixed (derandomized) examples per property test keep the whole suite under 6
# minutes on CI's 2 cores; `HYPOTHESIS_PROFILE=thorough` draws 400 fresh ones.
settings.register_profile(
    "ci", max_examples=15, deadline=None, derandomize=True, print_blob=True
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, derandomize=False, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
