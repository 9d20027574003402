"""One converter per kind: PEFT's tensors of a module (LoRA, conv LoRA, IA3, VeRA,
LoHa, LoKr) as the `a (*in, r)`, `b (r, *out)` factors and vectors of a leaf."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..._adapters.targeting import lora_alpha, lora_scale
from ..._core.array import dense
from ..._core.errors import PeftFormatError
from ._config import _WHAT
from ._names import _module_parts
from ._records import Module


def _conv_module(module: str, a, b, shape, path: str):
    """A PEFT convolution LoRA (`lora_A (r, I, *k)`, `lora_B (O, r, 1, ...)`) as
    `A (r, in)`, `B (out, r)` flattened over the leaf's in-axes in increasing
    order, and those axes: a Flax kernel `(*k, I, O)` has in-axes `(*k, I)` and
    out-axis `O`, an Equinox / torch weight `(O, I, *k)` in-axes `(I, *k)` and
    out-axis `O` (by its shape; by the weight's name, `kernel` or `weight`,
    where both fit)."""
    r, n_in, kernel, n_out = a.shape[0], a.shape[1], a.shape[2:], b.shape[0]
    nd = len(shape)
    fits = {}
    if shape == (*kernel, n_in, n_out):  # Flax HWIO
        perm = (*range(2, 2 + len(kernel)), 1, 0)
        fits["kernel"] = (perm, (tuple(range(nd - 1)), (nd - 1,)))
    if shape == (n_out, n_in, *kernel):  # Equinox / torch OIHW
        perm = (*range(1, 2 + len(kernel)), 0)
        fits["weight"] = (perm, (tuple(range(1, nd)), (0,)))
    if not fits:
        raise PeftFormatError(
            f"load_peft_adapter: PEFT module {module!r} is a convolution with "
            f"in={n_in}, out={n_out} and kernel {kernel}, but its leaf {path!r} "
            f"has shape {shape}, neither a Flax kernel {(*kernel, n_in, n_out)} "
            f"nor an Equinox weight {(n_out, n_in, *kernel)}: the adapter was "
            "made for another model, or key_map points at the wrong leaf."
        )
    if len(fits) == 2:
        name = _module_parts(path)[1]
        if name not in fits:
            raise PeftFormatError(
                f"load_peft_adapter: the convolution {module!r} fits {path!r} "
                f"(shape {shape}) both as a Flax (*kernel, in, out) kernel and an "
                "Equinox (out, in, *kernel) weight, and its name does not say "
                "which ('kernel' or 'weight'); give key_map to a leaf so named."
            )
        fits = {name: fits[name]}
    perm, groups = next(iter(fits.values()))
    a = np.transpose(a, perm).reshape(-1, r).T
    return a, b.reshape(n_out, r), groups


def _is_feedforward(config: Mapping[str, Any], key: str) -> bool | None:
    """PEFT's IA3 `_check_target_module_feedforward` (a regex full match, or a
    suffix of the name, without a dot); None when the config has none."""
    ff = config.get("feedforward_modules")
    if ff is None:
        return None
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


def _ia3_module(module: str, vec, shape, config, file: Path):
    """An IA3 module as a rank-0 LoRA (`A (0, in)`, `B (out, 0)`) and its vector:
    `ia3_l (out, 1)` scales the output (`out_scales`), `(1, in)` of a
    feedforward module the input (`in_scales`)."""
    ff = _is_feedforward(config, module)
    if ff is None:  # no feedforward_modules saved: the vector's shape says
        ff = vec.shape[0] == 1 and vec.shape[1] != 1
    n = vec.shape[1] if ff else vec.shape[0]
    want = (1, n) if ff else (n, 1)
    if tuple(vec.shape) != want:
        role = "is" if ff else "is not"
        raise PeftFormatError(
            f"{file}: module {module!r} {role} one of the config's "
            f"feedforward_modules={config.get('feedforward_modules')!r}, so its "
            f"ia3_l should be {'(1, in)' if ff else '(out, 1)'}, but it is "
            f"{tuple(vec.shape)}: the directory's two files do not belong together."
        )
    total = math.prod(shape)
    if total % n:
        raise PeftFormatError(
            f"load_peft_adapter: PEFT module {module!r} has an IA3 vector of "
            f"{n} {'in' if ff else 'out'}-features, which does not divide its "
            f"leaf's weight of shape {shape}: the adapter was made for another "
            "model, or key_map points at the wrong leaf."
        )
    n_in, n_out = (n, total // n) if ff else (total // n, n)
    a, b = np.zeros((0, n_in), vec.dtype), np.zeros((n_out, 0), vec.dtype)
    return a, b, 0, 0.0, ("in_scales" if ff else "out_scales", vec.reshape(-1))


def _vera_module(module: str, parts, shared, shape, file: Path):
    """A VeRA module as a plain LoRA with scale 1: PEFT computes
    `Δy = λ_b ⊙ ((λ_d ⊙ (x A[:, :in]ᵀ)) B[:out]ᵀ)`, which is
    `A' = diag(λ_d) A[:, :in]` `(r, in)` and `B' = diag(λ_b) B[:out]` `(out, r)`."""
    lb, ld = parts["b"], parts["d"]
    n_out, total = lb.shape[0], math.prod(shape)
    pa, pb = shared["A"], shared["B"]
    n_in = total // n_out
    if total % n_out or n_in > pa.shape[1] or n_out > pb.shape[0]:
        raise PeftFormatError(
            f"load_peft_adapter: VeRA module {module!r} has out={n_out} "
            f"(vera_lambda_b), and its leaf's weight has shape {shape}, which "
            f"does not fit that or the shared projections vera_A {pa.shape} and "
            f"vera_B {pb.shape}: the adapter was made for another model, or "
            "key_map points at the wrong leaf."
        )
    dt = np.result_type(pa, pb, lb, ld)
    a = (ld[:, None].astype(dt) * pa[:, :n_in].astype(dt)).astype(dt)
    b = (pb[:n_out].astype(dt) * lb[:, None].astype(dt)).astype(dt)
    return a, b, ld.shape[0]


def _full_factors(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An exact factorisation `w = u @ v` (float64) of least inner size: the
    identity on the smaller side when `w` has full rank (no rounding at all), else
    the thin SVD truncated at its numerical rank (float64)."""
    w = w.astype(np.float64)
    n, m = w.shape
    k = int(np.linalg.matrix_rank(w)) if min(n, m) else 0
    if k == min(n, m):
        return (np.eye(n), w) if n <= m else (w, np.eye(m))
    k = max(k, 1)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :k] * s[:k], vt[:k]


