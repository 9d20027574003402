"""The checkpoint store: atomic directory writes, the lock, fsync, checksums, and
orbax array I/O. It knows nothing of adapters: `manifest.py` says what a manifest
holds, this module how it is written, verified and read.

A checkpoint is a directory:

    path/
      lorax_adapter.json      the manifest (JSON)
      arrays-<32 hex>/        the arrays, one orbax checkpoint, named by the manifest
      .lorax_adapter.lock     an (empty) lock file, held while saving and loading

Besides the schema's fields, the manifest holds the format name
(`"lorax_arrays.adapter"`) and version, the version of lorax_arrays that wrote it,
the name of the arrays directory, every file under that directory with its size
and SHA-256, and ends with a `checksum`: the SHA-256 of the canonical JSON (sorted
keys, no spaces) of everything else. The file itself is that same content written
with `json.dumps(..., sort_keys=True, indent=1)`, so a change to any byte of it is
detected. Each array's entry (`ArrayInfo`) records its orbax key, dtype, shape and
the SHA-256 of its bytes in C order.

Each save writes a new arrays directory (orbax writes it under a temporary name and
renames it), fsyncs it, then replaces the manifest atomically (a temporary file and
`os.replace`); only then are older arrays directories removed. A save that dies at
any point leaves the previous manifest, and the arrays it names, untouched; loading
reads only what the manifest names, so leftovers of an interrupted save are ignored
(and removed by the next save).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from ..._core.errors import CheckpointError
from ..._core.version import __version__

FORMAT = "lorax_arrays.adapter"
# The newest format this version reads (`manifest.py` says what each adds and
# writes the oldest one that holds a given adapter).
FORMAT_VERSION = 3
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
ADVICE = (
    "Re-save the adapter with `save_adapter`, or restore the checkpoint directory "
    "from a backup."
)
_CHUNK = 1 << 20


# -- records -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One array's manifest entry: its orbax key, dtype, shape and SHA-256."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    sha256: str

    @property
    def size(self) -> int:
        """Its number of elements (orbax cannot store zero-size arrays: the entry
        alone describes those)."""
        out = 1
        for s in self.shape:
            out *= s
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, info: Mapping[str, Any], what: str) -> ArrayInfo:
        """The entry `info`, checked: a dtype this NumPy / ml_dtypes knows, an
        integer shape, a string key and digest."""
        for field in ("key", "sha256"):
            if not isinstance(info[field], str):
                raise TypeError(f"{what} {field} not a string")
        shape = tuple(int(s) for s in info["shape"])
        return cls(info["key"], np.dtype(info["dtype"]), shape, info["sha256"])


class ArraySet(NamedTuple):
    """The arrays of one adapted leaf (or bias), by their role in the manifest."""

    path: str
    arrays: Mapping[str, ArrayInfo]


class FileInfo(NamedTuple):
    """A file of the arrays directory, as the manifest records it."""

    size: int
    sha256: str


class Contents(NamedTuple):
    """What a save writes: the schema's fields of the manifest (JSON), the arrays by
    orbax key, and the format version that the fields need."""

    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    format_version: int


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A manifest whose checksum, format and bytes are verified: all of its fields
    (the schema's among them), and the files of the arrays directory it names."""

    manifest: Path
    fields: dict[str, Any]
    arrays_dir: Path
    files: dict[str, FileInfo]


def malformed(mpath: Path, e: Exception) -> CheckpointError:
    """The error for a manifest whose checksum holds but whose content is not
    something a save writes."""
    return CheckpointError(
        f"{mpath}: the checkpoint's manifest is malformed ({type(e).__name__}: "
        f"{e}). {ADVICE}"
    )


# -- saving --------------------------------------------------------------------------


def put(
    arrays: dict[str, np.ndarray], key: str, x: Any, path: str, role: str
) -> ArrayInfo:
    """`x` on the host as `arrays[key]`, and its manifest entry."""
    x = arrays[key] = _to_host(x, path, role)
    return ArrayInfo(key, x.dtype, tuple(x.shape), array_digest(x))


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


