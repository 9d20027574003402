"""Targeting: `LoraRule`, which leaves of a tree get a LoRA, and how their axes are
laid out (`LeafLayout`), previewed by `match_rules`.

Not dispatch rules: those are the `_rules_*.py` modules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._core.array import BatchedLoraArray
from .._core.layout import Layout, normalise_axes
from .._core.paths import flatten_with_paths
from .._integrations.qwix import QwixArray
from .kinds import KINDS


@dataclasses.dataclass(frozen=True)
class LoraRule:
    """Adapt every weight whose '/'-joined pytree path matches `pattern`.

    Paths join the keys of `jax.tree_util` key paths with '/': `'layers/0/weight'`
    for an `eqx.nn.MLP`, `'params/Dense_0/kernel'` for a Flax linen parameter dict.
    The pattern is searched (`re.search`), so `'q_proj'` matches
    `'params/attn/q_proj/kernel'`; anchor it with `^...$` to match whole paths.
    When several rules match a leaf, the first wins. Only floating-point leaves
    with at least two axes are considered (biases and norms never are). In an
    `eqx.nn.Linear` only the weight is, and the parameters of Equinox norm layers
    never are, even in a vmapped stack of layers where biases and norm scales are
    2-D. A quax value (a quantised weight, say a `lx.QwixArray` from
    `lx.from_qwix`) is one leaf, named by its own path, with the shape and dtype
    it stands for; its parts (integer codes, scales) never are.

    **Arguments:**

    - `pattern`: a regular expression over the '/'-joined path.
    - `rank`: the LoRA rank `r`.
    - `alpha`: the LoRA alpha; the adapter is scaled by `alpha / rank`
        (`alpha / sqrt(rank)` with `use_rslora`). Defaults to `rank` (scale 1).
    - `in_axes`: the weight's axes that an activation contracts with. Inferred when
        not given: `eqx.nn.Linear.weight` is `(out, in)`, any other 2-D leaf is
        `(in, out)` as in `x @ W` (a Flax `kernel`). The kernel of an Equinox
        `Conv*` / `ConvTranspose*` layer `(O, I, *k)` has `out_axes=(0,)`, that of
        an NNX `Conv` / `ConvTranspose` `(*k, I, O)` the last axis; the other
        axes are its in-axes. (A linen conv kernel, a bare array, is not told
        from a `DenseGeneral` kernel: give it `out_axes=-1`.)
    - `out_axes`: the weight's axes that the product produces. Inferred as the
        remaining axes when only `in_axes` is given (and vice versa).
    - `stack_axes`: layer-stack axes (a scanned stack of layers). Leading axes of an
        `eqx.nn.Linear.weight` with more than 2 axes are stack axes by default
        (unless `in_axes`/`out_axes` name them).
    - `use_rslora`: scale by `alpha / sqrt(rank)` (rank-stabilised LoRA).
    - `variant`: what [`lorax_arrays.init_adapter`][] creates at the matched
        leaves: `"lora"` (the default); `"dora"` (a LoRA with a magnitude per
        out-feature, starting at the weight's column norms); `"ia3"` (a vector
        scaling the product's output, PEFT's IA3 on `k`/`v`, starting at 1:
        write rank 0); `"ia3_feedforward"` (a vector scaling the input, PEFT's
        IA3 `feedforward_modules`, rank 0); `"vera"` (frozen random projections
        shared by every matched leaf, sliced to each, and trainable vectors `d`
        (starting at 0.1) and `b` (at 0), as PEFT's VeRA; `alpha` is ignored:
        scale 1).
    """

    pattern: str
    rank: int
    alpha: float | None = None
    _: dataclasses.KW_ONLY
    in_axes: int | tuple[int, ...] | None = None
    out_axes: int | tuple[int, ...] | None = None
    stack_axes: int | tuple[int, ...] = ()
    use_rslora: bool = False
    variant: str = "lora"

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool):
            raise TypeError(f"LoraRule({self.pattern!r}): rank must be an int.")
        if self.variant not in VARIANTS:
            raise ValueError(
                f"LoraRule({self.pattern!r}): unknown variant {self.variant!r}; "
                f"choose one of {VARIANTS}."
            )
        if self.variant.startswith("ia3"):
            if self.rank != 0:
                raise ValueError(
                    f"LoraRule({self.pattern!r}, {self.rank}, variant="
                    f"{self.variant!r}): IA3 has no low-rank factors; write rank 0."
                )
        elif self.rank < 1:
            raise ValueError(f"LoraRule({self.pattern!r}): rank must be >= 1.")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"LoraRule: invalid regex {self.pattern!r}: {e}") from e

    @property
    def scale(self) -> float:
        """`alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA."""
        alpha = self.rank if self.alpha is None else self.alpha
        return KINDS[self.variant].scale(alpha, self.rank, self.use_rslora)


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The multiplier of a LoRA update: `alpha / rank`, or `alpha / sqrt(rank)`
    with rsLoRA; 0 for rank 0 (an IA3 leaf has no low-rank term). The formula's
    one home is `kinds.Kind.scale`."""
    return KINDS["lora"].scale(alpha, rank, use_rslora)


def lora_alpha(scale: float, rank: int, use_rslora: bool) -> float:
    """The alpha that gives `scale` at `rank` (`lora_scale` inverted)."""
    return float(scale * (math.sqrt(rank) if use_rslora else rank))


VARIANTS = tuple(KINDS)


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one adapted leaf is laid out: static metadata of adapters and matches.

    Its path and shape, and the axis groups of its `layout` (a `Layout`; the three
    tuples are also fields, so `LeafLayout(path, shape, in_axes, out_axes,
    stack_axes)` builds one).
    """

    path: str
    shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...]

    @functools.cached_property
    def layout(self) -> Layout:
        """The axis groups as a `Layout`."""
        return Layout(self.in_axes, self.out_axes, self.stack_axes)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.layout.stack_shape(self.shape)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.layout.in_shape(self.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.layout.out_shape(self.shape)

    def factor_shapes(
        self, rank: int, n_adapters: int | None = None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of `a` and `b` at rank `rank`: `(*stack, *in, rank)` and
        `(*stack, rank, *out)`, with an `n_adapters` axis after `*stack` unless it
        is None (`Layout.factor_shapes`)."""
        return self.layout.factor_shapes(self.shape, rank, n_adapters)

    def compatible(self, other: LeafLayout) -> bool:
        return (self.shape, self.layout) == (other.shape, other.layout)


@dataclasses.dataclass(frozen=True)
class RuleMatch:
    """One leaf that a rule matched: where it is, its layout, its rank and scale."""

    layout: LeafLayout
    dtype: Any
    rank: int
    alpha: float
    use_rslora: bool
    rule: LoraRule

    @property
    def path(self) -> str:
        return self.layout.path

    @property
    def scale(self) -> float:
        return self.rule.scale


class RuleMatches(tuple):
    """What a list of rules matched in a tree; prints as a table.

    A tuple of `RuleMatch` (fields `path`, `layout`, `dtype`, `rank`, `alpha`,
    `scale`, `rule`).
    """

    def __str__(self) -> str:
        kinds = any(m.rule.variant != "lora" for m in self)
        head = ("path", "shape", "in", "out", "stack", "rank", "scale", "rule")
        head = (*head[:5], "kind", *head[5:]) if kinds else head
        rows = []
        for m in self:
            row = (
                m.path,
                str(m.layout.shape),
                str(m.layout.in_axes),
                str(m.layout.out_axes),
                str(m.layout.stack_axes) if m.layout.stack_axes else "-",
                str(m.rank),
                f"{m.scale:g}",
                repr(m.rule.pattern),
            )
            rows.append((*row[:5], m.rule.variant, *row[5:]) if kinds else row)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        params = sum(_trainable(m) for m in self)
        lines = [fmt(head), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
        lines.append(f"{len(self)} leaves adapted, {params:,} adapter parameters.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"RuleMatches(\n{self}\n)"


def _trainable(m: RuleMatch) -> int:
    """How many trainable parameters `init_adapter` makes for a match."""
    d_in, d_out = math.prod(m.layout.in_shape), math.prod(m.layout.out_shape)
    per_entry = KINDS[m.rule.variant].trainable(m.rank, d_in, d_out)
    return per_entry * max(1, math.prod(m.layout.stack_shape))


def _is_linear(x: Any) -> bool:
    return isinstance(x, eqx.nn.Linear)


# Equinox layers whose parameters are only ever used elementwise: never adapted, even
# when a vmapped stack of them makes their 1-D weights 2-D.
_ELEMENTWISE = (eqx.nn.LayerNorm, eqx.nn.RMSNorm, eqx.nn.GroupNorm)


def _is_elementwise(x: Any) -> bool:
    return isinstance(x, _ELEMENTWISE)


def _is_candidate(x: Any) -> bool:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None or len(shape) < 2:
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def candidate_leaves(tree: Any) -> list[tuple[str, Any, bool]]:
    """(path, leaf, is an eqx.nn.Linear weight) for every weight a rule may adapt.

    A leaf that is already a BatchedLoraArray stands for its base weight.
    """

    def is_leaf(x):
        return (
            _is_linear(x)
            or _is_eqx_conv(x)
            or _is_elementwise(x)
            or isinstance(x, BatchedLoraArray)
        )

    out = []
    for path, leaf in flatten_with_paths(tree, is_leaf=is_leaf)[0]:
        if _is_elementwise(leaf):
            continue
        if _is_linear(leaf) or _is_eqx_conv(leaf):
            # Only the weight: an Equinox conv's bias is (out, 1, ..., 1), and in
            # a vmapped stack of Linears (`eqx.filter_vmap`, scan over layers) the
            # bias is 2-D, (*stack, out), but neither is ever a matrix that an
            # activation contracts with.
            is_lora = lambda x: isinstance(x, BatchedLoraArray)  # noqa: E731
            for sub, sub_leaf in flatten_with_paths(leaf, is_leaf=is_lora)[0]:
                if sub != "weight":
                    continue
                if isinstance(sub_leaf, BatchedLoraArray):
                    sub_leaf = sub_leaf.w
                if _is_candidate(sub_leaf):
                    out.append(
                        (f"{path}/{sub}" if path else sub, sub_leaf, _is_linear(leaf))
                    )
            continue
        if isinstance(leaf, BatchedLoraArray):
            leaf = leaf.w
        if _is_candidate(leaf):
            out.append((path, leaf, False))
    return out


def _is_eqx_conv(x: Any) -> bool:
    return isinstance(x, (eqx.nn.Conv, eqx.nn.ConvTranspose))


def _is_conv(x: Any) -> bool:
    if _is_eqx_conv(x):
        return True
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, (nnx.Conv, nnx.ConvTranspose))


def conv_out_axes(tree: Any) -> dict[str, int]:
    """The out-feature axis of each unstacked conv kernel of `tree` that a layer
    object identifies, by path: 0 for an Equinox `Conv*` / `ConvTranspose*`
    weight `(O, I, *k)`, the last axis for an NNX `Conv` / `ConvTranspose`
    kernel `(*k, I, O)`. Kernels of a vmapped stack of layers (more axes than
    the convolution has) are left out: their axes need a rule's `stack_axes`."""
    out = {}
    for path, layer in flatten_with_paths(tree, is_leaf=_is_conv)[0]:
        if not _is_conv(layer):
            continue
        eqx_layer = _is_eqx_conv(layer)
        name, axis = ("weight", 0) if eqx_layer else ("kernel", -1)
        nd = (
            layer.num_spatial_dims + 2
            if eqx_layer
            else len(tuple(np.atleast_1d(layer.kernel_size))) + 2
        )
        for sub, leaf in flatten_with_paths(layer)[0]:
            if sub.split("/")[0] == name and len(getattr(leaf, "shape", ())) == nd:
                out[f"{path}/{sub}" if path else sub] = axis % nd
    return out


def _infer_layout(
    path: str, shape, rule: LoraRule, is_linear_weight: bool, conv_out=None
):
    try:
        return _infer_layout_unchecked(path, shape, rule, is_linear_weight, conv_out)
    except (ValueError, TypeError) as e:
        if repr(path) in str(e):
            raise
        # normalise_axes does not know which leaf it is looking at.
        raise type(e)(
            f"LoraRule({rule.pattern!r}) on {path!r} (shape {tuple(shape)}): {e} "
            "If the pattern also matched a leaf it should not (a 2-D bias, say), "
            "anchor it, e.g. with '/kernel$'."
        ) from e


def _stack_hint(shape, stack) -> str:
    if stack or len(shape) < 3:
        return ""
    return (
        f" If axis 0 (size {shape[0]}) is a stack of layers (Flax `nn.scan` with "
        "`variable_axes={'params': 0}`, or layers built with `jax.vmap`), add "
        f"`stack_axes=(0,)`: each layer's weight then has shape {tuple(shape[1:])}"
        + (
            ", and a 2-D one gets the default (in, out) layout."
            if len(shape) == 3
            else "."
        )
    )


def _infer_layout_unchecked(
    path: str, shape, rule: LoraRule, is_linear_weight: bool, conv_out=None
):
    ndim = len(shape)
    stack = normalise_axes(rule.stack_axes, ndim, "stack_axes")
    if is_linear_weight and not stack and ndim > 2:
        # A vmapped stack of eqx.nn.Linear: (*stack, out, in). Leading axes that the
        # rule does not name as in/out axes are stack axes, whichever of in_axes /
        # out_axes it gives.
        named = set()
        for axes, name in ((rule.in_axes, "in_axes"), (rule.out_axes, "out_axes")):
            if axes is not None:
                named |= set(normalise_axes(axes, ndim, name))
        stack = tuple(ax for ax in range(ndim - 2) if ax not in named)
    rest = [ax for ax in range(ndim) if ax not in stack]
    if rule.in_axes is not None and rule.out_axes is not None:
        ins = normalise_axes(rule.in_axes, ndim, "in_axes")
        outs = normalise_axes(rule.out_axes, ndim, "out_axes")
    elif rule.in_axes is not None:
        ins = normalise_axes(rule.in_axes, ndim, "in_axes")
        outs = tuple(ax for ax in rest if ax not in ins)
    elif rule.out_axes is not None:
        outs = normalise_axes(rule.out_axes, ndim, "out_axes")
        ins = tuple(ax for ax in rest if ax not in outs)
    elif conv_out is not None and not stack:
        # A conv layer's kernel: the out-feature axis is produced, the in-feature
        # and spatial axes are contracted.
        outs = (conv_out,)
        ins = tuple(ax for ax in rest if ax != conv_out)
    elif len(rest) == 2:
        ins, outs = (
            ((rest[1],), (rest[0],)) if is_linear_weight else ((rest[0],), (rest[1],))
        )
    else:
        raise ValueError(
            f"Cannot infer the layout of {path!r} (shape {tuple(shape)}) matched by "
            f"LoraRule({rule.pattern!r}): only 2-D weights (after stack axes) have a "
            f"default.{_stack_hint(shape, stack)} Say which axes are contracted and "
            "which are produced, e.g. `LoraRule(pattern, rank, in_axes=(0,), "
            "out_axes=(1, 2))` for a Flax DenseGeneral kernel of shape (in, heads, "
            "head_dim); for a convolution, `out_axes=-1` for a Flax HWIO conv "
            "kernel, `out_axes=0` for an Equinox OIHW conv weight."
        )
    Layout(ins, outs, stack).check(ndim, f"LoraRule({rule.pattern!r}) on {path!r}")
    return LeafLayout(path, tuple(shape), ins, outs, stack)


