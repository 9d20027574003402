"""Reading and writing `.safetensors` files with NumPy only.

The format is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}`) and one byte
buffer. We parse it ourselves rather than through `safetensors.numpy` because
NumPy has no bfloat16 and that API refuses the bf16 files most PEFT adapters are
trained in; `ml_dtypes` (a JAX dependency) supplies bf16 and the float8 types.
Every inconsistency (a truncated file, overlapping or out-of-range offsets, a size
that does not match the shape) is an error naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .._core.errors import SafetensorsError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dt: name for name, dt in _DTYPES.items()}
# A header larger than this is not a LoRA adapter (the reference reader caps it
# at 100 MB too).
_MAX_HEADER = 100_000_000


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """All tensors of a `.safetensors` file, and its `__metadata__`.

    **Arguments:**

    - `path`: the file.

    **Returns:**

    `(tensors, metadata)`: a dict from name to a NumPy array (bf16 as
    `ml_dtypes.bfloat16`) and the file's string metadata.
    """
    path = Path(path)
    data = path.read_bytes()

    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(
            f"{path}: not a readable .safetensors file ({why}). The file is "
            "truncated or corrupt: copy it again from its source."
        )

    if len(data) < 8:
        raise bad(f"only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise bad(f"header length {n} but the file has {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad(
            f"its __metadata__ is {metadata!r}; the format allows a mapping from "
            "strings to strings"
        )
    buffer = memoryview(data)[8 + n :]
    spans = []
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            if isinstance(info, dict) and info.get("dtype") not in _DTYPES:
                raise bad(
                    f"tensor {name!r} has dtype {info.get('dtype')!r}, which is not "
                    f"one of {sorted(_DTYPES)}"
                ) from None
            raise bad(f"tensor {name!r} has a malformed entry {info!r}") from None
        if any(s < 0 for s in shape):
            raise bad(f"tensor {name!r} has a negative dimension in its shape {shape}")
        if not 0 <= start <= end <= len(buffer):
            raise bad(
                f"tensor {name!r} spans bytes {start}..{end} of a "
                f"{len(buffer)}-byte buffer"
            )
        if end - start != math.prod(shape) * dtype.itemsize:
            raise bad(
                f"tensor {name!r} of shape {shape} and dtype {info['dtype']} needs "
                f"{math.prod(shape) * dtype.itemsize} bytes, its offsets give "
                f"{end - start}"
            )
        spans.append((start, end, name))
        arr = np.frombuffer(buffer[start:end], dtype=dtype).reshape(shape)
        tensors[name] = arr.copy()
    spans.sort()
    covered = 0
    for start, end, name in spans:
        if start != covered:
            raise bad(f"tensor {name!r} starts at byte {start}, expected {covered}")
        covered = end
    if covered != len(buffer):
        raise bad(f"{len(buffer) - covered} bytes after the last tensor")
    return tensors, dict(metadata)


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes `tensors` to a `.safetensors` file (atomically: temp file, rename).

    **Arguments:**

    - `path`: the file to write.
    - `tensors`: name to array; any dtype in the format (bf16 as
        `ml_dtypes.bfloat16`).
    - `metadata`: optional string-to-string metadata (`{"format": "pt"}` for
        PyTorch readers).
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise TypeError(
                f"write_safetensors: {name!r} has dtype {arr.dtype}, which "
                f".safetensors cannot store; cast it to one of "
                f"{sorted(str(d) for d in _NAMES)}."
            )
        raw = arr.tobytes()
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # align the buffer to 8 bytes, as the spec asks
    write_atomically(path, [struct.pack("<Q", len(head)), head, *chunks])


def write_atomically(path: str | os.PathLike, chunks) -> None:
    """Writes the byte strings `chunks` to `path` through a temporary file that is
    fsynced and renamed over it, so a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        for raw in chunks:
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
