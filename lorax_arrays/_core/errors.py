"""Every exception type lorax_arrays raises, in one place; each is exported as
`lorax_arrays.<Name>` (`tests/test_errors_api.py` raises each through the public
API and catches it by that name)."""

from __future__ import annotations

from typing import Any


class UnsupportedOperationError(NotImplementedError):
    """An operation met a BatchedLoraArray that has no low-rank rule for it."""


class LoraIndexError(IndexError):
    """An adapter index is outside `[-1, n_adapters - 1]`."""


class StaleIndicesError(LoraIndexError):
    """Indices from `AdapterBank.indices` used after the adapter they were issued
    for left its slot (evicted, removed, updated to a new version), or with a bank
    that did not issue them."""


class IndicesShapeError(ValueError):
    """The activation's leading axes do not line up with the adapter indices."""


class CheckpointError(ValueError):
    """A saved adapter checkpoint is missing, incomplete, corrupted or not ours."""


class NonFiniteAdapterError(ValueError):
    """An adapter holds NaN or infinite values (a factor, a variant's vector, or
    its alpha): corrupt or diverged. Refused wherever adapters enter the library."""


class PeftFormatError(ValueError):
    """A PEFT directory that cannot be loaded faithfully: an unsupported feature,
    an inconsistent config, or a key or module that has no place in the tree."""


class QuaxifyMissingError(TypeError):
    """A `BatchedLoraArray` was used as a plain array, outside `lx.quaxify`."""


class UnsetIndicesError(ValueError):
    """Raised when a BatchedLoraArray is used before its indices are set."""

    @classmethod
    def for_array(cls, lora: Any) -> UnsetIndicesError:
        return cls(
            f"This BatchedLoraArray (weight shape {tuple(lora.shape)}) has no "
            "indices: say which adapter each example uses with "
            "`tree = lx.with_indices(tree, indices)` (or `lx.loraify(tree, "
            "adapters, indices)`); use -1 for rows that should see the base "
            "weight alone."
        )


class LayoutError(ValueError):
    """A layout change that would break the low-rank form; says why."""


class RowsNeededError(UnsupportedOperationError):
    """A grouped matmul with per-row adapters met rows without their positions.
    `lx.quaxify` catches it to trace again with the arguments tagged; what
    reaches a user is an `UnsupportedOperationError` saying why."""


class CarryLostRowsError(Exception):
    """A `lax.scan` body lost the row positions of carry `k`: the loop is traced
    again with that carry plain (internal to `_rules/control.py`)."""

    def __init__(self, k: int):
        super().__init__(k)
        self.k = k


class SafetensorsError(ValueError):
    """A `.safetensors` file that cannot be read as written."""


class UnknownAdapterError(KeyError):
    """A name an `AdapterBank` does not know. A `KeyError` whose `str` is its message (a
    plain `KeyError` prints the repr of its argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
