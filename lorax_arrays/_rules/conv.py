"""Dispatch rule for convolutions with an adapted kernel (`lax.conv_general_dilated`).

Registers: `conv_general_dilated` (the BatchedLoraArray as the kernel; as the input,
or on both sides: an error).

A conv kernel is adapted as PEFT's conv LoRA adapts a `Conv2d`: for each adapter,
`A` is a conv with the kernel's spatial shape from the input features into `r`
channels, and `B` a 1x1 conv out of them. In this library's terms the kernel's
*in*-axes are its spatial axes and its in-feature axis, its only *out*-axis is the
out-feature axis: a Flax `HWIO` kernel `(kh, kw, I, O)` has `in_axes=(0, 1, 2)`,
`out_axes=(3,)`, an Equinox `OIHW` kernel `(O, I, kh, kw)` has `in_axes=(1, 2, 3)`,
`out_axes=(0,)` (`lx.LoraRule(pattern, rank, out_axes=-1)` or `out_axes=0`: the
other axes are then the in-axes). So `a: (n, *in, r)` is, per adapter, a kernel of
the same spatial shape into `r` channels, and `b: (n, r, O)` a 1x1 kernel.

The rewrite, with the conv's own strides, padding and dilations:

    conv(x, W + s_i · A_i B_i)  =  conv(x, W) + s_i · conv1x1(conv(x, A_i), B_i)

computed as one conv of `x` with every adapter's `A` side by side (`n · r` output
channels), from which each example keeps its own adapter's `r` channels (a gather),
scales them by `s_i` and contracts them with its `B_i` (the 1x1 conv: a batched
matmul over the feature axis). With scalar indices (under `jax.vmap`) or a single
adapter, only that adapter's `A` is convolved, and no gather is needed. No
per-example kernel is ever built.

Which adapter: the indices label the conv's batch dimension `N` (named by its
dimension numbers, so the array's `batch_axis` is not consulted); they may also be
a row-major regrouping of `(N, *output spatial)` (per-position adapters, a ViT's
per-patch tokens), as `_indices.align_indices` allows for products. `-1` rows get
the base conv exactly (scale 0); a traced out-of-range index gives a NaN row
(`gathered_scale`).
"""

from __future__ import annotations

import math
from typing import Any

import quax
from jax import lax
from jaxtyping import ArrayLike

from .._core import lax as _lax
from .._core.array import BatchedLoraArray, bind
from .._core.errors import UnsupportedOperationError
from .._core.indices import (
    align_indices,
    clamp_indices,
    gathered_scale,
    require_indices,
    scale_rows,
)
from .dot import _add, _compute_dtype


