"""Saving and loading adapters: arrays with orbax, metadata in a checksummed manifest.

A checkpoint is a directory:

    path/
      lorax_adapter.json      the manifest (JSON)
      arrays-<32 hex>/        the arrays, one orbax checkpoint, named by the manifest
      .lorax_adapter.lock     an (empty) lock file, held while saving and loading

The manifest holds the format name (`"lorax_arrays.adapter"`) and version, the kind
(`"adapter"` or `"stack"`), the version of lorax_arrays that wrote it, the name of
the arrays directory, the stack's `n_adapters` and `names`, and per adapted leaf its
path, shape, in/out/stack axes, rank(s), alpha(s), `use_rslora` and, for each of its
arrays (`a`, `b`, a stack's `scale`, and the vectors of LoRA variants:
`magnitude`, `in_scale`, `out_scale`, with a stack's per-adapter `variants`
flags), the orbax key, dtype, shape and the SHA-256 of the array's bytes in C
order. It also lists every file under the arrays directory with its size and
SHA-256, and ends with a `checksum`: the SHA-256 of the canonical
JSON (sorted keys, no spaces) of everything else. The file itself is that same
content written with `json.dumps(..., sort_keys=True, indent=1)`, so a change to any
byte of it is detected.

Each save writes a new arrays directory (orbax writes it under a temporary name and
renames it), fsyncs it, then replaces the manifest atomically (a temporary file and
`os.replace`); only then are older arrays directories removed. A save that dies at
any point leaves the previous manifest, and the arrays it names, untouched; loading
reads only what the manifest names, so leftovers of an interrupted save are ignored
(and removed by the next save).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._adapters.adapter import Adapter
from .._adapters.alora import check_invocation_tokens
from .._adapters.stack import AdapterStack
from .._adapters.targeting import LeafLayout, candidate_leaves
from .._core.errors import CheckpointError
from .._core.layout import check_partition
from .._core.paths import close_matches, flatten_with_paths
from .._core.version import __version__

FORMAT = "lorax_arrays.adapter"
# Format 2 adds the vectors of LoRA variants (DoRA, IA3); a checkpoint without
# them is still written as format 1, which older versions read. Format 3 adds
# `bias_deltas` (PEFT's modules_to_save), which older versions would drop: only
# checkpoints that have them are format 3.
FORMAT_VERSION = 3
# The manifest's array roles of the variants' vectors, and their Adapter fields.
_VECTORS = {
    "magnitude": "magnitudes",
    "in_scale": "in_scales",
    "out_scale": "out_scales",
}
MANIFEST = "lorax_adapter.json"

_LOCK = ".lorax_adapter.lock"
_TMP_MANIFEST = ".lorax_adapter.json.tmp-"
_ARRAYS_RE = re.compile(r"arrays-[0-9a-f]{32}")
# What a save may leave behind besides the manifest and the arrays it names: older
# arrays directories, orbax's temporary directories, temporary manifests, the lock.
_OURS_RE = re.compile(
    r"arrays-[0-9a-f]{32}(\.orbax-checkpoint-tmp.*)?"
    r"|\.lorax_adapter\.json\.tmp-[0-9a-f]{32}"
    r"|\.lorax_adapter\.lock"
)
_ADVICE = (
    "Re-save the adapter with `save_adapter`, or restore the checkpoint directory "
    "from a backup."
)
_CHUNK = 1 << 20


# -- saving --------------------------------------------------------------------------


def save_adapter(path: str | os.PathLike, adapter: Adapter | AdapterStack) -> None:
    """Saves an adapter or an adapter stack to the directory `path`, atomically.

    The arrays are written with orbax, the rest (layouts, ranks, alphas, names,
    dtypes, shapes and SHA-256 checksums of every array and file) to a JSON
    manifest, `path/lorax_adapter.json`. Saving again to the same `path` replaces
    the checkpoint; a save that is interrupted (killed, out of disk) leaves the
    previous one loadable and unchanged. Load it with
    [`lorax_arrays.load_adapter`][]. Values are written bit for bit, in their own
    dtype.

    `path` must be a new or empty directory, or an existing checkpoint: a file, or
    a non-empty directory that is not a checkpoint, is refused (nothing in it is
    touched). Only local (POSIX) filesystems are supported, from a single process.

    **Arguments:**

    - `path`: the checkpoint directory; created (with its parents) if needed.
    - `adapter`: an [`lorax_arrays.Adapter`][] or an
        [`lorax_arrays.AdapterStack`][], with concrete arrays (JAX or NumPy).

    **Returns:**

    Nothing.

    **Raises:**

    `CheckpointError` if `path` exists and is not a checkpoint; `TypeError` if
    `adapter` is neither kind, or holds traced values.
    """
    if not isinstance(adapter, (Adapter, AdapterStack)):
        raise TypeError(
            "save_adapter: expected an lx.Adapter or an lx.AdapterStack, got "
            f"{type(adapter).__name__}."
        )
    root = Path(os.fspath(path))
    arrays, leaves = _flatten(adapter)
    biases = _flatten_biases(adapter, arrays)
    _check_writable(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, exclusive=True):
        _check_writable(root)
        name = f"arrays-{uuid.uuid4().hex}"
        arrays_dir = root / name
        try:
            _write_arrays(arrays_dir, {k: x for k, x in arrays.items() if x.size})
            _fsync_tree(arrays_dir)
            manifest: dict[str, Any] = {
                "format": FORMAT,
                "format_version": (3 if biases else 2 if _has_vectors(adapter) else 1),
                "library_version": _library_version(),
                "kind": "stack" if isinstance(adapter, AdapterStack) else "adapter",
                "arrays_dir": name,
                "leaves": leaves,
                "files": _file_digests(arrays_dir),
            }
            if biases:
                manifest["bias_deltas"] = biases
            if isinstance(adapter, AdapterStack):
                manifest["n_adapters"] = adapter.n_adapters
                names = adapter.names
                manifest["names"] = None if names is None else [str(n) for n in names]
                manifest["fingerprints"] = [
                    adapter[i].fingerprint() for i in range(adapter.n_adapters)
                ]
                if any(t is not None for t in adapter.invocation_tokens):
                    manifest["invocation_tokens"] = [
                        None if t is None else list(t)
                        for t in adapter.invocation_tokens
                    ]
            else:
                manifest["fingerprint"] = adapter.fingerprint()
                if adapter.invocation_tokens is not None:
                    manifest["invocation_tokens"] = list(adapter.invocation_tokens)
            manifest["checksum"] = _checksum(manifest)
            _write_manifest(root, manifest)
        except BaseException:
            # Unless the manifest already names them, nothing needs this save's
            # files: remove them (best effort).
            if not _names(root / MANIFEST, name):
                _remove_leftovers(root, keep=None, only=name)
            raise
        _remove_leftovers(root, keep=name)


def _has_vectors(adapter: Adapter | AdapterStack) -> bool:
    return any(getattr(adapter, field) for field in _VECTORS.values()) or bool(
        getattr(adapter, "vera", None)
    )


# VeRA's trainable vectors `(d, b)` of an Adapter's VeRA leaf (its `a` and `b` are
# the frozen projections).
_VERA = ("vera_d", "vera_b")


def _flatten(adapter: Adapter | AdapterStack) -> tuple[dict[str, np.ndarray], list]:
    """The arrays to write (by orbax key) and the manifest's per-leaf entries."""
    is_stack = isinstance(adapter, AdapterStack)
    arrays: dict[str, np.ndarray] = {}
    leaves = []
    for i, lay in enumerate(adapter.layouts):
        a, b = adapter.weights[lay.path]
        parts = {"a": a, "b": b}
        entry: dict[str, Any] = {
            "path": lay.path,
            "shape": [int(n) for n in lay.shape],
            "in_axes": [int(ax) for ax in lay.in_axes],
            "out_axes": [int(ax) for ax in lay.out_axes],
            "stack_axes": [int(ax) for ax in lay.stack_axes],
        }
        if is_stack:
            parts["scale"] = adapter.scales[lay.path]
            entry["ranks"] = [int(r) for r in adapter.ranks[i]]
            entry["alphas"] = [float(al) for al in adapter.alphas[i]]
            entry["use_rslora"] = [bool(rs) for rs in adapter.use_rslora[i]]
            entry["lookup_only"] = [bool(f) for f in adapter.lookup_only[i]]
            if any(adapter.head_only[i]):
                entry["head_only"] = [bool(f) for f in adapter.head_only[i]]
            if any(any(v) for v in adapter.variants[i]):
                entry["variants"] = [[bool(f) for f in v] for v in adapter.variants[i]]
        else:
            entry["rank"] = int(adapter.ranks[i])
            entry["alpha"] = float(adapter.alphas[i])
            entry["use_rslora"] = bool(adapter.use_rslora[i])
            entry["lookup_only"] = bool(adapter.lookup_only[i])
            if adapter.head_only[i]:
                entry["head_only"] = True
        for role, field in _VECTORS.items():
            if lay.path in getattr(adapter, field):
                parts[role] = getattr(adapter, field)[lay.path]
        if not is_stack and lay.path in adapter.vera:
            parts.update(zip(_VERA, adapter.vera[lay.path]))
        entry["arrays"] = {}
        for role, x in parts.items():
            entry["arrays"][role] = _put(arrays, f"{role}_{i}", x, lay.path, role)
        leaves.append(entry)
    return arrays, leaves


