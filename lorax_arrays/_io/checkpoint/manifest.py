"""The checkpoint's schema: what its manifest holds for an `Adapter` or an
`AdapterStack`, and how that is read back.

The schema is the types' own fields, not a second list of them:

- per adapted leaf, the fields of its `LeafLayout` (`path`, `shape`, `in_axes`,
  `out_axes`, `stack_axes`), and the type's per-leaf metadata: every static field
  but `layouts`, `names` and `invocation_tokens` (`ranks`, `alphas`, `use_rslora`,
  `lookup_only`, `head_only`, a stack's `variants`), under its own name (an
  Adapter's `ranks` and `alphas` as `rank` and `alpha`), one value per adapter for
  a stack;
- per adapted leaf, the entries (`store.ArrayInfo`) of its arrays in each of the
  type's array fields (`weights`, a stack's `scales`, the variants' `magnitudes`,
  `in_scales`, `out_scales`, an Adapter's `vera`), under their roles (`a`, `b`,
  `scale`, `magnitude`, `in_scale`, `out_scale`, `vera_d`, `vera_b`), with orbax
  keys `<role>_<leaf>`; and a `bias_deltas` list of `{path, arrays: {delta}}`
  (keys `bias_<k>`);
- the kind (`"adapter"` or `"stack"`), a stack's `n_adapters` and `names`, the
  `invocation_tokens` (when set), and the adapters' fingerprints.

A manifest is validated the way the types validate themselves: `parse` builds the
type around placeholders (`jax.ShapeDtypeStruct`s of the recorded dtypes and
shapes), so the type's `__check_init__` checks every shape and flag before a
single array is read, and `build` builds it again around the verified arrays.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..._adapters.adapter import VECTOR_FIELDS, Adapter
from ..._adapters.stack import AdapterStack
from ..._adapters.targeting import LeafLayout, candidate_leaves
from ..._core.errors import CheckpointError
from ..._core.paths import close_matches, flatten_with_paths
from .store import ADVICE, ArrayInfo, ArraySet, Checkpoint, Contents, malformed, put

_KINDS: dict[str, type[Adapter] | type[AdapterStack]] = {
    "adapter": Adapter,
    "stack": AdapterStack,
}


class _ArrayField(NamedTuple):
    roles: tuple[str, ...]  # the manifest's names of its parts (a pair has two)
    since: int  # the first format version that has it


# The array fields of Adapter and AdapterStack. Format 2 adds the vectors of LoRA
# variants (DoRA, IA3, VeRA); a checkpoint without them is still written as
# format 1, which older versions read. Format 3 adds `bias_deltas` (PEFT's
# modules_to_save), which older versions would drop: only checkpoints that have
# them are format 3.
_ARRAY_FIELDS = {
    "weights": _ArrayField(("a", "b"), 1),
    "scales": _ArrayField(("scale",), 1),
    "magnitudes": _ArrayField(("magnitude",), 2),
    "in_scales": _ArrayField(("in_scale",), 2),
    "out_scales": _ArrayField(("out_scale",), 2),
    "vera": _ArrayField(("vera_d", "vera_b"), 2),
    "bias_deltas": _ArrayField(("delta",), 3),
}
# The static fields that are not per leaf; every other static field is per-leaf
# metadata, written with its JSON scalar type below.
_WHOLE = ("layouts", "names", "invocation_tokens")
_PER_LEAF = {
    "ranks": int,
    "alphas": float,
    "use_rslora": bool,
    "lookup_only": bool,
    "head_only": bool,
    "variants": bool,
}
# Every checkpoint has these; the others are unset where absent (written by an
# older version, or only where set).
_REQUIRED = ("ranks", "alphas", "use_rslora")
_WHEN_SET = ("head_only", "variants")
_SINGULAR = {"ranks": "rank", "alphas": "alpha"}  # an Adapter's names per leaf


def array_fields(cls: type) -> list[str]:
    """The array (non-static) fields of `cls`, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]


def per_leaf_fields(cls: type) -> list[str]:
    """The per-leaf metadata fields of `cls`: its static fields but `_WHOLE`."""
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.metadata.get("static") and f.name not in _WHOLE
    ]


def _key(name: str, is_stack: bool) -> str:
    return name if is_stack else _SINGULAR.get(name, name)


def _depth(name: str, is_stack: bool) -> int:
    """How deep a per-leaf value nests: one value per adapter in a stack, and a
    variant's flags are a triple."""
    return int(is_stack) + int(name == "variants")


def _to_json(value: Any, cast: type) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v, cast) for v in value]
    return cast(value)