def _lycoris_module(module, parts, peft_type, r_cfg, alpha, shape, path, file):
    """A LoHa or LoKr module as an exact plain LoRA `A (R, in)`, `B (out, R)`
    with scale 1 (PEFT's `alpha / r` folded into `B`), computed in float64.

    - LoHa: `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`, and the Hadamard product
      of `U1 V1` and `U2 V2` is `U V` with `U[o, (p, q)] = U1[o, p] U2[o, q]` and
      `V[(p, q), i] = V1[p, i] V2[q, i]`: rank `R = r²`.
    - LoKr: `ΔW = kron(w1, w2) · alpha / r` (PEFT's scale, whether the factors
      are full or low-rank), `w1 = lokr_w1` or `lokr_w1_a lokr_w1_b`, likewise
      `w2`; `kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)`, a full factor
      factorised exactly (`_full_factors`): rank `R = r1 · r2`.

    Where `R` exceeds `min(out, in)`, the update itself is used (`A = ΔW`,
    `B = I` or `A = I`, `B = ΔW`), of rank `min(out, in)`."""
    what = _WHAT[peft_type]
    dt = np.result_type(*parts.values())
    f64 = {k: v.astype(np.float64) for k, v in parts.items()}
    if peft_type == "LOHA":
        u1, v1, u2, v2 = f64["w1_a"], f64["w1_b"], f64["w2_a"], f64["w2_b"]
        r_file = u1.shape[1]
        if r_file != r_cfg or u2.shape[1] != r_cfg:
            raise PeftFormatError(
                f"{file}: module {module!r} has LoHa rank {r_file} / {u2.shape[1]} "
                f"in the file but {r_cfg} by the config (r, rank_pattern): the "
                "directory's two files do not belong together."
            )
        u = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
        v = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
    else:
        uv = []
        for w in ("w1", "w2"):
            if w in f64:
                uv.append(_full_factors(f64[w]))
                continue
            lo_a, lo_b = f64[f"{w}_a"], f64[f"{w}_b"]
            if lo_a.shape[1] != r_cfg:
                raise PeftFormatError(
                    f"{file}: module {module!r} has lokr_{w}_a of rank "
                    f"{lo_a.shape[1]} in the file but r={r_cfg} by the config (r, "
                    "rank_pattern): the directory's two files do not belong together."
                )
            uv.append((lo_a, lo_b))
        (u1, v1), (u2, v2) = uv
        u, v = np.kron(u1, u2), np.kron(v1, v2)
    n_out, n_in = u.shape[0], v.shape[1]
    if len(shape) != 2 or shape not in ((n_in, n_out), (n_out, n_in)):
        raise PeftFormatError(
            f"load_peft_adapter: {what} module {module!r} has a weight of "
            f"(out, in) = ({n_out}, {n_in}), and its leaf {path!r} has shape "
            f"{shape}: lorax_arrays serves {what} on 2-D linear weights (of a "
            "leaf, or of an entry of a layer stack or fused kernel) only, not on "
            "convolutions or multi-axis kernels. Either the adapter was made for "
            "another model, or key_map points at the wrong leaf."
        )
    u = u * (float(alpha) / float(r_cfg))
    if u.shape[1] > min(n_out, n_in):
        delta = u @ v
        u, v = (np.eye(n_out), delta) if n_out <= n_in else (delta, np.eye(n_in))
    return v.astype(dt), u.astype(dt), u.shape[1]


