"""Interleaved timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import numpy as np


def interleaved(variants: dict, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each variant, timed interleaved: every round
    runs each once, in a fresh random order (a variant that runs right after a
    heavy one pays for the memory it freed; shuffling spreads that cost).
    `variants` maps a name to a thunk, or to `(run, warm)` where `warm()`
    compiles what `run()` needs; a thunk is warmed by calling it."""
    variants = {k: v if isinstance(v, tuple) else (v, v) for k, v in variants.items()}
    for _, warm in variants.values():
        warm()
    times = {k: [] for k in variants}
    order = np.random.default_rng(seed)
    for _ in range(repeats):
        for name in order.permutation(list(variants)):
            t = time.perf_counter()
            variants[name][0]()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