def _flatten_biases(adapter: Adapter | AdapterStack, arrays: dict) -> list:
    """The manifest's entries of `bias_deltas` (`(out,)`, or `(n, out)` for a
    stack), their arrays added to `arrays` as `bias_<k>`."""
    return [
        {
            "path": path,
            "arrays": {"delta": _put(arrays, f"bias_{k}", d, path, "bias delta")},
        }
        for k, (path, d) in enumerate(sorted(adapter.bias_deltas.items()))
    ]


def _put(arrays: dict, key: str, x: Any, path: str, role: str) -> dict:
    """`x` on the host as `arrays[key]`, and its manifest entry."""
    x = arrays[key] = _to_host(x, path, role)
    return {
        "key": key,
        "dtype": x.dtype.name,
        "shape": list(x.shape),
        "sha256": _array_digest(x),
    }


def _to_host(x: Any, path: str, role: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"save_adapter: the {role!r} array at {path!r} is traced (inside "
            "`jax.jit` or another transform); save concrete adapters, outside it."
        )
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise TypeError(
            f"save_adapter: the {role!r} array at {path!r} spans several processes; "
            "only single-process checkpoints are supported."
        )
    x = np.asarray(x)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return np.ascontiguousarray(x)


def _write_arrays(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """One orbax checkpoint at `directory` (orbax writes a temporary directory and
    renames it when complete). Orbax cannot store zero-size arrays; the manifest
    describes those alone."""
    if not arrays:
        directory.mkdir()
        return
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        checkpointer.save(directory.absolute(), args=ocp.args.StandardSave(arrays))
    finally:
        checkpointer.close()


def _fsync_tree(directory: Path) -> None:
    for dirpath, _, filenames in os.walk(directory):
        for fn in filenames:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
    _fsync_dir(directory.parent)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    tmp = root / f"{_TMP_MANIFEST}{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as f:
            f.write(_dump(manifest).encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, root / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(root)


def _names(mpath: Path, name: str) -> bool:
    """Whether the manifest at `mpath` (if any) names the arrays directory `name`."""
    try:
        return f'"arrays_dir": "{name}"' in mpath.read_text("ascii", "replace")
    except OSError:
        return False


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove_leftovers(root: Path, keep: str | None, only: str | None = None) -> None:
    """Older arrays directories and leftovers of interrupted saves (best effort: the
    new checkpoint is complete whether or not they go); with `only`, just the arrays
    directory of that name and its orbax temporaries."""
    for name in os.listdir(root):
        if name in (keep, MANIFEST, _LOCK) or not _OURS_RE.fullmatch(name):
            continue
        if only is not None and name.split(".", 1)[0] != only:
            continue
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _check_writable(root: Path) -> None:
    if not root.exists():
        if root.is_symlink():
            raise CheckpointError(
                f"save_adapter: {str(root)!r} is a broken symbolic link. Choose "
                "another path, or fix the link."
            )
        return
    if not root.is_dir():
        raise CheckpointError(
            f"save_adapter: {str(root)!r} exists and is not a directory (a "
            "checkpoint is a directory). Choose another path; it was left as it is."
        )
    if (root / MANIFEST).exists():
        return
    others = sorted(n for n in os.listdir(root) if not _OURS_RE.fullmatch(n))
    if others:
        shown = ", ".join(repr(n) for n in others[:5])
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        raise CheckpointError(
            f"save_adapter: {str(root)!r} is a non-empty directory that is not a "
            f"lorax_arrays checkpoint (it has no {MANIFEST}; it holds {shown}"
            f"{more}). Refusing to write there, so that none of its files are "
            "touched: choose a new or empty directory, or an existing checkpoint."
        )


# -- loading -------------------------------------------------------------------------


def load_adapter(path: str | os.PathLike, tree: Any = None) -> Adapter | AdapterStack:
    """Loads an adapter or adapter stack saved by [`lorax_arrays.save_adapter`][].

    Every file of the checkpoint is checked against the SHA-256 recorded in the
    manifest before orbax reads it, and every array against its own checksum after,
    so a damaged checkpoint is an error, never an adapter with other values.

    **Arguments:**

    - `path`: the checkpoint directory.
    - `tree`: optionally, the model or parameter tree the adapter is meant for:
        every adapted path must be a weight of `tree` that an adapter can adapt,
        with the shape the adapter was made for.

    **Returns:**

    An [`lorax_arrays.Adapter`][] or an [`lorax_arrays.AdapterStack`][] (whichever
    was saved), its arrays JAX arrays bit for bit as saved.

    **Raises:**

    `CheckpointError` (a `ValueError`) if there is no checkpoint at `path`, or it is
    incomplete, corrupted or of a newer format; the message names the file.
    `ValueError` if `tree` is given and the adapter does not fit it.
    """
    root = Path(os.fspath(path))
    mpath = root / MANIFEST
    if not mpath.is_file():
        if not root.exists():
            why = "the path does not exist"
        elif not root.is_dir():
            why = "it is not a directory"
        else:
            why = f"it has no {MANIFEST} (a save that never completed writes none)"
        raise CheckpointError(
            f"load_adapter: no lorax_arrays checkpoint at {str(root)!r}: {why}. "
            "Check the path, or save the adapter there with `save_adapter`."
        )
    with _locked(root, exclusive=False):
        manifest = _read_manifest(mpath)
        spec = _parse(manifest, mpath)
        if tree is not None:
            _check_tree(spec["layouts"], tree, root)
            _check_tree_biases(spec["biases"], tree, root)
        arrays_dir = root / manifest["arrays_dir"]
        _verify_files(arrays_dir, manifest["files"], mpath)
        stored = {
            info["key"]
            for entry in (*spec["arrays"], *(e for _, e in spec["biases"]))
            for info in entry.values()
            if _size(info["shape"])
        }
        restored = _read_arrays(arrays_dir, mpath) if stored else {}
    arrays = _check_arrays(restored, stored, spec, arrays_dir)
    out = _build(spec, arrays, arrays_dir)
    what = f"load_adapter({str(root)!r})"
    members = [out] if isinstance(out, Adapter) else [out[i] for i in range(len(out))]
    stored = (
        [manifest.get("fingerprint")]
        if isinstance(out, Adapter)
        else manifest.get("fingerprints") or [None] * len(members)
    )
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
                f"does not hold the adapter that was saved. {_ADVICE}"
            )
    if isinstance(out, AdapterStack):
        _check_stack_scales(out, members, what)
    return out


def _check_stack_scales(stack: AdapterStack, members: list[Adapter], what: str):
    """A stack stores each leaf's per-adapter scales and, redundantly, each
    adapter's rank, alpha and rsLoRA flag: they must agree."""
    for lay in stack.layouts:
        stored = np.asarray(stack.scales[lay.path], np.float64)
        want = np.asarray(
            [m.scale(lay.path) if lay.path in m.paths else 0.0 for m in members]
        )
        if not np.allclose(stored, want, rtol=1e-6, atol=0.0):
            raise CheckpointError(
                f"{what}: at {lay.path!r} the stored scales {stored.tolist()} are "
                f"not the adapters' alpha / rank {want.tolist()}: the checkpoint's "
                f"fields disagree. {_ADVICE}"
            )


def _read_manifest(mpath: Path) -> dict[str, Any]:
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(
            f"{mpath}: the checkpoint's manifest is corrupted ({what}). {_ADVICE}"
        )

    try:
        raw = mpath.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{mpath}: cannot read the manifest: {e}.") from e
    try:
        text = raw.decode("ascii")
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"{mpath}: not a lorax_arrays adapter manifest (format {fmt!r}, expected "
            f"{FORMAT!r}). {_ADVICE}"
        )
    # The checksum first: no field (not even the format version) is trusted
    # before it, so a flipped digit reads as damage, not as a newer format.
    if manifest.get("checksum") != _checksum(manifest):
        raise corrupt("its checksum does not match its content")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise corrupt(f"format_version {version!r} is not an integer")
    if version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{mpath}: written in checkpoint format {version} (by lorax_arrays "
            f"{manifest.get('library_version')}); this lorax_arrays "
            f"({_library_version()}) reads format {FORMAT_VERSION} and older. "
            "Upgrade lorax_arrays to load it."
        )
    if _dump(manifest) != text:
        raise corrupt("its bytes are not those lorax_arrays wrote")
    return manifest