def conv_layout(rhs_spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(in_axes, out_axes)` of a conv kernel whose dimension numbers are `rhs_spec`
    (out-feature axis, in-feature axis, spatial axes): the in-feature and spatial
    axes in increasing order, and the out-feature axis."""
    return tuple(sorted(rhs_spec[1:])), (rhs_spec[0],)


def _layout_message(lora: BatchedLoraArray, rhs_spec) -> str:
    ins, outs = conv_layout(rhs_spec)
    return (
        "conv_general_dilated with an adapted kernel (a BatchedLoraArray of shape "
        f"{tuple(lora.shape)}: out-feature axis {rhs_spec[0]}, in-feature axis "
        f"{rhs_spec[1]}, spatial axes {tuple(rhs_spec[2:])} by the conv's dimension "
        f"numbers) needs the conv LoRA layout in_axes={ins}, out_axes={outs}, "
        "stack_axes=(): A a conv over the kernel's spatial axes and in-features "
        "into r channels, B a 1x1 conv out of them (PEFT's conv LoRA). Its layout "
        f"is in_axes={lora.in_axes}, out_axes={lora.out_axes}, "
        f"stack_axes={lora.stack_axes}. Give the kernel's rule the out-feature axis "
        f"alone as its out-axis, `lx.LoraRule(pattern, rank, out_axes={outs[0]})` "
        "(the other axes become the in-axes); to build the dense per-example kernel "
        "instead (scalar indices only), pass `allow_materialise=True`."
    )


def lora_conv(lora: BatchedLoraArray, x: Any, params: dict) -> Any:
    """`conv_general_dilated(x, lora, **params)` in low-rank form."""
    if lora.has_variants:
        raise UnsupportedOperationError(
            "conv_general_dilated with an adapted kernel whose adapters include "
            "DoRA or IA3 vectors: conv LoRA is served for plain LoRA adapters only "
            "(PEFT's conv DoRA and IA3 are not supported yet)."
        )
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    groups = (params["feature_group_count"], params["batch_group_count"])
    ins, outs = conv_layout(rhs_spec)
    conv_lora = not lora.stack_axes and lora.out_axes == outs
    conv_lora = conv_lora and set(lora.in_axes) == set(ins)
    if lora.allow_materialise and (groups != (1, 1) or not conv_lora):
        # Opted in: one dense kernel (scalar indices only; `default` says so).
        return BatchedLoraArray.default(lax.conv_general_dilated_p, (x, lora), params)
    if groups != (1, 1):
        raise UnsupportedOperationError(
            "conv_general_dilated with an adapted kernel (a BatchedLoraArray of "
            f"shape {tuple(lora.shape)}) and feature_group_count={groups[0]}, "
            f"batch_group_count={groups[1]}: only ungrouped convolutions "
            "(feature_group_count=1, batch_group_count=1) have a conv LoRA rule. "
            "Grouped and depthwise convolutions are not supported: leave their "
            "kernels out of the LoraRule's pattern, or opt in to building the "
            "dense kernel (scalar indices only) with `allow_materialise=True`."
        )
    if not conv_lora:
        raise UnsupportedOperationError(_layout_message(lora, rhs_spec))

    base = bind(lax.conv_general_dilated_p, x, lora.frozen_w, **params)
    out_shape = tuple(base.shape)
    # The rows the indices label: the batch dimension, then the output's spatial
    # dimensions in the dimension numbers' order (per-position indices).
    free_shape = tuple(out_shape[d] for d in (out_spec[0], *out_spec[2:]))
    what = (
        f"the input (shape {tuple(x.shape)}) of a conv with the adapted kernel of "
        f"shape {tuple(lora.shape)} (the conv's batch and output spatial axes)"
    )
    idx, lead, _ = align_indices(require_indices(lora), free_shape, what, 0)
    delta = _low_rank_term(lora, x, idx, lead, free_shape, params)
    return _add(base, delta)


def _low_rank_term(lora, x, idx, lead, free_shape, params):
    """`s_i · conv1x1(conv(x, A_i), B_i)` per row, laid out as the conv's output.

    The convs with `A` write `(N, *spatial, channels)` (their own output dimension
    numbers), so the rows are the leading `G = prod(lead)` entries of the
    flattened `(N, *spatial)` and each row's `R` positions follow.
    """
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    nd = len(rhs_spec) - 2
    dtype, pref = _compute_dtype(x, params)
    precision = params.get("precision")
    n, r = lora.n_adapters, lora.rank
    (o_ax,) = lora.out_axes
    o = lora.shape[o_ax]
    g = math.prod(lead)
    rows = math.prod(free_shape) // g
    # A's axes (n, *in in `in_axes` order, r) -> (n, r, I, *spatial in the conv's
    # order): an OI+spatial kernel, `n` adapters' `r` output channels side by side.
    pos = lambda ax: 1 + lora.in_axes.index(ax)  # noqa: E731
    a_perm = (0, nd + 2, pos(rhs_spec[1]), *(pos(ax) for ax in rhs_spec[2:]))
    k_shape = tuple(lora.shape[ax] for ax in rhs_spec[1:])  # (I, *K)
    k_spec = tuple(range(nd + 2))
    # The A-convs' output: (N, *spatial, channels).
    u_spec = (0, nd + 1, *range(1, nd + 1))
    conv_params = dict(params)
    conv_params["dimension_numbers"] = lax.ConvDimensionNumbers(
        lhs_spec, k_spec, u_spec
    )
    if "out_sharding" in conv_params:  # the base output's, not these convs'
        conv_params["out_sharding"] = None
    single = idx.ndim == 0 or n == 1
    channels = r if single else n * r

    def term(x, a, b, idx, scale):
        safe = clamp_indices(idx, n)
        s = _lax.reshape(gathered_scale(scale, idx), (g,))
        a_k = _lax.transpose(a, a_perm)  # (n, r, I, *K)
        if single:
            # One adapter for the whole call (or only one stacked): convolve with
            # its A alone; `s` still zeroes base rows and NaNs bad indices.
            a_k = a_k if n == 1 else _lax.take(a_k, safe, 0)
            b_1 = b if n == 1 else _lax.take(b, safe, 0)
            b_1 = _lax.reshape(b_1, (r, o))
        a_k = _lax.convert(_lax.reshape(a_k, (channels, *k_shape)), dtype)
        u = lax.conv_general_dilated_p.bind(x, a_k, **conv_params)
        if single:
            t = _lax.reshape(u, (g, rows, r))
        else:
            # Each row keeps its own adapter's r channels: (G, R, n, r) -> (G, R, r).
            u = _lax.reshape(u, (g, rows, n, r))
            t = _pick_adapter(u, _lax.reshape(safe, (g,)))
        t = _lax.convert(t, dtype)
        if single:  # the 1x1 conv with B: (G, R, r) · (r, O)
            b_1 = _lax.convert(b_1, dtype)
            dn = (((2,), (0,)), ((), ()))
        else:  # each row's own B: (G, R, r) · (G, r, O)
            ids = _lax.reshape(safe, (g,))
            b_1 = _lax.convert(_lax.take(_lax.reshape(b, (n, r, o)), ids, 0), dtype)
            dn = (((2,), (1,)), ((0,), (0,)))
        v = lax.dot_general(
            t, b_1, dn, precision=precision, preferred_element_type=pref
        )  # (G, R, O)
        # The row's scale last (a select for base rows: `scale_rows`).
        v = scale_rows(v, _lax.reshape(s, (g, 1, 1)))
        v = _lax.reshape(v, (*free_shape, o))  # (N, *spatial, O)
        # To the conv's own output layout: out_spec names where N, O and each
        # spatial dimension go.
        src = {out_spec[0]: 0, out_spec[1]: nd + 1}
        src.update({d: 1 + i for i, d in enumerate(out_spec[2:])})
        return _lax.transpose(v, [src[d] for d in range(nd + 2)])

    if isinstance(x, quax.Value):
        term = quax.quaxify(term)
    return term(x, lora.a, lora.b, idx, lora.scale)


def _pick_adapter(u, ids):
    """`u[g, :, ids[g], :]` for `u: (G, R, n, r)`: one gather, in bounds."""
    g, rows, _, r = u.shape
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(1, 2),
        collapsed_slice_dims=(2,),
        start_index_map=(2,),
        operand_batching_dims=(0,),
        start_indices_batching_dims=(0,),
    )
    return lax.gather(
        u,
        lax.expand_dims(ids, (1,)),
        dnums,
        (1, rows, 1, r),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


@quax.register(lax.conv_general_dilated_p)
def _(lhs: ArrayLike | quax.ArrayValue, rhs: BatchedLoraArray, **params):
    return lora_conv(rhs, lhs, params)


@quax.register(lax.conv_general_dilated_p)
def _(lhs: BatchedLoraArray, rhs: ArrayLike | quax.ArrayValue, **params):
    raise UnsupportedOperationError(
        "conv_general_dilated with a BatchedLoraArray (weight shape "
        f"{tuple(lhs.shape)}) as the input (lhs): an adapted weight can only be the "
        "kernel (rhs) of a convolution. Convolve activations with adapted kernels."
    )


@quax.register(lax.conv_general_dilated_p)
def _(lhs: BatchedLoraArray, rhs: BatchedLoraArray, **params):
    raise UnsupportedOperationError(
        "conv_general_dilated between two BatchedLoraArrays (a convolution of two "
        "adapted weights) has no low-rank rule. Convolve activations with adapted "
        "kernels, not weights with each other."
    )