def _from_json(value: Any, cast: type, depth: int) -> Any:
    """`value` of nesting `depth` as tuples of `cast` (a list where a scalar is
    due, or a scalar where a list is, is an error)."""
    if depth == 0:
        if isinstance(value, (list, dict)):
            raise TypeError(f"{value!r} is not a {cast.__name__}")
        return cast(value)
    if not isinstance(value, list):
        raise TypeError(f"{value!r} is not a list")
    return tuple(_from_json(v, cast, depth - 1) for v in value)


def _any(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_any(v) for v in value)
    return bool(value)


def _unset(name: str, n: int | None) -> Any:
    flag = [False] * len(VECTOR_FIELDS) if name == "variants" else False
    return flag if n is None else [flag] * n


# -- saving --------------------------------------------------------------------------


def flatten(adapter: Adapter | AdapterStack) -> Contents:
    """The manifest's fields for `adapter`, its arrays by orbax key, and the oldest
    format version that holds them."""
    cls = type(adapter)
    is_stack = isinstance(adapter, AdapterStack)
    arrays: dict[str, np.ndarray] = {}
    leaves = []
    fields = [f for f in array_fields(cls) if f != "bias_deltas"]
    for i, lay in enumerate(adapter.layouts):
        entry: dict[str, Any] = {
            f.name: _to_json(getattr(lay, f.name), str if f.name == "path" else int)
            for f in dataclasses.fields(LeafLayout)
        }
        for name in per_leaf_fields(cls):
            value = getattr(adapter, name)[i]
            if name not in _WHEN_SET or _any(value):
                entry[_key(name, is_stack)] = _to_json(value, _PER_LEAF[name])
        entry["arrays"] = {}
        for name in fields:
            value = getattr(adapter, name).get(lay.path)
            if value is None:
                continue
            roles = _ARRAY_FIELDS[name].roles
            parts = value if len(roles) > 1 else (value,)
            for role, x in zip(roles, parts, strict=True):
                info = put(arrays, f"{role}_{i}", x, lay.path, role)
                entry["arrays"][role] = info.to_json()
        leaves.append(entry)
    out: dict[str, Any] = {
        "kind": "stack" if is_stack else "adapter",
        "leaves": leaves,
    }
    biases = [
        {
            "path": path,
            "arrays": {
                "delta": put(arrays, f"bias_{k}", d, path, "bias delta").to_json()
            },
        }
        for k, (path, d) in enumerate(sorted(adapter.bias_deltas.items()))
    ]
    if biases:
        out["bias_deltas"] = biases
    if isinstance(adapter, AdapterStack):
        out["n_adapters"] = adapter.n_adapters
        names = adapter.names
        out["names"] = None if names is None else [str(n) for n in names]
        out["fingerprints"] = [
            adapter[i].fingerprint() for i in range(adapter.n_adapters)
        ]
        if any(t is not None for t in adapter.invocation_tokens):
            out["invocation_tokens"] = [
                None if t is None else list(t) for t in adapter.invocation_tokens
            ]
    else:
        out["fingerprint"] = adapter.fingerprint()
        if adapter.invocation_tokens is not None:
            out["invocation_tokens"] = list(adapter.invocation_tokens)
    version = max(
        [1, *(_ARRAY_FIELDS[f].since for f in array_fields(cls) if getattr(adapter, f))]
    )
    return Contents(out, arrays, version)