def _parse(manifest: dict[str, Any], mpath: Path) -> dict[str, Any]:
    """Layouts, ranks, alphas, names and the array entries, validated."""
    try:
        kind = manifest["kind"]
        if kind not in ("adapter", "stack"):
            raise ValueError(f"unknown kind {kind!r}")
        if not _ARRAYS_RE.fullmatch(manifest["arrays_dir"]):
            raise ValueError(f"bad arrays_dir {manifest['arrays_dir']!r}")
        if not isinstance(manifest["files"], dict):
            raise ValueError("files is not a mapping")
        for rel, info in manifest["files"].items():
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or "" in parts:
                raise ValueError(f"bad file name {rel!r}")
            if not isinstance(info["size"], int) or not isinstance(info["sha256"], str):
                raise ValueError(f"bad entry for file {rel!r}")
        is_stack = kind == "stack"
        n = int(manifest["n_adapters"]) if is_stack else None
        names = manifest["names"] if is_stack else None
        invocation = manifest.get("invocation_tokens")
        if is_stack:
            invocation = tuple(invocation or [None] * n)
            if len(invocation) != n:
                raise ValueError(f"{len(invocation)} invocation_tokens for {n}")
            invocation = tuple(
                check_invocation_tokens(t, "invocation_tokens") for t in invocation
            )
        else:
            invocation = check_invocation_tokens(invocation, "invocation_tokens")
        if names is not None:
            names = tuple(str(x) for x in names)
            if len(names) != n:
                raise ValueError(f"{len(names)} names for {n} adapters")
        layouts, ranks, alphas, rslora, lookup, entries = [], [], [], [], [], []
        heads = []
        variants = []
        for leaf in manifest["leaves"]:
            lay = LeafLayout(
                str(leaf["path"]),
                tuple(int(s) for s in leaf["shape"]),
                tuple(int(ax) for ax in leaf["in_axes"]),
                tuple(int(ax) for ax in leaf["out_axes"]),
                tuple(int(ax) for ax in leaf["stack_axes"]),
            )
            check_partition(
                len(lay.shape), lay.in_axes, lay.out_axes, lay.stack_axes, lay.path
            )
            axes = (*lay.in_axes, *lay.out_axes, *lay.stack_axes)
            if any(not 0 <= ax < len(lay.shape) for ax in axes):
                raise ValueError(f"{lay.path!r}: axes {axes} for shape {lay.shape}")
            if any(lay.path == other.path for other in layouts):
                raise ValueError(f"{lay.path!r} appears twice")
            if is_stack:
                r = tuple(int(x) for x in leaf["ranks"])
                al = tuple(float(x) for x in leaf["alphas"])
                rs = tuple(bool(x) for x in leaf["use_rslora"])
                lk = tuple(bool(x) for x in leaf.get("lookup_only", [False] * n))
                hd = tuple(bool(x) for x in leaf.get("head_only", [False] * n))
                if len(hd) != n:
                    raise ValueError(f"{lay.path!r}: head_only is not {n} flags")
                var = leaf.get("variants", [[False] * 3] * n)
                var = tuple(tuple(bool(f) for f in v) for v in var)
                if not len(r) == len(al) == len(rs) == len(lk) == len(var) == n:
                    raise ValueError(f"{lay.path!r}: per-adapter lists are not {n}")
                if any(len(v) != 3 for v in var):
                    raise ValueError(f"{lay.path!r}: variants are not flag triples")
                mid, rank = (n,), max(r, default=0)
                expected = {"a", "b", "scale"} | {
                    role for k, role in enumerate(_VECTORS) if any(v[k] for v in var)
                }
            else:
                r, al = int(leaf["rank"]), float(leaf["alpha"])
                rs = bool(leaf["use_rslora"])
                lk = bool(leaf.get("lookup_only", False))
                hd = bool(leaf.get("head_only", False))
                var = None
                mid, rank = (), r
                expected = {"a", "b"} | (set(leaf["arrays"]) & {*_VECTORS, *_VERA})
                if len(set(leaf["arrays"]) & set(_VERA)) == 1:
                    raise ValueError(f"{lay.path!r}: one of VeRA's two vectors")
            entry = dict(leaf["arrays"])
            if set(entry) != expected:
                raise ValueError(f"{lay.path!r}: arrays {sorted(entry)}")
            shapes = {
                "a": (*lay.stack_shape, *mid, *lay.in_shape, rank),
                "b": (*lay.stack_shape, *mid, rank, *lay.out_shape),
                "scale": (n,),
                "magnitude": (*lay.stack_shape, *mid, *lay.out_shape),
                "in_scale": (*lay.stack_shape, *mid, *lay.in_shape),
                "out_scale": (*lay.stack_shape, *mid, *lay.out_shape),
                "vera_d": (*lay.stack_shape, rank),
                "vera_b": (*lay.stack_shape, *lay.out_shape),
            }
            for role, info in entry.items():
                if tuple(info["shape"]) != shapes[role]:
                    raise ValueError(
                        f"{lay.path!r}: {role} has shape {tuple(info['shape'])}, "
                        f"its layout needs {shapes[role]}"
                    )
                _check_info(info, f"{lay.path!r}: {role}")
            layouts.append(lay)
            ranks.append(r)
            alphas.append(al)
            rslora.append(rs)
            lookup.append(lk)
            heads.append(hd)
            variants.append(var)
            entries.append(entry)
        biases = _parse_biases(manifest, layouts, n)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{mpath}: the checkpoint's manifest is malformed ({type(e).__name__}: "
            f"{e}). {_ADVICE}"
        ) from e
    return dict(
        biases=biases,
        kind=kind,
        names=names,
        layouts=tuple(layouts),
        ranks=tuple(ranks),
        alphas=tuple(alphas),
        use_rslora=tuple(rslora),
        lookup_only=tuple(lookup),
        head_only=tuple(heads),
        invocation_tokens=invocation,
        variants=tuple(variants),
        arrays=entries,
    )


