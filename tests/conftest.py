"""Test configuration: default float32 JAX, a fast deterministic hypothesis profile.

`HYPOTHESIS_PROFILE=thorough` runs many more random examples (slow; for bug hunts).
"""

import os

import jax
from hypothesis import settings

# Keep JAX's default float32 (x64 off): the references are float64 NumPy.
jax.config.update("jax_enable_x64", False)

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, derandomize=False, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