# -- loading -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a manifest describes, validated: the type's static fields, each
    leaf's and bias's array entries, the stored fingerprints, and the adapter
    built around placeholders (`skeleton`)."""

    kind: type[Adapter] | type[AdapterStack]
    static: dict[str, Any]
    leaves: tuple[ArraySet, ...]
    biases: tuple[ArraySet, ...]
    fingerprints: tuple[str | None, ...] | None
    skeleton: Adapter | AdapterStack

    @property
    def layouts(self) -> tuple[LeafLayout, ...]:
        return self.skeleton.layouts

    @property
    def array_sets(self) -> tuple[ArraySet, ...]:
        """Every array entry: the leaves', then the biases'."""
        return (*self.leaves, *self.biases)


def parse(ckpt: Checkpoint) -> Spec:
    """The manifest's adapter, validated by building its type around placeholders
    of the recorded dtypes and shapes (nothing is read but the manifest)."""
    m = ckpt.fields
    try:
        kind = m["kind"]
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        cls = _KINDS[kind]
        is_stack = cls is AdapterStack
        n = int(m["n_adapters"]) if is_stack else None
        fields = [f for f in array_fields(cls) if f != "bias_deltas"]
        known = {role for f in fields for role in _ARRAY_FIELDS[f].roles}
        layouts, leaves = [], []
        per_leaf: dict[str, list] = {name: [] for name in per_leaf_fields(cls)}
        for leaf in m["leaves"]:
            lay = _layout(leaf)
            layouts.append(lay)
            for name, values in per_leaf.items():
                key = _key(name, is_stack)
                raw = leaf[key] if name in _REQUIRED else leaf.get(key, _unset(name, n))
                values.append(_from_json(raw, _PER_LEAF[name], _depth(name, is_stack)))
            entry = dict(leaf["arrays"])
            if not set(entry) <= known:
                raise ValueError(f"{lay.path!r}: arrays {sorted(entry)}")
            infos = {
                role: ArrayInfo.from_json(info, f"{lay.path!r}: {role}")
                for role, info in entry.items()
            }
            leaves.append(ArraySet(lay.path, infos))
        biases = _biases(m, layouts)
        static: dict[str, Any] = {
            "layouts": tuple(layouts),
            **{name: tuple(values) for name, values in per_leaf.items()},
        }
        tokens = m.get("invocation_tokens")
        if is_stack:
            names = m["names"]
            static["names"] = None if names is None else tuple(str(x) for x in names)
            static["invocation_tokens"] = tuple(tokens or ())
            stored = m.get("fingerprints")
            fingerprints = None if not stored else tuple(stored)
        else:
            static["invocation_tokens"] = tokens
            fingerprints = (m.get("fingerprint"),)
        placeholders = [
            {
                role: jax.ShapeDtypeStruct(i.shape, i.dtype)
                for role, i in s.arrays.items()
            }
            for s in (*leaves, *biases)
        ]
        skeleton = _assemble(cls, static, leaves, biases, placeholders)
        if is_stack and layouts and skeleton.n_adapters != n:
            raise ValueError(f"n_adapters {n} for {skeleton.n_adapters} adapters")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise malformed(ckpt.manifest, e) from e
    return Spec(cls, static, tuple(leaves), tuple(biases), fingerprints, skeleton)


def _layout(leaf: dict[str, Any]) -> LeafLayout:
    """A leaf's `LeafLayout` from its fields, its axes a partition of its shape."""
    lay = LeafLayout(
        **{
            f.name: str(leaf[f.name])
            if f.name == "path"
            else tuple(int(x) for x in leaf[f.name])
            for f in dataclasses.fields(LeafLayout)
        }
    )
    lay.layout.check(len(lay.shape), lay.path)
    axes = (*lay.in_axes, *lay.out_axes, *lay.stack_axes)
    if any(not 0 <= ax < len(lay.shape) for ax in axes):
        raise ValueError(f"{lay.path!r}: axes {axes} for shape {lay.shape}")
    return lay


def _biases(m: dict[str, Any], layouts: list[LeafLayout]) -> list[ArraySet]:
    """The manifest's `bias_deltas` entries (their shapes are the type's to
    check)."""
    out, seen = [], {lay.path for lay in layouts}
    for item in m.get("bias_deltas", []):
        path = item["path"]
        if not isinstance(path, str) or path in seen:
            raise ValueError(f"bias path {path!r} is not a new path")
        seen.add(path)
        entry = dict(item["arrays"])
        if set(entry) != {"delta"}:
            raise ValueError(f"bias {path!r}: arrays {sorted(entry)}")
        out.append(
            ArraySet(
                path, {"delta": ArrayInfo.from_json(entry["delta"], f"bias {path!r}")}
            )
        )
    return out


def _assemble(
    cls: type[Adapter] | type[AdapterStack],
    static: dict[str, Any],
    leaves: Sequence[ArraySet],
    biases: Sequence[ArraySet],
    values: Sequence[dict[str, Any]],
) -> Adapter | AdapterStack:
    """`cls` from its static fields and each leaf's and bias's arrays by role
    (placeholders or arrays): the type checks them."""
    kwargs = dict(static)
    at_leaves = list(zip(leaves, values[: len(leaves)]))
    for name in array_fields(cls):
        if name == "bias_deltas":
            continue
        roles = _ARRAY_FIELDS[name].roles
        kwargs[name] = {
            s.path: tuple(got[r] for r in roles) if len(roles) > 1 else got[roles[0]]
            for s, got in at_leaves
            if any(r in got for r in roles)
        }
    kwargs["bias_deltas"] = {
        s.path: got["delta"] for s, got in zip(biases, values[len(leaves) :])
    }
    return cls(**kwargs)


