"""PEFT's trainable tokens (`trainable_token_indices`): an adapter's own rows of an
embedding table for a few token ids. PEFT writes them over the table
(`index_copy`), so the update is exact and low rank: for `n` tokens, `ΔE =
onehot(ids)ᵀ (new − E[ids])`, a LoRA of rank `n` with scale 1 on the table, read
by lookups and by a head tied to the table alike (PEFT wraps a tied `lm_head`
with the same rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..._adapters.targeting import lora_alpha
from ..._core.array import dense
from ..._core.errors import PeftFormatError
from ._records import Module

_SUFFIX = ".token_adapter.trainable_tokens_delta"


def split_tokens(
    tensors: dict[str, np.ndarray], prefix: str, file: Path
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The file's tensors without trainable tokens, and the new rows per module."""
    rest, rows = {}, {}
    for key, value in tensors.items():
        if key.endswith(_SUFFIX):
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise PeftFormatError(
                    f"{file}: tensor {key!r} has dtype {value.dtype}; new embedding "
                    "rows are floating point: the file is corrupt."
                )
            module = key.removeprefix(prefix).removesuffix(_SUFFIX)
            rows[module] = value
        else:
            rest[key] = value
    return rest, rows


def token_ids(config: dict, module: str, file: Path) -> list[int]:
    """The token ids of `module`'s trainable rows, by the config (a list for the
    input embedding, or a dict from module name, matched as a suffix)."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        hits = [k for k in spec if module == k or module.endswith("." + k)]
        if len(hits) == 1:
            return spec[hits[0]]
    raise PeftFormatError(
        f"{file}: the file has trainable tokens for {module!r}, but the config's "
        f"trainable_token_indices={spec!r} does not say which tokens they are for: "
        "the directory's two files do not belong together."
    )


def check_token_config(config: dict, file: Path) -> None:
    """`trainable_token_indices`: a list of token ids, or a dict from module name
    to one."""
    spec = config.get("trainable_token_indices")
    if spec is None:
        return
    lists = list(spec.values()) if isinstance(spec, dict) else [spec]
    ok = isinstance(spec, (list, dict)) and all(
        isinstance(ids, list)
        and ids
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        and len(set(ids)) == len(ids)
        for ids in lists
    )
    if not ok or (isinstance(spec, dict) and not all(isinstance(k, str) for k in spec)):
        raise PeftFormatError(
            f"{file}: trainable_token_indices is {spec!r}; expected a list of distinct "
            "token ids, or a dict from embedding module name to one."
        )


def token_module(
    module: str,
    rows: np.ndarray,
    ids: list[int],
    path: str,
    leaf: Any,
    rslora: bool,
    file: Path,
) -> Module:
    """Module `module`'s new rows `(n, dim)` for tokens `ids` as the exact rank-`n`
    update of the table `leaf` `(vocab, dim)` at `path`: PEFT's `A = onehot(ids)`
    `(n, vocab)`, `B = (rows - E[ids])ᵀ` `(dim, n)`, scale 1."""
    shape = tuple(leaf.shape)
    n = len(ids)
    if len(shape) != 2 or rows.ndim != 2 or rows.shape != (n, shape[1]):
        raise PeftFormatError(
            f"{file}: trainable tokens of {module!r} hold rows of shape "
            f"{tuple(rows.shape)} for {n} tokens, and its table {path!r} has shape "
            f"{shape} (vocab, dim): the adapter was made for another model, or "
            "key_map points at the wrong leaf."
        )
    if max(ids) >= shape[0]:
        raise PeftFormatError(
            f"{file}: trainable token id {max(ids)} of {module!r} is beyond the "
            f"table {path!r}'s vocabulary of {shape[0]} (a resized vocabulary?)."
        )
    table = np.asarray(dense(leaf), np.float64)
    a = np.zeros((n, shape[0]), rows.dtype)
    a[np.arange(n), ids] = 1
    b = (rows.astype(np.float64) - table[ids]).T.astype(rows.dtype)
    return Module(
        module=module,
        path=path,
        at=None,
        leaf_shape=shape,
        kind="tokens",
        a=a,
        b=b,
        rank=n,
        alpha=lora_alpha(1.0, n, rslora),  # scale 1
        shape=shape,
        is_linear=False,
        weight_name="",
    )