def write(root: Path, contents: Contents) -> None:
    """Writes `contents` as the checkpoint at `root`, atomically (see the module's
    docstring), under the lock."""
    check_writable(root)
    root.mkdir(parents=True, exist_ok=True)
    with locked(root, exclusive=True):
        check_writable(root)
        name = f"arrays-{uuid.uuid4().hex}"
        arrays_dir = root / name
        try:
            _write_arrays(
                arrays_dir, {k: x for k, x in contents.arrays.items() if x.size}
            )
            _fsync_tree(arrays_dir)
            manifest: dict[str, Any] = {
                **contents.fields,
                "format": FORMAT,
                "format_version": contents.format_version,
                "library_version": __version__,
                "arrays_dir": name,
                "files": {
                    rel: info._asdict()
                    for rel, info in file_digests(arrays_dir).items()
                },
            }
            manifest["checksum"] = checksum(manifest)
            _write_manifest(root, manifest)
        except BaseException:
            # Unless the manifest already names them, nothing needs this save's
            # files: remove them (best effort).
            if not _names(root / MANIFEST, name):
                _remove_leftovers(root, keep=None, only=name)
            raise
        _remove_leftovers(root, keep=name)


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
            f.write(dump(manifest).encode("ascii"))
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


def check_writable(root: Path) -> None:
    """`root` is new, empty, an existing checkpoint, or what saves left there."""
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


def require(root: Path) -> Path:
    """The manifest's path, or an error saying why there is no checkpoint."""
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
    return mpath