def _parse_biases(manifest: dict, layouts: list, n: int | None) -> list:
    """The manifest's `bias_deltas` entries as `(path, arrays)`, validated:
    `(out,)` updates for an adapter, `(n, out)` for a stack."""
    out, seen = [], {lay.path for lay in layouts}
    for item in manifest.get("bias_deltas", []):
        path = item["path"]
        if not isinstance(path, str) or path in seen:
            raise ValueError(f"bias path {path!r} is not a new path")
        seen.add(path)
        entry = dict(item["arrays"])
        if set(entry) != {"delta"}:
            raise ValueError(f"bias {path!r}: arrays {sorted(entry)}")
        info = entry["delta"]
        shape = tuple(int(s) for s in info["shape"])
        if len(shape) != (1 if n is None else 2) or (n is not None and shape[0] != n):
            raise ValueError(f"bias {path!r}: delta of shape {shape}")
        _check_info(info, f"bias {path!r}")
        out.append((path, entry))
    return out


def _check_info(info: dict, what: str) -> None:
    """An array's manifest entry names a known dtype, and its key and digest
    are strings."""
    np.dtype(info["dtype"])  # a dtype this NumPy / ml_dtypes knows
    for field in ("key", "sha256"):
        if not isinstance(info[field], str):
            raise TypeError(f"{what} {field} not a string")