def _quantised_hint(candidates) -> str:
    quantised = [p for p, leaf, _ in candidates if isinstance(leaf, QwixArray)]
    if not quantised:
        return ""
    return (
        f" Quantised weights ({quantised[0]!r}"
        + (f" and {len(quantised) - 1} more" if len(quantised) > 1 else "")
        + ") are named by the float model's paths and stand for the dequantised "
        "weight: their parts ('qvalue', 'scale', 'zero_point') are not weights."
    )


def match_rules(tree: Any, rules: LoraRule | Sequence[LoraRule]) -> RuleMatches:
    """Which leaves of `tree` the rules adapt, with their layouts, before committing.

    `print(lx.match_rules(model, rules))` shows one line per adapted leaf: path,
    shape, in/out/stack axes, rank and scale.

    **Arguments:**

    - `tree`: any pytree of weights: an Equinox module, a Flax parameter dict, a
        dict of arrays. Leaves that are already `BatchedLoraArray`s count as their
        base weight.
    - `rules`: one `LoraRule` or a sequence of them; the first rule that matches a
        path wins.

    **Returns:**

    A `RuleMatches` (a tuple of `RuleMatch`, printable as a table).

    **Raises:**

    `ValueError` if a rule matches nothing (naming the rule and some paths it could
    have matched) or a matched leaf's layout cannot be inferred.
    """
    if isinstance(rules, LoraRule):
        rules = [rules]
    rules = list(rules)
    if not rules:
        raise ValueError("match_rules: no rules given.")
    for r in rules:
        if not isinstance(r, LoraRule):
            raise TypeError(f"Expected LoraRule objects, got {type(r).__name__}.")
    candidates = candidate_leaves(tree)
    convs = conv_out_axes(tree)
    used = [False] * len(rules)
    matches = []
    for path, leaf, is_linear_weight in candidates:
        for i, rule in enumerate(rules):
            if re.search(rule.pattern, path):
                used[i] = True
                layout = _infer_layout(
                    path, leaf.shape, rule, is_linear_weight, convs.get(path)
                )
                alpha = float(rule.rank if rule.alpha is None else rule.alpha)
                matches.append(
                    RuleMatch(
                        layout,
                        np.dtype(leaf.dtype),
                        rule.rank,
                        alpha,
                        rule.use_rslora,
                        rule,
                    )
                )
                break
    for i, rule in enumerate(rules):
        if not used[i]:
            paths = [p for p, _, _ in candidates]
            shown = ", ".join(repr(p) for p in paths[:12])
            more = f" (and {len(paths) - 12} more)" if len(paths) > 12 else ""
            raise ValueError(
                f"LoraRule({rule.pattern!r}) matches no weight (earlier rules may "
                "have claimed its leaves; 1-D leaves such as biases are never "
                f"adapted). Weights that can be adapted: {shown}{more}."
                + _quantised_hint(candidates)
            )
    return RuleMatches(matches)


__all__ = [
    "LoraRule",
    "LeafLayout",
    "RuleMatch",
    "RuleMatches",
    "match_rules",
]
