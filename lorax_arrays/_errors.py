"""Exception types raised by lorax_arrays."""


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
