"""Orientation: which axes of a module's leaf are its input and which its output."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping

from ..._core.errors import PeftFormatError
from ._names import _is_int
from ._records import Module

_ORIENTATIONS = ("in_out", "out_in")
# The in- and out-axes of a 2-D module weight in each orientation.
_GROUPS = {"in_out": ((0,), (1,)), "out_in": ((1,), (0,))}
_NAMES = {g: o for o, g in _GROUPS.items()}


def _orientation_override(orientation, path: str):
    """The `orientation` given for `path`: `'in_out'`, `'out_in'`, a pair
    `(in_axes, out_axes)` of the leaf's axes, or None."""
    if orientation is None:
        return None
    if isinstance(orientation, (str, tuple, list)):
        choice = orientation
    elif isinstance(orientation, Mapping):
        choice = next(
            (v for pat, v in orientation.items() if re.search(pat, path)), None
        )
        if choice is None:
            return None
    else:
        raise TypeError(
            "orientation must be 'in_out', 'out_in', a pair (in_axes, out_axes), "
            "or a dict from a regex over tree paths to one of those; got "
            f"{type(orientation).__name__}."
        )
    if isinstance(choice, (tuple, list)):
        ok = len(choice) == 2 and all(
            isinstance(g, (tuple, list)) and g and all(_is_int(ax) for ax in g)
            for g in choice
        )
        if not ok:
            raise ValueError(
                f"orientation {choice!r} for {path!r}: a pair gives the leaf's "
                "(in_axes, out_axes), two non-empty tuples of axes, as in its "
                "LoraRule: ((2,), (1, 3)) for a (3, N, D, H) QKV kernel."
            )
        return tuple(tuple(int(ax) for ax in g) for g in choice)
    if choice not in _ORIENTATIONS:
        raise ValueError(
            f"orientation {choice!r} for {path!r}: use 'in_out' (the leaf is "
            "(in, out), as a Flax Dense kernel) or 'out_in' (the leaf is (out, in), "
            "as a torch Linear weight, an eqx.nn.Linear weight or the Flax GPT-2 "
            "Conv1D kernel), or for a multi-axis leaf the pair (in_axes, out_axes) "
            "of its axes."
        )
    return choice


def _splits(shape: tuple[int, ...], n_in: int, n_out: int) -> list:
    """Every way to split a module weight's axes into an in group and an out group
    (both non-empty, each in increasing order) of `n_in` and `n_out` elements.
    For more than two axes, splits that differ only in where size-1 axes go (the
    same matrix either way) count once."""
    nd, found, seen = len(shape), [], set()
    for mask in itertools.product((False, True), repeat=nd):
        ins = tuple(ax for ax in range(nd) if not mask[ax])
        outs = tuple(ax for ax in range(nd) if mask[ax])
        if not ins or not outs:
            continue
        if math.prod(shape[ax] for ax in ins) != n_in:
            continue
        if math.prod(shape[ax] for ax in outs) != n_out:
            continue
        key = tuple(m for ax, m in enumerate(mask) if shape[ax] != 1 or nd == 2)
        if key not in seen:
            seen.add(key)
            found.append((ins, outs))
    return found


def _on_leaf(f: Module, groups) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A module weight's `(in_axes, out_axes)` as axes of its leaf (after the
    stack entries)."""
    k = 0 if f.at is None else len(f.at)
    return tuple(tuple(ax + k for ax in g) for g in groups)


def _forced_groups(forced, f: Module, fits: list):
    """An `orientation` override as the module weight's groups, checked."""
    shape, nd = f.shape, len(f.shape)
    k = 0 if f.at is None else len(f.at)
    if isinstance(forced, str):
        if nd != 2:
            raise PeftFormatError(
                f"load_peft_adapter: orientation {forced!r} for {f.path!r} "
                f"describes a 2-D weight, but PEFT module {f.module!r} has a "
                f"{nd}-axis weight {shape} there; give the leaf's (in_axes, "
                f"out_axes), as in its LoraRule (here one of "
                f"{', '.join(str(_on_leaf(f, g)) for g in fits) or 'none'})."
            )
        groups = _GROUPS[forced]
    else:
        groups = tuple(tuple(ax - k for ax in g) for g in forced)
        if any(ax < 0 for g in groups for ax in g):
            raise PeftFormatError(
                f"load_peft_adapter: orientation {forced} for {f.path!r} names "
                f"its stack axes {tuple(range(k))} (the entries PEFT module "
                f"{f.module!r} is placed at)."
            )
        groups = tuple(tuple(sorted(g)) for g in groups)
    if groups not in fits:
        raise PeftFormatError(
            f"load_peft_adapter: orientation {forced!r} for {f.path!r} "
            f"contradicts its shape {shape} (in={f.a.shape[1]}, "
            f"out={f.b.shape[0]})."
        )
    return groups


