"""The typed record of one PEFT module on its way to a tree leaf."""

from __future__ import annotations

import dataclasses

import numpy as np

# A module's place among the entries of a leaf's leading stack axes: `(layer,)` in
# a layer stack, `(entry,)` in a fused kernel (q, k, v of a `(3, N, D, H)` QKV
# kernel), `(layer, entry)` in a stack of fused kernels.
Entry = tuple[int, ...]
# A module weight's `(in_axes, out_axes)`, axes of the weight after the entries.
Groups = tuple[tuple[int, ...], tuple[int, ...]]


@dataclasses.dataclass
class Module:
    """One PEFT module of the file, placed on its leaf.

    `a (r, in)` and `b (out, r)` are PEFT's flat factors (a converter's output:
    a VeRA, LoHa or LoKr module is already the plain LoRA it equals); `shape` is
    the module's weight, the leaf's shape after the entry `at`; `groups` (set by
    `_orient`) says which of its axes are the input and which the output."""

    module: str  # PEFT's '.'-joined module name
    path: str  # the tree leaf's '/'-joined path
    at: Entry | None  # the entry of the leaf's leading stack axes, if any
    leaf_shape: tuple[int, ...]
    kind: str  # "linear", "embedding" (lora_embedding_A/B), "head" (on a tied table)
    a: np.ndarray
    b: np.ndarray
    rank: int
    alpha: float
    shape: tuple[int, ...]
    is_linear: bool  # the leaf is an eqx.nn.Linear weight, (out, in)
    weight_name: str  # the leaf's own name: kernel, weight, embedding, w
    vec: tuple[str, np.ndarray] | None = None  # (Adapter field, flat vector)
    # Groups already decided by the module itself: a convolution's (its kernel's
    # layout), a saved module's (its weight against the leaf).
    known_groups: Groups | None = None
    fits: list[Groups] = dataclasses.field(default_factory=list)
    groups: Groups | None = None
