"""Saving and loading adapters: arrays with orbax, metadata in a checksummed manifest.

Two parts: `manifest.py`, the schema (what the manifest holds for an `Adapter` or
an `AdapterStack`, derived from the types' own fields and validated by their own
checks), and `store.py`, the storage engine (atomic writes, the lock, fsync,
checksums, orbax array I/O), which knows nothing of adapters. The on-disk layout
is described in `store.py`, the fields in `manifest.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..._adapters.adapter import Adapter
from ..._adapters.stack import AdapterStack
from ..._core.errors import CheckpointError
from . import manifest, store


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
    contents = manifest.flatten(adapter)
    store.write(Path(os.fspath(path)), contents)


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
    mpath = store.require(root)
    with store.locked(root, exclusive=False):
        ckpt = store.read_manifest(mpath)
        spec = manifest.parse(ckpt)
        if tree is not None:
            manifest.check_fits(spec, tree, root)
        store.verify_files(ckpt)
        restored = store.read_arrays(ckpt, spec.array_sets)
    arrays = store.check_arrays(restored, spec.array_sets, ckpt.arrays_dir)
    out = manifest.build(spec, arrays, ckpt)
    manifest.check_loaded(out, spec, root)
    return out


__all__ = ["CheckpointError", "load_adapter", "save_adapter"]