def _orient(found: list[Module], orientation, fan_in_fan_out: bool = False) -> None:
    """Decides, per leaf, which axes of the module's weight are its input and
    which its output (`f.groups`); for 2-D weights that is `(in, out)` or
    `(out, in)`.

    The tree states its own convention, and that decides first: an
    `eqx.nn.Linear` weight is `(out, in)`, an embedding table `(vocab, dim)` (a
    tied head's update on it too, its factors already swapped to the table's
    axes), and a leaf named `kernel` (Flax `Dense`, `DenseGeneral`, NNX
    `Linear`) `(in, out)`, unless the config sets `fan_in_fan_out` (PEFT's mark
    of GPT-2's `Conv1D`, whose Flax port keeps `(out, in)` kernels). A shape
    that contradicts the convention is refused, never read the other way. Other
    leaves go by their shapes, then by the adapter's leaves of the same name,
    then `orientation=`."""
    undecided = []
    for f in found:
        shape, (r, n_in), (n_out, _) = f.shape, f.a.shape, f.b.shape
        del r
        fits = _splits(shape, n_in, n_out)
        f.fits = fits
        if not fits:
            raise PeftFormatError(
                f"load_peft_adapter: PEFT module {f.module!r} has in={n_in}, "
                f"out={n_out}, but its leaf {f.path!r} has shape {shape}"
                + ("" if f.at is None else f" (after the stack entry {f.at})")
                + ": the adapter was made for another model, or key_map points at "
                "the wrong leaf."
            )
        forced = _orientation_override(orientation, f.path)
        if f.known_groups is not None:
            f.groups = f.known_groups
        elif f.kind == "head":
            # A head's update on a tied (vocab, dim) table, in the table's axes.
            f.groups = _GROUPS["in_out"]
            if f.groups not in fits:
                raise PeftFormatError(
                    f"load_peft_adapter: PEFT module {f.module!r} is a head with "
                    f"vocab={n_in}, dim={n_out}, and key_map sends it to the "
                    f"embedding table {f.path!r} of shape {shape}, which is not "
                    f"({n_in}, {n_out}): wrong model or key_map."
                )
        elif forced is not None:
            f.groups = _forced_groups(forced, f, fits)
        elif f.is_linear and len(shape) == 2:
            f.groups = _GROUPS["out_in"]  # eqx.nn.Linear.weight is (out, in)
            if f.groups not in fits:
                raise PeftFormatError(
                    f"load_peft_adapter: PEFT module {f.module!r} has in={n_in}, "
                    f"out={n_out}, but the eqx.nn.Linear weight {f.path!r} has "
                    f"shape {shape} (an (out, in) weight): wrong model or key_map."
                )
        elif f.kind in ("embedding", "tokens") and len(shape) == 2:
            f.groups = _GROUPS["in_out"]  # JAX embedding tables are (vocab, dim)
            if f.groups not in fits:
                raise PeftFormatError(
                    f"load_peft_adapter: embedding {f.module!r} has vocab={n_in}, "
                    f"dim={n_out}, but {f.path!r} has shape {shape}; pass "
                    "orientation={...: 'out_in'} if that table is stored (dim, vocab)."
                )
        elif f.weight_name == "kernel" and len(shape) == 2 and not fan_in_fan_out:
            f.groups = _GROUPS["in_out"]  # Flax Dense / NNX Linear: (in, out)
            if f.groups not in fits:
                raise PeftFormatError(
                    f"load_peft_adapter: PEFT module {f.module!r} has in={n_in}, "
                    f"out={n_out}, and its leaf {f.path!r} is a Flax kernel (Dense, "
                    f"NNX Linear: (in, out)) of shape {shape}, which is (out, in) "
                    "for this module: the adapter was made for a model with the "
                    "transposed shapes, or key_map points at the wrong leaf. If "
                    "this tree really keeps (out, in) kernels, say so with "
                    f"`orientation={{{re.escape(f.path)!r}: 'out_in'}}`."
                )
        elif len(fits) == 1:
            f.groups = fits[0]
        else:
            f.groups = None
            undecided.append(f)
    decided = [g for g in found if g.groups is not None]
    for f in undecided:
        seen = {
            g.groups
            for g in decided
            if g.kind == "linear"
            and not g.is_linear
            and g.weight_name == f.weight_name
            and len(g.shape) == len(f.shape)
        }
        if len(seen) == 1 and next(iter(seen)) in f.fits:
            f.groups = seen.pop()
            continue
        why = (
            "the adapter's other leaves disagree"
            if len(seen) > 1
            else "no non-square leaf of the adapter shows the convention"
            if not seen
            else "the adapter's other leaves follow a convention that does not fit"
        )
        if len(f.shape) == 2:
            raise PeftFormatError(
                f"load_peft_adapter: {f.path!r} (PEFT module {f.module!r}) "
                f"is square, {f.shape}, and {why}, so it cannot tell whether the "
                "leaf is (in, out) as a Flax Dense kernel or (out, in) as a torch "
                "Linear weight; a wrong guess is a silently wrong model. Say which "
                "with `orientation='in_out'` or `'out_in'` (or a dict from a regex "
                "over tree paths to one of those)."
            )
        if not seen:
            why = f"no other {len(f.shape)}-axis leaf of the adapter decides it"
        options = [_on_leaf(f, g) for g in f.fits]
        raise PeftFormatError(
            f"load_peft_adapter: PEFT module {f.module!r} (in={f.a.shape[1]}, "
            f"out={f.b.shape[0]}) fits the axes of {f.path!r} (shape "
            f"{f.leaf_shape}) in {len(options)} ways, as (in_axes, out_axes) "
            f"{', '.join(map(str, options))}, and {why}; a wrong guess is a "
            "silently wrong model. Say which with `orientation={"
            f"{re.escape(f.path)!r}: {options[0]}}}` (the leaf's axes, as in "
            "its LoraRule)."
        )