def check_fits(spec: Spec, tree: Any, root: Path) -> None:
    """Every adapted path is a weight of `tree` that an adapter can adapt, of the
    shape the adapter was made for, and every bias path a bias of its size."""
    leaves = {path: leaf for path, leaf, _ in candidate_leaves(tree)}
    # Missing paths first: for a model of another depth they say more than the
    # shapes of the layers that both have.
    for lay in spec.layouts:
        if lay.path not in leaves:
            raise ValueError(
                f"load_adapter: the adapter at {str(root)!r} adapts {lay.path!r}, but "
                "the given tree has no weight there that an adapter can adapt."
                f"{close_matches(lay.path, leaves)} Was it saved for another model?"
            )
    for lay in spec.layouts:
        leaf = leaves[lay.path]
        if tuple(leaf.shape) != lay.shape:
            raise ValueError(
                f"load_adapter: the adapter at {str(root)!r} was made for a weight of "
                f"shape {lay.shape} at {lay.path!r}, but the given tree's weight "
                f"there has shape {tuple(leaf.shape)}. Was it saved for another "
                "model (another width or depth)?"
            )
    all_leaves = dict(flatten_with_paths(tree)[0])
    for path, entry in spec.biases:
        want = entry["delta"].shape[-1:]
        got = tuple(getattr(all_leaves.get(path), "shape", ()) or ())
        if path not in all_leaves or got != want:
            raise ValueError(
                f"load_adapter: the adapter at {str(root)!r} updates a bias of shape "
                f"{want} at {path!r} (PEFT's modules_to_save), but the given tree "
                + ("has no leaf there." if path not in all_leaves else f"has {got}.")
                + " Was it saved for another model?"
            )


def build(
    spec: Spec, arrays: Sequence[dict[str, np.ndarray]], ckpt: Checkpoint
) -> Adapter | AdapterStack:
    """The adapter from its verified arrays (`store.check_arrays`), as JAX
    arrays."""

    def to_jax(x: np.ndarray, path: str) -> jax.Array:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            y = jnp.asarray(x)
        if y.dtype != x.dtype:
            raise ValueError(
                f"load_adapter: an array at {path!r} was saved as {x.dtype}, which "
                f"JAX would turn into {y.dtype}. Enable 64-bit types first with "
                "`jax.config.update('jax_enable_x64', True)`."
            )
        return y

    values = [
        {role: to_jax(x, s.path) for role, x in got.items()}
        for s, got in zip(spec.array_sets, arrays, strict=True)
    ]
    try:
        return _assemble(spec.kind, spec.static, spec.leaves, spec.biases, values)
    except ValueError as e:
        raise CheckpointError(
            f"{ckpt.manifest}: the checkpoint is inconsistent: {e} {ADVICE}"
        ) from e


def check_loaded(out: Adapter | AdapterStack, spec: Spec, root: Path) -> None:
    """Every adapter of `out` is finite and has the fingerprint it was saved with,
    and a stack's scales agree with its ranks, alphas and rsLoRA flags."""
    what = f"load_adapter({str(root)!r})"
    members = [out] if isinstance(out, Adapter) else [out[i] for i in range(len(out))]
    stored = spec.fingerprints or (None,) * len(members)
    for i, (member, want) in enumerate(zip(members, stored)):
        label = what
        if isinstance(out, AdapterStack):
            label += f": adapter {i}" + (f" ({out.names[i]!r})" if out.names else "")
        member.check_finite(label)
        # Checkpoints written before fingerprints were stored have none.
        if want is not None and member.fingerprint() != want:
            raise CheckpointError(
                f"{label}: the loaded adapter's fingerprint {member.fingerprint()} "
                f"is not the {want} recorded when it was saved: the checkpoint "
                f"does not hold the adapter that was saved. {ADVICE}"
            )
    if isinstance(out, AdapterStack):
        _check_stack_scales(out, members, what)


def _check_stack_scales(stack: AdapterStack, members: list[Adapter], what: str):
    """A stack stores each leaf's per-adapter scales and, redundantly, each
    adapter's rank, alpha and rsLoRA flag: they must agree (0 where the adapter
    has no update there, or a head-only one, as `stack_adapters` sets them)."""

    def scale(m: Adapter, path: str) -> float:
        if path not in m.paths or m.head_only[m.paths.index(path)]:
            return 0.0
        return m.scale(path)

    for lay in stack.layouts:
        stored = np.asarray(stack.scales[lay.path], np.float64)
        want = np.asarray([scale(m, lay.path) for m in members])
        if not np.allclose(stored, want, rtol=1e-6, atol=0.0):
            raise CheckpointError(
                f"{what}: at {lay.path!r} the stored scales {stored.tolist()} are "
                f"not the adapters' alpha / rank {want.tolist()}: the checkpoint's "
                f"fields disagree. {ADVICE}"
            )