def _check_tree_biases(biases: list, tree: Any, root: Path) -> None:
    leaves = dict(flatten_with_paths(tree)[0])
    for path, entry in biases:
        want = tuple(entry["delta"]["shape"])[-1:]
        got = tuple(getattr(leaves.get(path), "shape", ()) or ())
        if path not in leaves or got != want:
            raise ValueError(
                f"load_adapter: the adapter at {str(root)!r} updates a bias of shape "
                f"{want} at {path!r} (PEFT's modules_to_save), but the given tree "
                + ("has no leaf there." if path not in leaves else f"has {got}.")
                + " Was it saved for another model?"
            )


def _check_tree(layouts: tuple[LeafLayout, ...], tree: Any, root: Path) -> None:
    leaves = {path: leaf for path, leaf, _ in candidate_leaves(tree)}
    # Missing paths first: for a model of another depth they say more than the
    # shapes of the layers that both have.
    for lay in layouts:
        if lay.path not in leaves:
            raise ValueError(
                f"load_adapter: the adapter at {str(root)!r} adapts {lay.path!r}, but "
                "the given tree has no weight there that an adapter can adapt."
                f"{close_matches(lay.path, leaves)} Was it saved for another model?"
            )
    for lay in layouts:
        leaf = leaves[lay.path]
        if tuple(leaf.shape) != lay.shape:
            raise ValueError(
                f"load_adapter: the adapter at {str(root)!r} was made for a weight of "
                f"shape {lay.shape} at {lay.path!r}, but the given tree's weight "
                f"there has shape {tuple(leaf.shape)}. Was it saved for another "
                "model (another width or depth)?"
            )


