"""Every adapter kind in one place: what it holds, how it starts, its scale, what
it contributes when served, how it merges, and what it costs to train.

Served, every kind is one form, per row `i` and adapted leaf:

    y = g_i * (x h_i) W  +  g_i * s_i (x h_i) A_i B_i

with `h` a vector over the in-features, `g` one over the out-features (ones where
a kind has none) and the low-rank term absent at rank 0. The kinds differ only in
which of `h`, `A B`, `g` they have and where `s` and `g` come from; the rules see
the same `BatchedLoraArray` fields (`in_scale`, `a`, `b`, `scale`, `out_scale`) for
all of them, and `loraify` (`_variant_scales`) builds `h` and `g` from the fields
named here.

| kind | holds (besides `A`, `B`) | scale `s` | `h` | `g` |
|---|---|---|---|---|
| `lora` | | `alpha / r` (rsLoRA `alpha / sqrt(r)`) | | |
| `dora` | `magnitudes (*stack, *out)` | as LoRA | | `m / ‖W + s A B‖` per out-feature |
| `ia3` | `out_scales (*stack, *out)`, rank 0 | | | the vector |
| `ia3_feedforward` | `in_scales (*stack, *in)`, rank 0 | | the vector | |
| `vera` | `vera`: `d (*stack, r)`, `b (*stack, *out)`; `A`, `B` frozen | 1 | | |

VeRA is served as the LoRA it equals, `(A diag(d), B diag(b))`
(`Adapter.lora_factors`). LoHa and LoKr load as the LoRA they equal (PEFT loader).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

if TYPE_CHECKING:  # targeting imports this module
    from .targeting import LeafLayout


def _dora_initial(w: Any, layout: LeafLayout, dtype: Any) -> Any:
    """DoRA's magnitude starts at the weight's norm per out-feature, laid out
    `(*stack, *out)` (the norm's remaining axes are the stack then the out-axes,
    in `w`'s order)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=layout.in_axes))
    kept = [ax for ax in range(w.ndim) if ax not in layout.in_axes]
    order = [kept.index(ax) for ax in (*layout.stack_axes, *layout.out_axes)]
    return jnp.transpose(norm, order).astype(dtype)


def _ones(group: str) -> Callable[[Any, LeafLayout, Any], Any]:
    def initial(w: Any, layout: LeafLayout, dtype: Any) -> Any:
        del w
        shape = layout.in_shape if group == "in" else layout.out_shape
        return jnp.ones((*layout.stack_shape, *shape), dtype)

    return initial


def _dora_fold(merged: Any, m: Any, layout: LeafLayout) -> Any:
    norm = jnp.sqrt(jnp.sum(merged * merged, axis=layout.in_axes, keepdims=True))
    return merged * layout.layout.on_weight(m, "out") / norm


def _scale_by(group: str) -> Callable[[Any, Any, LeafLayout], Any]:
    return lambda merged, v, layout: merged * layout.layout.on_weight(v, group)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One adapter kind (a `LoraRule(variant=...)`).

    - `name`: the variant's name.
    - `low_rank`: whether it has trained factors `A (in, r)`, `B (r, out)`
      (IA3 has rank 0).
    - `vector`: the `Adapter` field holding its per-leaf vector, if any, and
      `group`: the axes it spans (`"in"` or `"out"`).
    - `uses_alpha`: whether `s = alpha / r` (VeRA's vectors carry its scale: 1).
    - `bank_kind`: the `AdapterBank(kinds=...)` entry whose slots serve it.
    - `peft_type`: PEFT's name for it when exported.
    - `initial`: the vector's initial value from the dense base weight, its
      `LeafLayout` and a dtype (what `init_adapter` makes: the model is unchanged).
    - `fold`: what the vector does to `W + s A B` when merged.
    """

    name: str
    low_rank: bool
    vector: str | None
    group: str | None
    uses_alpha: bool
    bank_kind: str
    peft_type: str
    initial: Callable[[Any, LeafLayout, Any], Any] | None = None
    fold: Callable[[Any, Any, LeafLayout], Any] | None = None

    def scale(self, alpha: float, rank: int, use_rslora: bool) -> float:
        """`s`: `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA), 1 for VeRA, 0
        at rank 0 (no low-rank term). The one place this formula is written."""
        if rank == 0:
            return 0.0
        if not self.uses_alpha:
            return 1.0
        return alpha / (math.sqrt(rank) if use_rslora else rank)

    def trainable(self, rank: int, d_in: int, d_out: int) -> int:
        """Trainable parameters per stack entry of one leaf (`init_adapter`'s)."""
        if self.name == "vera":  # its projections are frozen: d (r) and b (out)
            return rank + d_out
        n = rank * (d_in + d_out) if self.low_rank else 0
        if self.vector is not None:
            n += d_in if self.group == "in" else d_out
        return n


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("lora", True, None, None, True, "lora", "LoRA"),
        Kind(
            "dora", True, "magnitudes", "out", True, "dora", "DoRA",
            _dora_initial, _dora_fold,
        ),
        Kind(
            "ia3", False, "out_scales", "out", True, "ia3", "IA3",
            _ones("out"), _scale_by("out"),
        ),
        Kind(
            "ia3_feedforward", False, "in_scales", "in", True, "ia3", "IA3",
            _ones("in"), _scale_by("in"),
        ),
        Kind("vera", True, None, None, False, "lora", "LoRA"),
    )
}  # fmt: skip

# The vector fields of `Adapter` and `AdapterStack`, in the order of
# `AdapterStack.variants`' flags (and of folding in `merge`: DoRA's normalisation
# first), each with the axes it spans.
VECTOR_FIELDS: dict[str, str] = {
    k.vector: k.group
    for k in sorted(
        (k for k in KINDS.values() if k.vector),
        key=lambda k: ("magnitudes", "in_scales", "out_scales").index(k.vector),
    )
}
KIND_OF_VECTOR: dict[str, Kind] = {k.vector: k for k in KINDS.values() if k.vector}
