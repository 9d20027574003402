"""Coverage sweep (issue 12): which operations on adapted weights reach
`BatchedLoraArray.default` (or another error of ours) in real model families.

Every family of `tests/nnx_families.py` (Llama 3, its scanned stack, Qwen 2/3, Qwen 3
MoE, Gemma 2/3 with their fused kernels adapted per part and whole, Gemma 4's
per-layer inputs, five MoE dispatch styles, the flax NNX examples) is loraified with
the LoRA rules a user would pick and two random adapters, with per-example indices
(two adapters and a base row), and traced under `lx.quaxify`.

How the sweep drives past the first error: it traces the call (`jax.eval_shape`,
no compilation); when an error is raised, it finds the adapted leaf it was raised
for, records (family, primitive or error, leaf, model code, first sentence of the
message), stops adapting that leaf and traces again, until the call goes through
or an error cannot be tied to a leaf. So every operation is found that a
per-example-indices forward pass meets, except further operations on a leaf
already dropped (only the first failing use of each leaf is seen).

Tying an error to its leaf: the served stack carries a third, all-zero adapter
that no row uses, whose rank differs from leaf to leaf (16, 17, ...); every
`BatchedLoraArray` that a rule or `default` sees has its leaf's padded rank, so
the innermost one among the frames of the traceback names the leaf exactly (even
inside `nnx.scan` or a `while_loop`, where the array is a slice of the stack).
The primitive is the one quax was dispatching (the `primitive` of the innermost
frame that has one); the model code is the innermost frame in
`tests/nnx_families.py`, followed by the library layer it called (a flax layer).

This keeps the serving path (per-example indices, no `allow_materialise`): with
`allow_materialise=True`, `default` would need scalar indices (`jax.vmap` over
rows), a different path through the rules.

Then (not with `--quick`) the call runs, jitted, with the leaves that remain
adapted, and is checked against each row run alone through the model with its
adapter merged in float64 NumPy.

Prints a Markdown table (family | adapted leaves | runs? | primitives/errors
reaching default, with the leaf and model code), then the details.

Run: python -m benchmarks.coverage_sweep            (~2.5 minutes on 2 CPU cores)
     python -m benchmarks.coverage_sweep --quick    (trace only, no check: ~1 minute)
     python -m benchmarks.coverage_sweep --family gemma2 --family moe-gather
"""

from __future__ import annotations

import argparse
import dataclasses
import linecache
import os
import time
import traceback
from pathlib import Path

import jax
import jax.extend.core as jexc
import jax.numpy as jnp
import numpy as np
from quax._trace import _QuaxTracer  # quax's tracer, to see the value inside

import lorax_arrays as lx
from tests import nnx_families as nf

TAG_RANK = 16  # the tag adapter's rank at leaf k is TAG_RANK + k
TOL = dict(rtol=2e-4, atol=2e-4)
FAMILIES_FILE = os.path.abspath(nf.__file__)
HARNESS = {"run_served", "served_call", "reference", "base_output"}  # not model code


@dataclasses.dataclass
class Finding:
    family: str
    kind: str  # the primitive (or the rule's primitive and the error type)
    error: str  # the exception type
    path: str | None  # the adapted leaf, if found
    site: str  # the model code
    message: str  # the message's first sentence


@dataclasses.dataclass
class Result:
    family: str
    what: str
    adapted: list[str]
    findings: list[Finding]
    blocked: bool = False
    runs: str = ""


def tag_adapter(adapter: lx.Adapter) -> tuple[lx.Adapter, dict[int, str]]:
    """An all-zero adapter with rank `TAG_RANK + k` at the k-th leaf."""
    weights, ranks = {}, []
    for k, lay in enumerate(adapter.layouts):
        r = TAG_RANK + k
        a = jnp.zeros((*lay.stack_shape, *lay.in_shape, r))
        b = jnp.zeros((*lay.stack_shape, r, *lay.out_shape))
        weights[lay.path] = (a, b)
        ranks.append(r)
    tag = dataclasses.replace(adapter, weights=weights, ranks=tuple(ranks))
    return tag, {TAG_RANK + k: lay.path for k, lay in enumerate(adapter.layouts)}


def _lora_in(value):
    if isinstance(value, _QuaxTracer):
        value = value.value
    return value if isinstance(value, lx.BatchedLoraArray) else None


def _where(frames) -> str:
    """The innermost frame of the model's code, and the library layer it called."""
    site, via = "", ""
    for i, (frame, lineno) in enumerate(frames):
        if os.path.abspath(frame.f_code.co_filename) != FAMILIES_FILE:
            continue
        if frame.f_code.co_name in HARNESS:
            continue
        code = linecache.getline(frame.f_code.co_filename, lineno)
        code = code.split("  # ")[0].strip()
        site = f"{frame.f_code.co_qualname}: `{code}`"
        via = ""
        for inner, _ in frames[i + 1 :]:
            name = inner.f_code.co_filename
            if "/flax/" in name:
                via = f" → flax {inner.f_code.co_qualname}"
                break
            if "/lorax_arrays/" in name or "/quax/" in name:
                break
    if not via and not any("/quax/" in f.f_code.co_filename for f, _ in frames):
        # Raised outside quax's dispatch: name the innermost frame of ours.
        ours = [f for f, _ in frames if "/lorax_arrays/" in f.f_code.co_filename]
        if ours:
            name = Path(ours[-1].f_code.co_filename).name
            via = f" → lorax_arrays/{name} {ours[-1].f_code.co_qualname}"
    if not site:
        return "after the call" + via
    return site + via