def _verify_files(arrays_dir: Path, files: dict[str, Any], mpath: Path) -> None:
    """Every file the manifest lists, and no other, with its size and SHA-256."""
    if not arrays_dir.is_dir():
        raise CheckpointError(
            f"{arrays_dir}: the arrays directory that {mpath} names is missing. "
            f"{_ADVICE}"
        )
    actual = {}
    for dirpath, _, filenames in os.walk(arrays_dir):
        for fn in filenames:
            full = Path(dirpath, fn)
            actual[full.relative_to(arrays_dir).as_posix()] = full
    missing = sorted(set(files) - set(actual))
    if missing:
        more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{arrays_dir / missing[0]}: this file of the checkpoint is missing{more}."
            f" {_ADVICE}"
        )
    extra = sorted(set(actual) - set(files))
    if extra:
        more = f" (and {len(extra) - 1} more files)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{actual[extra[0]]}: this file is not part of the checkpoint that "
            f"{mpath} describes{more}; the arrays directory was changed. {_ADVICE}"
        )
    for rel in sorted(files):
        info, full = files[rel], actual[rel]
        size = full.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"{full}: this file of the checkpoint has {size} bytes, not the "
                f"{info['size']} it was saved with (truncated or overwritten). "
                f"{_ADVICE}"
            )
        if _file_digest(full) != info["sha256"]:
            raise CheckpointError(
                f"{full}: this file of the checkpoint is corrupted (its SHA-256 "
                f"does not match the one recorded in {mpath}). {_ADVICE}"
            )


