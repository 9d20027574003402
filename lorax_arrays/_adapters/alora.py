"""Activated LoRA (aLoRA; PEFT's `alora_invocation_tokens`): an adapter that
applies to a request only from the last occurrence of its invocation sequence on.
The tokens before it see the base model, so a serving engine can reuse their KV
cache across adapters. Per-token indices say exactly that: `-1` before the
invocation, the adapter from its first token to the end. `AdapterStack.indices`
and `AdapterBank.indices` build them when given `input_ids`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def check_invocation_tokens(tokens: Any, what: str) -> tuple[int, ...] | None:
    """`tokens` as a tuple of token ids, or None; anything else is an error."""
    if tokens is None:
        return None
    ok = (
        isinstance(tokens, (list, tuple))
        and len(tokens) > 0
        and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0
            for t in tokens
        )
    )
    if not ok:
        raise ValueError(
            f"{what}: invocation_tokens is {tokens!r}; expected a non-empty list of "
            "token ids (ints >= 0), as PEFT's `alora_invocation_tokens`, or None."
        )
    return tuple(int(t) for t in tokens)


def activation_start(row: np.ndarray, tokens: tuple[int, ...]) -> int:
    """Where the adapter starts in one request's tokens: the start of the last
    complete occurrence of `tokens`, else `len(row)` (nowhere), as PEFT's
    `calculate_alora_offsets`."""
    n, k = len(row), len(tokens)
    want = np.asarray(tokens)
    for start in range(n - k, -1, -1):
        if np.array_equal(row[start : start + k], want):
            return start
    return n


def require_input_ids(
    entries: Sequence[Any], tokens: Sequence[tuple[int, ...] | None], what: str
) -> None:
    """Refuses per-request indices for a batch that names an activated LoRA
    (`tokens[i]` the invocation of `entries[i]`'s adapter, or None): only the
    tokens say where it starts."""
    activated = [e for e, t in zip(entries, tokens) if t is not None]
    if activated:
        raise ValueError(
            f"{what}: {activated[0]!r} is an activated LoRA (invocation_tokens): it "
            "applies from its invocation sequence on, which only the tokens show. "
            "Pass `input_ids=` (the batch's tokens) for per-token indices; for "
            "decode steps after that prompt use their last column."
        )


def concrete_input_ids(input_ids: Any, n_rows: int, what: str) -> np.ndarray:
    """`input_ids` as a `(batch, seq)` integer NumPy array with `n_rows` rows."""
    if isinstance(input_ids, jax.core.Tracer):
        raise TypeError(
            f"{what}: input_ids is traced (inside jit); the invocation sequence is "
            "searched on the host, once per batch, before the step: pass the "
            "concrete token ids."
        )
    ids = np.asarray(input_ids)
    if (
        ids.ndim != 2
        or ids.shape[0] != n_rows
        or not np.issubdtype(ids.dtype, np.integer)
    ):
        raise ValueError(
            f"{what}: input_ids must be integer token ids of shape (batch, seq) with "
            f"one row per request ({n_rows}); got {ids.dtype} {ids.shape}."
        )
    return ids


def per_token(
    per_row: Sequence[Any],
    input_ids: np.ndarray,
    invocation: Callable[[int], tuple[int, ...] | None],
    base: Any,
) -> list[list[Any]]:
    """Each request's entry spread over its tokens: `base` before the activation
    of an aLoRA row (`invocation(i)` its tokens), the entry from there on; every
    token of the other rows."""
    seq = input_ids.shape[1]
    out = []
    for i, entry in enumerate(per_row):
        tokens = invocation(i)
        start = 0 if tokens is None else activation_start(input_ids[i], tokens)
        out.append([base] * start + [entry] * (seq - start))
    return out