def _leaf_vectors(fs: list[Module], leaf) -> dict[str, np.ndarray]:
    """The variants' vectors of one leaf's modules on its axes: `(*out)`
    (`(*in)` for `in_scales`) in the leaf's group orders, `(*stack, ...)` for
    per-entry modules. Entries without a vector get the identity: 1 for IA3,
    the base weight's norm for a DoRA magnitude."""
    out = {}
    shape, (ins, outs) = fs[0].shape, fs[0].groups
    at0 = fs[0].at
    for field in sorted({f.vec[0] for f in fs if f.vec is not None}):
        axes = ins if field == "in_scales" else outs
        part = tuple(shape[ax] for ax in axes)
        mine = [f for f in fs if f.vec is not None and f.vec[0] == field]
        dt = np.result_type(*[f.vec[1].dtype for f in mine])
        if at0 is None:
            out[field] = mine[0].vec[1].reshape(part).astype(dt)
            continue
        k = len(at0)
        stack = fs[0].leaf_shape[:k]
        if field == "magnitudes" and len(mine) < math.prod(stack):
            w = np.asarray(dense(leaf), np.float32)  # a quantised leaf too
            v = np.sqrt(np.sum(np.square(w), axis=tuple(ax + k for ax in ins)))
            v = v.astype(dt)
        else:
            v = np.ones((*stack, *part), dt)
        for f in mine:
            v[f.at] = f.vec[1].reshape(part)
        out[field] = v
    return out


def _leaf_factors(f: Module) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's `A (r, in)`, `B (out, r)` on the module weight's axes: `a (*in, r)`,
    `b (r, *out)`, the flat `in`/`out` unflattened row-major over the in- and
    out-axes in increasing order (as `w.reshape` makes a multi-axis kernel from a
    torch `(out, in)` weight's transpose)."""
    shape, (ins, outs) = f.shape, f.groups
    a = f.a.T.reshape(*(shape[ax] for ax in ins), f.rank)
    b = f.b.T.reshape(f.rank, *(shape[ax] for ax in outs))
    return a, b


def _stack_entries(fs: list[Module], rslora: bool):
    """The per-entry modules of one stacked or fused leaf as `a (*stack, *in, r)`,
    `b (*stack, r, *out)`, `stack` the leaf's first `len(entry)` axes.

    Ranks are zero-padded to the largest, entries the adapter lacks are zero, and
    one scale serves the leaf: that of most entries; an entry with another scale
    (another rank or alpha by `rank_pattern` / `alpha_pattern`) has the ratio
    folded into its `B`, which keeps its product `s_e · A_e B_e` (to float
    rounding)."""
    k = len(fs[0].at)
    stack = fs[0].leaf_shape[:k]
    shape, (ins, outs) = fs[0].shape, fs[0].groups
    r_max = max(f.rank for f in fs)
    # An IA3 entry (rank 0) has no scale.
    scales = [lora_scale(f.alpha, f.rank, rslora) if f.rank else None for f in fs]
    live = [sc for sc in scales if sc is not None]
    s_leaf = _most_common(live) if live else 0.0
    dtype = np.result_type(*[f.a.dtype for f in fs], *[f.b.dtype for f in fs])
    a = np.zeros((*stack, *(shape[ax] for ax in ins), r_max), dtype)
    b = np.zeros((*stack, r_max, *(shape[ax] for ax in outs)), dtype)
    for f, s in zip(fs, scales):
        r, at = f.rank, f.at
        a_e, b_e = _leaf_factors(f)
        if s is not None and s != s_leaf:
            b_e = (b_e.astype(np.float64) * (s / s_leaf)).astype(dtype)
        a[(*at, Ellipsis, slice(0, r))] = a_e
        b[(*at, slice(0, r))] = b_e
    return a, b, r_max, lora_alpha(s_leaf, r_max, rslora)


def _most_common(values):
    return Counter(values).most_common(1)[0][0]