def read_manifest(mpath: Path) -> Checkpoint:
    """The manifest at `mpath`, verified: its checksum before any field is
    trusted, then its format version, its bytes, and the arrays directory and
    files it names."""

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(
            f"{mpath}: the checkpoint's manifest is corrupted ({what}). {ADVICE}"
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
            f"{FORMAT!r}). {ADVICE}"
        )
    # The checksum first: no field (not even the format version) is trusted
    # before it, so a flipped digit reads as damage, not as a newer format.
    if manifest.get("checksum") != checksum(manifest):
        raise corrupt("its checksum does not match its content")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise corrupt(f"format_version {version!r} is not an integer")
    if version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{mpath}: written in checkpoint format {version} (by lorax_arrays "
            f"{manifest.get('library_version')}); this lorax_arrays "
            f"({__version__}) reads format {FORMAT_VERSION} and older. "
            "Upgrade lorax_arrays to load it."
        )
    if dump(manifest) != text:
        raise corrupt("its bytes are not those lorax_arrays wrote")
    try:
        if not _ARRAYS_RE.fullmatch(manifest["arrays_dir"]):
            raise ValueError(f"bad arrays_dir {manifest['arrays_dir']!r}")
        if not isinstance(manifest["files"], dict):
            raise ValueError("files is not a mapping")
        files = {}
        for rel, info in manifest["files"].items():
            parts = rel.split("/")
            if rel.startswith("/") or ".." in parts or "" in parts:
                raise ValueError(f"bad file name {rel!r}")
            if not isinstance(info["size"], int) or not isinstance(info["sha256"], str):
                raise ValueError(f"bad entry for file {rel!r}")
            files[rel] = FileInfo(info["size"], info["sha256"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise malformed(mpath, e) from e
    return Checkpoint(mpath, manifest, mpath.parent / manifest["arrays_dir"], files)


def verify_files(ckpt: Checkpoint) -> None:
    """Every file the manifest lists, and no other, with its size and SHA-256."""
    arrays_dir, files, mpath = ckpt.arrays_dir, ckpt.files, ckpt.manifest
    if not arrays_dir.is_dir():
        raise CheckpointError(
            f"{arrays_dir}: the arrays directory that {mpath} names is missing. "
            f"{ADVICE}"
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
            f" {ADVICE}"
        )
    extra = sorted(set(actual) - set(files))
    if extra:
        more = f" (and {len(extra) - 1} more files)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{actual[extra[0]]}: this file is not part of the checkpoint that "
            f"{mpath} describes{more}; the arrays directory was changed. {ADVICE}"
        )
    for rel in sorted(files):
        info, full = files[rel], actual[rel]
        size = full.stat().st_size
        if size != info.size:
            raise CheckpointError(
                f"{full}: this file of the checkpoint has {size} bytes, not the "
                f"{info.size} it was saved with (truncated or overwritten). "
                f"{ADVICE}"
            )
        if _file_digest(full) != info.sha256:
            raise CheckpointError(
                f"{full}: this file of the checkpoint is corrupted (its SHA-256 "
                f"does not match the one recorded in {mpath}). {ADVICE}"
            )


def _stored(sets: Sequence[ArraySet]) -> set[str]:
    """The orbax keys of the arrays that orbax holds (not the zero-size ones)."""
    return {info.key for s in sets for info in s.arrays.values() if info.size}


def read_arrays(ckpt: Checkpoint, sets: Sequence[ArraySet]) -> dict[str, Any]:
    """The arrays of `sets` as orbax restores them (nothing read when orbax holds
    none of them); `check_arrays` then checks them."""
    if not _stored(sets):
        return {}
    import orbax.checkpoint as ocp

    arrays_dir, mpath = ckpt.arrays_dir, ckpt.manifest
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        restored = checkpointer.restore(arrays_dir.absolute())
    except Exception as e:
        raise CheckpointError(
            f"{arrays_dir}: orbax could not restore the arrays that {mpath} names "
            f"({type(e).__name__}: {e}). {ADVICE}"
        ) from e
    finally:
        checkpointer.close()
    if not isinstance(restored, dict):
        raise CheckpointError(
            f"{arrays_dir}: orbax restored a {type(restored).__name__}, not the "
            f"arrays that {mpath} names. {ADVICE}"
        )
    return restored


def check_arrays(
    restored: Mapping[str, Any], sets: Sequence[ArraySet], arrays_dir: Path
) -> list[dict[str, np.ndarray]]:
    """Each set's arrays by role, each of the dtype, shape and SHA-256 its entry
    records (zero-size ones made from their entry)."""
    stored = _stored(sets)
    if set(restored) != stored:
        raise CheckpointError(
            f"{arrays_dir}: holds arrays {sorted(restored)}, but the manifest names "
            f"{sorted(stored)}. {ADVICE}"
        )
    out = []
    for path, entry in sets:
        got = {}
        for role, info in entry.items():
            if info.key in stored:
                x = np.asarray(restored[info.key])
            else:
                x = np.zeros(info.shape, info.dtype)
            what = f"{arrays_dir}: the {role!r} array of {path!r}"
            if x.dtype != info.dtype or x.shape != info.shape:
                raise CheckpointError(
                    f"{what} was restored as {x.dtype}{x.shape}, but was saved as "
                    f"{info.dtype}{info.shape}. {ADVICE}"
                )
            if array_digest(x) != info.sha256:
                raise CheckpointError(
                    f"{what} does not match its checksum: the checkpoint is "
                    f"corrupted. {ADVICE}"
                )
            got[role] = x
        out.append(got)
    return out


# -- shared pieces -------------------------------------------------------------------


@contextlib.contextmanager
def locked(root: Path, exclusive: bool) -> Iterator[None]:
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


def array_digest(x: np.ndarray) -> str:
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


def file_digests(directory: Path) -> dict[str, FileInfo]:
    """Every file under `directory` ('/'-joined relative path) with its size and
    SHA-256."""
    out = {}
    for dirpath, _, filenames in os.walk(directory):
        for fn in filenames:
            full = Path(dirpath, fn)
            out[full.relative_to(directory).as_posix()] = FileInfo(
                full.stat().st_size, _file_digest(full)
            )
    return out


def checksum(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of everything in the manifest but `checksum`."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def dump(manifest: Mapping[str, Any]) -> str:
    """The manifest's bytes (as text) as a save writes them."""
    return json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True) + "\n"
