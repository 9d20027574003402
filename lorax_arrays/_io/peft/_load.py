"""`load_peft_adapter`: a PEFT directory as an `Adapter` on a tree."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..._adapters.adapter import Adapter
from ..._adapters.targeting import LeafLayout
from ..._core.errors import PeftFormatError
from ..._core.paths import bias_leaves
from ..safetensors import read_safetensors
from ._config import (
    _PREFIX,
    CONFIG_NAME,
    WEIGHTS_NAME,
    _check_config,
    _peft_type,
    _read_config,
    is_targeted,
    pattern_key,
)
from ._convert import (
    _conv_module,
    _ia3_module,
    _leaf_factors,
    _leaf_vectors,
    _lycoris_module,
    _stack_entries,
    _vera_module,
)
from ._files import _parse_keys
from ._names import _EMBEDDING_MODULES, _Leaves, _module_parts
from ._orientation import _orient
from ._records import Module
from ._saved import saved_leaves, saved_names, split_saved
from ._tokens import check_token_config, split_tokens, token_ids, token_module


def load_peft_adapter(
    path: str | os.PathLike,
    tree: Any,
    *,
    key_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
    dtype: Any = None,
    orientation: str | Mapping[str, str] | None = None,
    skip_modules: Sequence[str] = (),
) -> Adapter:
    """Reads a Hugging Face PEFT LoRA, DoRA, IA3, VeRA, LoHa or LoKr directory as
    an `Adapter` for `tree`.

    No PyTorch is needed. Every weight in the file must find its leaf, and every
    config entry must be one lorax_arrays serves faithfully: anything else (a
    trained bias, another `peft_type`, an unknown key) is an error that names
    it, never a partial load.

    - **Variants.** Each maps onto the fields of [`lorax_arrays.Adapter`][]:
        - DoRA (`use_dora: true`): `lora_A`/`lora_B` as for LoRA, and each
          module's `lora_magnitude_vector (out,)` becomes `magnitudes[path]`,
          `(*stack, *out)`, laid on the out-axes as `lora_B`'s rows are. The
          norm is that of the tree's base weight plus the update, per
          out-feature, with no gradient, as in PEFT. DoRA on an embedding is
          refused.
        - IA3 (`peft_type: "IA3"`): a rank-0 leaf with one vector. `ia3_l (out,
          1)` scales the output (`out_scales[path]`); for a module in
          `feedforward_modules` (PEFT's matching: a regex full match, or a name
          suffix), `ia3_l (1, in)` scales the input (`in_scales[path]`). PEFT
          also scales the bias of an output-scaled module, and lorax_arrays
          scales only the matmul: a bias leaf next to such a weight
          (`.../k_proj/bias`) is refused.
        - VeRA (`peft_type: "VERA"`): a plain LoRA with scale 1 (alpha = rank),
          exact: `A = diag(vera_lambda_d) vera_A[:, :in]`, `B = diag(vera_lambda_b)
          vera_B[:out]`. The shared projections must be in the file
          (`save_projection=True`); regenerating them needs PyTorch's RNG.
        - LoHa (`peft_type: "LOHA"`) and LoKr (`"LOKR"`) on linear layers: the
          exact plain LoRA they equal, scale 1 (PEFT's `alpha / r` folded into
          `B`). LoHa's `(w1_a w1_b) ⊙ (w2_a w2_b)` has rank `r²`; LoKr's
          `kron(w1, w2)` (each factor full or `_a @ _b`) rank `rank(w1)·rank(w2)`;
          both at most `min(out, in)`. Convolutions are refused.

    - **Modules trained in full** (`modules_to_save`: a `task_type="SEQ_CLS"`
      adapter's classification head, saved whole as `<module>.weight` and
      `.bias`): each saved Linear's weight `W_i` becomes an exact full-rank
      LoRA leaf `W_i - W` (scale 1, rank `min(in, out)`: small for a head), and
      its bias the update `bias_deltas[path] = b_i - b` of the tree's bias leaf
      next to it, served per row by an `lx.RowBias`. Weights and biases equal to
      the model's add nothing. Refused: a saved module that is not a Linear
      (another parameter, a weight that is not 2-D), a weight whose shape
      contradicts the leaf (another number of labels), a bias with no bias
      leaf, a saved embedding table that differs from the model's.
    - **Activated LoRA** (`alora_invocation_tokens`): a plain LoRA whose
      `invocation_tokens` are kept on the adapter; a stack or bank places it per
      token from the requests' `input_ids` (`stack.indices(names, input_ids=...)`).
    - **Names.** A PEFT key `base_model.model.<module>.lora_A.weight` names a
      torch module such as `model.layers.0.self_attn.q_proj`. By default it maps to
      the tree leaf whose path, without its weight's own name (`kernel`,
      `weight`, `embedding`, NNX's `value`), is that module's '/'-joined name, with
      any prefix on either side (`params/...` in a Flax variables dict, `model.` on
      a torch `...ForCausalLM`). This works unmodified for the Flax ports in
      `transformers` (GPT-2, Llama, Mistral, BERT, T5, ...). `key_map` overrides it.
    - **Orientation.** PEFT stores `A (r, in)` and `B (out, r)`. A 2-D leaf may be
      `(in, out)` (Flax `Dense`) or `(out, in)` (an `eqx.nn.Linear` weight, the Flax
      GPT-2 `Conv1D` kernel); a non-square leaf says which by its shape, and a
      square one (`q_proj`, `c_proj`) takes the orientation of the adapter's
      non-square leaves with the same weight name. Where nothing decides it, an
      error asks for `orientation`. Embedding tables are `(vocab, dim)`, as in
      every JAX library.
    - **Layer stacks.** A leaf of shape `(L, ., .)` (a scanned stack: `nnx.scan`,
      Flax `nn.scan`, `eqx.filter_vmap`-built layers, stack axis first) takes one
      module per layer: `model.layers.3.self_attn.q_proj` is layer 3 of
      `model/layers/self_attn/q_proj/kernel` (its name without the layer number).
      Layers the adapter lacks are zero; ranks are padded to the largest, and a
      layer whose scale differs from the others' (by `rank_pattern` /
      `alpha_pattern`) has the ratio folded into its `B`.
    - **Fused kernels.** Several PEFT modules can share one leaf as entries of
      its leading stack axes: `key_map` sends `q_proj`, `k_proj`, `v_proj` to
      `(path, 0)`, `(path, 1)`, `(path, 2)` of a Gemma-style `(3, N, D, H)`
      `qkv_einsum` (and to `(path, (layer, entry))` in a `(L, 3, N, D, H)`
      layer stack), handled like layers: padded ranks, scales folded into `B`,
      zero factors for an entry no module names.
    - **Multi-axis weights.** What is left of a leaf after its entries may have
      more than two axes (`(N, D, H)`): PEFT's flat `in` and `out` are split
      row-major over the in- and out-axes in increasing order, which the shapes
      decide when only one split of the axes fits; otherwise (`D == N * H`) the
      error asks for `orientation={path: (in_axes, out_axes)}`.
    - **Config.** `r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` (PEFT's
      matching: the first pattern `k` with `re.match(rf"(.*\\.)?({k})$", module)`),
      `use_rslora`, `target_modules` / `exclude_modules` / `layers_to_transform`
      (every module in the file must be one the config targets), LoRA on
      embeddings (`lora_embedding_A/B`). A whole embedding layer saved with the
      adapter (PEFT's `save_embedding_layers`) must equal the tree's.

    **Arguments:**

    - `path`: the adapter directory (`adapter_config.json`,
        `adapter_model.safetensors`).
    - `tree`: the model or parameter tree the adapter is for (a Flax `params`
        dict, an Equinox or NNX module, a dict of arrays).
    - `key_map`: a dict from PEFT module name (`'model.layers.0.self_attn.q_proj'`,
        with or without `base_model.model.`) to a tree path (a leaf's path, or its
        module's; `(path, i)` for entry `i` of a stacked or fused leaf's first
        axis, `(path, (i, j))` for its first two), or a function of the module
        name returning one; a module it leaves out (or maps to `None`) uses the
        default matching.
    - `dtype`: cast the factors to this dtype; by default they keep the file's.
    - `orientation`: `'in_out'` or `'out_in'` for every 2-D leaf, the leaf's
        `(in_axes, out_axes)` (as in its LoraRule) for a multi-axis one, or a
        dict from a regex over tree paths to one of those; checked against the
        shapes.
    - `skip_modules`: PEFT module names (or their prefixes, `'bert.pooler'`) to
        leave out: for modules the torch model has and the JAX model does not
        run (a pooler that a masked-LM forward never uses, PEFT's `all-linear`
        on it). The update of a skipped module applies nowhere, which equals
        PEFT only when that module does not affect the outputs you serve. Each
        entry must name a module of the file (a typo is an error).

    **Returns:**

    An [`lorax_arrays.Adapter`][] with `a: (in, r)` and `b: (r, out)` per leaf, the
    rank, alpha and rsLoRA flag of each module, in the order of the tree's leaves.
    """
    directory = Path(path)
    config = _read_config(directory)
    config_file = directory / CONFIG_NAME
    _check_config(config, config_file)
    check_token_config(config, config_file)
    weights_file = directory / WEIGHTS_NAME
    if not weights_file.exists():
        other = directory / "adapter_model.bin"
        hint = (
            f" It has {other.name} (a pickled torch file): re-save it with "
            "`save_pretrained(..., safe_serialization=True)`."
            if other.exists()
            else ""
        )
        raise FileNotFoundError(f"load_peft_adapter: {weights_file} missing.{hint}")
    tensors, _ = read_safetensors(weights_file)
    peft_type = _peft_type(config)
    tensors, saved = split_saved(tensors, saved_names(config, config_file))
    tensors, new_rows = split_tokens(tensors, _PREFIX, weights_file)
    factors, kinds, base_copies, shared = _parse_keys(tensors, weights_file, config)
    if not factors and not saved and not new_rows:
        raise PeftFormatError(f"{weights_file}: the file holds no adapter weights.")

    leaves = _Leaves(tree)
    rank_pattern, alpha_pattern, rslora = {}, {}, False
    if peft_type in ("LORA", "LOHA", "LOKR"):
        default_r = config["r"]
        default_alpha = config["lora_alpha" if peft_type == "LORA" else "alpha"]
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        rslora = bool(config.get("use_rslora", False))
    biases = bias_leaves(tree) if peft_type == "IA3" else {}

    placed: dict[str, tuple[str, str]] = {}  # leaf path -> module
    found: list[Module] = []
    factors = _skip(factors, skip_modules, weights_file)
    for module in sorted(factors):
        if not is_targeted(config, module):
            raise PeftFormatError(
                f"{weights_file}: it has weights for {module!r}, which the config's "
                f"target_modules={config.get('target_modules')!r} (with "
                f"layers_to_transform={config.get('layers_to_transform')!r}) does not "
                "select: the directory's two files do not belong together."
            )
        try:
            leaf_path, at = leaves.locate(module, key_map)
        except PeftFormatError as e:
            hint = _tied_table_hint(module, factors[module], leaves) or (
                f" If the model you serve never runs {module!r} (a module of the "
                "torch model that the JAX model leaves out, such as a pooler a "
                f"masked-LM head does not use), leave it out with "
                f"`skip_modules=[{module!r}]`."
                if "no leaf" in str(e)
                else ""
            )
            if not hint:
                raise
            raise PeftFormatError(f"{e}{hint}") from None
        if (leaf_path, at) in placed:
            where = leaf_path if at is None else f"entry {at} of {leaf_path!r}"
            raise PeftFormatError(
                f"load_peft_adapter: PEFT modules {placed[leaf_path, at]!r} and "
                f"{module!r} both map to {where}."
            )
        placed[leaf_path, at] = module
        leaf, is_linear = leaves.by_path[leaf_path]
        shape = tuple(leaf.shape)
        if at is not None:
            k = len(at)
            if len(shape) < k + 2 or not all(0 <= i < n for i, n in zip(at, shape)):
                raise PeftFormatError(
                    f"load_peft_adapter: PEFT module {module!r} is entry {at} of "
                    f"{leaf_path!r}, whose shape {shape} has no such entry: its "
                    f"first {k} axes are the stack (layers, or a fused kernel's "
                    "q/k/v entries), and at least two axes must remain for the "
                    "module's weight."
                )
            shape = shape[k:]
        parts = factors[module]
        vec = None  # (Adapter field, flat vector)
        known_groups = None  # a convolution's (in_axes, out_axes)
        if peft_type == "LORA":
            a, b = parts["A"], parts["B"]
            r = a.shape[0]
            r_cfg = rank_pattern.get(pattern_key(rank_pattern, module), default_r)
            if r != r_cfg:
                raise PeftFormatError(
                    f"{weights_file}: module {module!r} has rank {r} in the file but "
                    f"{r_cfg} by the config (r={default_r}, rank_pattern="
                    f"{rank_pattern}): the directory's two files do not belong "
                    "together."
                )
            alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), default_alpha)
            if "m" in parts:
                vec = ("magnitudes", parts["m"])
            known_groups = None
            if a.ndim > 2:
                a, b, known_groups = _conv_module(module, a, b, shape, leaf_path)
        elif peft_type == "IA3":
            a, b, r, alpha, vec = _ia3_module(
                module, parts["l"], shape, config, weights_file
            )
            bias = biases.get(_module_parts(leaf_path)[0], (None,))[0]
            if vec[0] == "out_scales" and bias is not None:
                raise PeftFormatError(
                    f"load_peft_adapter: IA3 scales the output of {module!r} "
                    "(not a feedforward module), and PEFT multiplies that output "
                    f"including its bias, but lorax_arrays scales only the "
                    f"matmul of {leaf_path!r} and the tree has a bias {bias!r} "
                    "next to it: serving it would be silently wrong. (IA3 on "
                    "feedforward modules, which scales the input, is fine.)"
                )
        elif peft_type in ("LOHA", "LOKR"):
            r_cfg = rank_pattern.get(pattern_key(rank_pattern, module), default_r)
            alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), default_alpha)
            a, b, r = _lycoris_module(
                module, parts, peft_type, r_cfg, alpha, shape, leaf_path, weights_file
            )
            alpha = float(r)  # the scale alpha / r is folded into b
        else:
            a, b, r = _vera_module(module, parts, shared, shape, weights_file)
            alpha = float(r)  # VeRA has no scale: alpha / r = 1
        kind = kinds[module]
        if (
            kind == "linear"
            and at is None
            and _is_table(leaf_path, shape)
            and a.ndim == b.ndim == 2
            and shape == (b.shape[0], a.shape[1])  # (vocab, dim): read as h @ E.T
        ):
            # A head tied to the embedding table (`key_map` sends `lm_head` to
            # it): PEFT's update changes the head only. Its `A (r, dim)`, `B
            # (vocab, r)` become the table's `(vocab, dim)` axes: `a = B`, `b = A`,
            # served on reads of the table as a head, never on lookups.
            if vec is not None or known_groups is not None:
                raise PeftFormatError(
                    f"load_peft_adapter: PEFT module {module!r} goes to the "
                    f"embedding table {leaf_path!r} (a tied head), with a "
                    f"{'DoRA or IA3 vector' if vec is not None else 'conv kernel'}; "
                    "only a plain LoRA (or VeRA, LoHa, LoKr) update can be served "
                    "on a tied head without changing the lookups. Untie the head "
                    "(give the model its own head weight) and map the module there."
                )
            kind = "head"
            a, b = b.T, a.T
        found.append(
            Module(
                module=module,
                path=leaf_path,
                at=at,
                leaf_shape=tuple(leaf.shape),
                kind=kind,
                a=a,
                b=b,
                rank=r,
                alpha=float(alpha),
                shape=shape,
                is_linear=is_linear,
                weight_name=_module_parts(leaf_path)[1],
                vec=vec,
                known_groups=known_groups,
            )
        )

    spec = config.get("trainable_token_indices")
    named = list(spec) if isinstance(spec, dict) else [None] if spec else []
    for name in named:
        if not any(
            name is None or m == name or m.endswith("." + name) for m in new_rows
        ):
            raise PeftFormatError(
                f"{weights_file}: the config's trainable_token_indices={spec!r} has "
                f"no rows in the file (no '...token_adapter.trainable_tokens_delta' "
                f"key{'' if name is None else f' for {name!r}'}): the directory's "
                "two files do not belong together."
            )
    for module in sorted(new_rows):
        leaf_path, at = leaves.locate(module, key_map)
        if at is not None or any(f.path == leaf_path for f in found):
            raise PeftFormatError(
                f"load_peft_adapter: {weights_file} has trainable tokens for "
                f"{module!r} and, on the same leaf {leaf_path!r}, a LoRA "
                "or a layer-stack entry: lorax_arrays serves trainable tokens on "
                "a whole embedding table without another update on it (not yet "
                "both)."
            )
        found.append(
            token_module(
                module,
                new_rows[module],
                token_ids(config, module, weights_file),
                leaf_path,
                leaves.by_path[leaf_path][0],
                rslora,
                weights_file,
            )
        )

    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    full, bias_deltas, tables = saved_leaves(
        saved,
        leaves,
        tree,
        key_map,
        orientation,
        fan_in_fan_out,
        weights_file,
        _is_table,
        rslora,
    )
    lora_paths = {f.path: f.module for f in found}
    for s in full:
        if s.path in lora_paths:
            raise PeftFormatError(
                f"{weights_file}: module {s.module!r} is saved in full "
                f"(`modules_to_save`) and also has a LoRA ({lora_paths[s.path]!r}) "
                f"on the same leaf {s.path!r}; PEFT never writes both."
            )
    found += full  # a saved module's weight: an exact LoRA, scale 1
    _check_base_copies({**base_copies, **tables}, leaves, key_map, weights_file)
    _orient(found, orientation, fan_in_fan_out)

    groups: dict[str, list[Module]] = {}
    for f in found:
        groups.setdefault(f.path, []).append(f)
    order = [p for p, _, _ in leaves.entries if p in groups]
    weights, layouts, ranks, alphas, lookup, head = {}, [], [], [], [], []
    vectors: dict[str, dict] = {"magnitudes": {}, "in_scales": {}, "out_scales": {}}
    for p in order:
        fs = groups[p]
        in_ax, out_ax = fs[0].groups
        if fs[0].at is None:
            f = fs[0]
            a, b = _leaf_factors(f)
            rank, alpha = f.rank, f.alpha
            layouts.append(LeafLayout(p, f.shape, in_ax, out_ax, ()))
        else:
            if (
                any(f.at is None for f in fs)
                or len({len(f.at) for f in fs}) != 1
                or len({f.groups for f in fs}) != 1
            ):
                raise PeftFormatError(
                    f"load_peft_adapter: {p!r} gets both whole-leaf and per-entry "
                    "modules, entries over different numbers of stack axes "
                    f"({sorted({f.at for f in fs if f.at})}), or entries of "
                    "different orientations."
                )
            a, b, rank, alpha = _stack_entries(fs, rslora)
            k = len(fs[0].at)
            shift = lambda axes: tuple(ax + k for ax in axes)  # noqa: E731, B023
            layouts.append(
                LeafLayout(
                    p,
                    fs[0].leaf_shape,
                    shift(in_ax),
                    shift(out_ax),
                    tuple(range(k)),
                )
            )
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        weights[p] = (jnp.asarray(a), jnp.asarray(b))
        for field, v in _leaf_vectors(fs, leaves.by_path[p][0]).items():
            vectors[field][p] = jnp.asarray(v if dtype is None else v.astype(dtype))
        ranks.append(rank)
        alphas.append(alpha)
        # PEFT's embedding LoRA changes the embedding module only; a head tied to
        # the same table (GPT-2) keeps the base table. And its LoRA on a head
        # tied to the table changes the head only: lookups keep the base table.
        lookup.append(fs[0].kind == "embedding")
        head.append(fs[0].kind == "head")
    adapter = Adapter(
        weights=weights,
        layouts=tuple(layouts),
        ranks=tuple(ranks),
        alphas=tuple(alphas),
        use_rslora=tuple(rslora for _ in order),
        lookup_only=tuple(lookup),
        head_only=tuple(head),
        invocation_tokens=config.get("alora_invocation_tokens"),
        bias_deltas={
            p: jnp.asarray(d if dtype is None else d.astype(dtype))
            for p, d in bias_deltas.items()
        },
        **vectors,
    )
    adapter.check_finite(f"load_peft_adapter({str(path)!r})")
    return adapter


def _check_base_copies(base_copies, leaves: _Leaves, key_map, file: Path) -> None:
    for module, value in base_copies.items():
        try:
            p, at = leaves.locate(module, key_map)
        except PeftFormatError as e:
            raise PeftFormatError(
                f"{file}: the adapter ships the whole weight of {module!r} (PEFT "
                "saves embedding layers when they are targeted or the vocabulary was "
                "resized), and it has no leaf in the tree to check it against. "
                f"Point `key_map` at the leaf. ({e})"
            ) from None
        leaf = np.asarray(leaves.by_path[p][0])
        leaf = leaf if at is None else leaf[at]
        # torch keeps a Linear's weight as (out, in) (an untied lm_head ships
        # (vocab, hidden)), Flax a kernel as (in, out): the copy equals the leaf
        # in the leaf's own layout or in torch's. Only compared, never used.
        views = [value] + ([value.T] if value.ndim == 2 else [])
        same = any(
            leaf.shape == v.shape
            and np.array_equal(leaf.astype(np.float32), v.astype(np.float32))
            for v in views
        )
        if not same:
            raise PeftFormatError(
                f"{file}: the adapter ships its own copy of the weight of {module!r} "
                f"(shape {value.shape}), and it differs from the tree's {p!r} (shape "
                f"{leaf.shape}): it was trained with a changed (resized?) embedding, "
                "which lorax_arrays cannot apply as a low-rank update. Load that "
                "weight into the model first."
            )


def _is_table(path: str, shape: tuple[int, ...]) -> bool:
    """Whether the leaf at `path` is an embedding table: 2-D and named so (Flax
    `Embed`'s `embedding`, or a transformers embedding module such as `wte`)."""
    parts, weight_name = _module_parts(path)
    return len(shape) == 2 and (
        weight_name == "embedding"
        or (bool(parts) and parts[-1] in (*_EMBEDDING_MODULES, *_TABLE_NAMES))
    )


# Embedding modules of hand-written JAX models (an `eqx.nn.Embedding` keeps its
# table as `weight`, so only the module's name says it is a table).
_TABLE_NAMES = ("embed", "embedding", "embeddings", "tok_embeddings", "token_embedding")


def _tied_table_hint(module: str, parts: dict, leaves: _Leaves) -> str:
    """For a module with no leaf of its own: the embedding tables its LoRA
    (`A (r, dim)`, `B (vocab, r)`) fits as a tied head, as advice."""
    a, b = parts.get("A"), parts.get("B")
    if a is None or b is None or a.ndim != 2 or b.ndim != 2:
        return ""
    want = (b.shape[0], a.shape[1])
    tables = [
        p
        for p, (leaf, _) in leaves.by_path.items()
        if tuple(leaf.shape) == want and _is_table(p, tuple(leaf.shape))
    ]
    if not tables:
        return ""
    return (
        f" The module fits the embedding table {tables[0]!r} {want} as a head tied "
        f"to it (as GPT-2's and GPT-Neo's lm_head are): load it with "
        f"`key_map={{{module!r}: {tables[0]!r}}}`; the update is then served on "
        "the head only (the table read as `h @ E.T`), and lookups keep the base "
        "table, as in PEFT."
    )


def _skip(factors: dict, skip_modules: Sequence[str], file: Path) -> dict:
    """`factors` without the modules `skip_modules` names (a name, or a prefix
    ending at a '.'); each entry must name at least one module."""
    if isinstance(skip_modules, str) or not all(
        isinstance(s, str) for s in skip_modules
    ):
        raise TypeError(
            f"load_peft_adapter: skip_modules must be a list of PEFT module names, "
            f"got {skip_modules!r}."
        )
    if not skip_modules:
        return factors
    wanted = [s.removeprefix(_PREFIX).strip(".") for s in skip_modules]

    def skipped(module: str) -> str | None:
        return next(
            (s for s in wanted if module == s or module.startswith(s + ".")), None
        )

    used = {skipped(m) for m in factors} - {None}
    unused = [s for s in wanted if s not in used]
    if unused:
        raise PeftFormatError(
            f"{file}: skip_modules names {unused}, which is no module of the file "
            f"(its modules: {sorted(factors)[:8]}{' ...' if len(factors) > 8 else ''})."
        )
    return {m: v for m, v in factors.items() if skipped(m) is None}