def diagnose(family: str, exc: BaseException, ranks: dict[int, str]) -> Finding:
    frames = list(traceback.walk_tb(exc.__traceback__))
    lora, primitive = None, None
    for frame, _ in reversed(frames):
        local = frame.f_locals
        if lora is None:
            for name in ("lora", "operand", "x", "y", "lhs", "rhs", *local):
                found = _lora_in(local.get(name))
                if found is not None:
                    lora = found
                    break
        if primitive is None and isinstance(local.get("primitive"), jexc.Primitive):
            primitive = local["primitive"].name
    path = None
    if lora is not None:
        path = ranks.get(lora.rank)
    text = str(exc).strip()
    first = text.split("\n")[0]
    cut = first.find(". ")
    first = first[: cut + 1] if cut > 0 else first
    error = type(exc).__name__
    in_default = any(
        f.f_code.co_qualname == "BatchedLoraArray.default" for f, _ in frames
    )
    if isinstance(exc, lx.UnsupportedOperationError) and in_default:
        kind = primitive or "?"
    elif primitive is None:
        kind = error
    else:
        kind = f"{primitive} ({error})"
    return Finding(family, kind, error, path, _where(frames), first)


def sweep_family(family: nf.Family, *, check: bool) -> Result:
    model = family.build()
    adapters = nf.adapters_for(family, model)
    paths = list(adapters[0].paths)
    tag, ranks = tag_adapter(adapters[0])
    inputs = family.inputs()
    result = Result(family.name, family.what, paths, [])
    dropped: list[str] = []
    while True:
        kept = [p for p in paths if p not in dropped]
        if not kept:
            break
        served, _ = nf.serve(model, [nf.keep_paths(a, kept) for a in (*adapters, tag)])
        try:
            trace = lambda m, x: jax.eval_shape(lx.quaxify(family.call), m, x)  # noqa: E731
            nf.run_served(family, served, inputs, run=trace)
            break
        except Exception as e:  # noqa: BLE001 - recorded, then driven past
            finding = diagnose(family.name, e, ranks)
            result.findings.append(finding)
            if finding.path is None or finding.path in dropped:
                result.blocked = True
                break
            dropped.append(finding.path)
    kept = [p for p in paths if p not in dropped]
    if result.blocked:
        result.runs = "no (blocked)"
    elif not kept:
        result.runs = "no leaf left adapted"
    elif not check:
        result.runs = "traces"
    else:
        served, stack = nf.serve(model, [nf.keep_paths(a, kept) for a in adapters])
        got = np.asarray(nf.run_served(family, served, inputs))
        want, _ = nf.reference(family, model, stack, inputs=inputs)
        err = float(np.abs(got - want).max())
        ok = np.allclose(got, want, **TOL)
        result.runs = f"yes, = reference ({err:.0e})" if ok else f"WRONG ({err:.1e})"
    result.kept = kept  # type: ignore[attr-defined]
    return result


def _short(path: str | None) -> str:
    if path is None:
        return "no leaf"
    return path.removesuffix("/value")


def _grouped(findings: list[Finding]) -> list[tuple[str, list[str], str]]:
    """(kind, leaves, site) with the leaves of one kind at one site together."""
    groups: dict[tuple[str, str], list[str]] = {}
    for f in findings:
        groups.setdefault((f.kind, f.site), []).append(_short(f.path))
    return [(kind, leaves, site) for (kind, site), leaves in groups.items()]


def table(results: list[Result]) -> str:
    lines = [
        "| family | adapted leaves | runs? | primitives/errors reaching default "
        "(leaf; model code) |",
        "|---|---|---|---|",
    ]
    for r in results:
        n, kept = len(r.adapted), len(r.kept)
        adapted = f"{n}" if kept == n else f"{kept} of {n}"
        cells = [
            f"`{kind}`: {', '.join(f'`{leaf}`' for leaf in leaves)} ({site})"
            for kind, leaves, site in _grouped(r.findings)
        ]
        found = "<br>".join(cells) if cells else "none"
        lines.append(f"| `{r.family}` | {adapted} | {r.runs} | {found} |")
    return "\n".join(lines)


def details(results: list[Result]) -> str:
    lines = [
        "| family | primitive / error | leaf | model code | message |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for f in r.findings:
            msg = f.message.replace("|", "\\|")
            lines.append(
                f"| `{r.family}` | `{f.kind}` | `{_short(f.path)}` | {f.site} | {msg} |"
            )
    return "\n".join(lines)


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="trace only: no run")
    parser.add_argument(
        "--family", action="append", choices=sorted(nf.FAMILIES), help="repeatable"
    )
    args = parser.parse_args(argv)
    names = args.family or list(nf.FAMILIES)
    results = []
    start = time.perf_counter()
    for name in names:
        results.append(sweep_family(nf.FAMILIES[name], check=not args.quick))
    elapsed = time.perf_counter() - start
    print(f"## Coverage sweep ({len(results)} families, {elapsed:.0f} s)\n")
    print(
        f"Per-example indices {nf.IDX.tolist()} (two adapters, ranks {nf.RANKS}, and "
        "a base row); a leaf whose first failing use is found stops being adapted "
        "and the call is traced again.\n"
    )
    print(table(results))
    print("\n### Details\n")
    print(details(results))
    print("\n### Families\n")
    for r in results:
        print(f"- `{r.family}`: {r.what}.")
    return results


if __name__ == "__main__":
    main()