def _read_arrays(arrays_dir: Path, mpath: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        restored = checkpointer.restore(arrays_dir.absolute())
    except Exception as e:
        raise CheckpointError(
            f"{arrays_dir}: orbax could not restore the arrays that {mpath} names "
            f"({type(e).__name__}: {e}). {_ADVICE}"
        ) from e
    finally:
        checkpointer.close()
    if not isinstance(restored, dict):
        raise CheckpointError(
            f"{arrays_dir}: orbax restored a {type(restored).__name__}, not the "
            f"arrays that {mpath} names. {_ADVICE}"
        )
    return restored


def _check_arrays(
    restored: dict[str, Any], stored: set[str], spec: dict[str, Any], arrays_dir: Path
) -> list[dict[str, np.ndarray]]:
    if set(restored) != stored:
        raise CheckpointError(
            f"{arrays_dir}: holds arrays {sorted(restored)}, but the manifest names "
            f"{sorted(stored)}. {_ADVICE}"
        )
    out = []
    pairs = [(lay.path, entry) for lay, entry in zip(spec["layouts"], spec["arrays"])]
    for path, entry in pairs + list(spec["biases"]):
        got = {}
        for role, info in entry.items():
            dtype, shape = np.dtype(info["dtype"]), tuple(info["shape"])
            if info["key"] in stored:
                x = np.asarray(restored[info["key"]])
            else:
                x = np.zeros(shape, dtype)
            what = f"{arrays_dir}: the {role!r} array of {path!r}"
            if x.dtype != dtype or x.shape != shape:
                raise CheckpointError(
                    f"{what} was restored as {x.dtype}{x.shape}, but was saved as "
                    f"{dtype}{shape}. {_ADVICE}"
                )
            if _array_digest(x) != info["sha256"]:
                raise CheckpointError(
                    f"{what} does not match its checksum: the checkpoint is "
                    f"corrupted. {_ADVICE}"
                )
            got[role] = x
        out.append(got)
    return out


def _build(
    spec: dict[str, Any], arrays: list[dict[str, np.ndarray]], arrays_dir: Path
) -> Adapter | AdapterStack:
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

    layouts = spec["layouts"]
    arrays, bias_arrays = arrays[: len(layouts)], arrays[len(layouts) :]
    bias_deltas = {
        path: to_jax(got["delta"], path)
        for (path, _), got in zip(spec["biases"], bias_arrays)
    }
    weights = {
        lay.path: (to_jax(got["a"], lay.path), to_jax(got["b"], lay.path))
        for lay, got in zip(layouts, arrays)
    }
    vectors = {
        field: {
            lay.path: to_jax(got[role], lay.path)
            for lay, got in zip(layouts, arrays)
            if role in got
        }
        for role, field in _VECTORS.items()
    }
    vera = {
        lay.path: (to_jax(got["vera_d"], lay.path), to_jax(got["vera_b"], lay.path))
        for lay, got in zip(layouts, arrays)
        if "vera_d" in got
    }
    try:
        if spec["kind"] == "adapter":
            return Adapter(
                weights=weights,
                layouts=layouts,
                ranks=spec["ranks"],
                alphas=spec["alphas"],
                use_rslora=spec["use_rslora"],
                lookup_only=spec["lookup_only"],
                head_only=spec["head_only"],
                invocation_tokens=spec["invocation_tokens"],
                vera=vera,
                bias_deltas=bias_deltas,
                **vectors,
            )
        return AdapterStack(
            weights=weights,
            scales={
                lay.path: to_jax(got["scale"], lay.path)
                for lay, got in zip(layouts, arrays)
            },
            layouts=layouts,
            ranks=spec["ranks"],
            alphas=spec["alphas"],
            use_rslora=spec["use_rslora"],
            names=spec["names"],
            lookup_only=spec["lookup_only"],
            head_only=spec["head_only"],
            invocation_tokens=spec["invocation_tokens"],
            variants=spec["variants"],
            bias_deltas=bias_deltas,
            **vectors,
        )
    except ValueError as e:
        raise CheckpointError(
            f"{arrays_dir.parent / MANIFEST}: the checkpoint is inconsistent: {e} "
            f"{_ADVICE}"
        ) from e


# -- shared pieces -------------------------------------------------------------------


@contextlib.contextmanager
def _locked(root: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on `root`: one save at a time, and no load during a save.

    A load does not create the lock file (the checkpoint may be read-only)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    fd = None
    if fcntl is not None:
        flags = os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY
        # Non-blocking: opening a FIFO (or a device) there must not wait forever.
        flags |= getattr(os, "O_NONBLOCK", 0)
        with contextlib.suppress(OSError):
            fd = os.open(root / _LOCK, flags, 0o644)
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(
                f"{root / _LOCK}: the checkpoint's lock file is not a regular file "
                "(a FIFO, a device or a socket), so it cannot be locked; something "
                "other than lorax_arrays put it there. Remove it and try again."
            )
    try:
        if fd is not None:
            with contextlib.suppress(OSError):  # filesystems without flock
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _library_version() -> str:
    return __version__


def _size(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _array_digest(x: np.ndarray) -> str:
    """SHA-256 of the array's bytes in C order."""
    return hashlib.sha256(
        np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    ).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for dirpath, _, filenames in os.walk(directory):
        for fn in filenames:
            full = Path(dirpath, fn)
            out[full.relative_to(directory).as_posix()] = {
                "size": full.stat().st_size,
                "sha256": _file_digest(full),
            }
    return out


def _checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of everything in the manifest but `checksum`."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def _dump(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


__all__ = ["CheckpointError", "load_adapter", "save_adapter"]
