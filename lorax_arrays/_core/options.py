"""The options a `BatchedLoraArray` carries: which strategy computes its low-rank
term. The strategies themselves are `lorax_arrays._rules.strategies`."""

from __future__ import annotations

STRATEGIES = ("auto", "gather", "segment", "dense")


def check_strategy(strategy: str) -> str:
    """`strategy` if it names a strategy, else a `ValueError` listing them."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}."
        )
    return strategy
