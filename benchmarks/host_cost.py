"""Host time of a serving step at 224 adapted leaves: routing a batch to its
adapters and handing the arrays to the compiled step, per pattern.

Layout: a 32-layer model *without* layer scanning (each layer's q, k, v, o,
gate, up and down projections are their own leaves: 224 adapted leaves, 289 in
all), the layout of the `transformers` Flax ports and of EasyDeL's models. The
sizes are tiny (d_model 64), since host time does not depend on them; an
`AdapterBank` of 16 slots at rank 8 holds 4 adapters; a batch is 32 requests.

Timed, interleaved in one process (median of `--repeats` rounds):

- `bank.indices`: names to issued indices (loads nothing: all are loaded);
- `bank.served`: the bank's arrays and the batch's indices as one pytree (the
  indices checked against the slots' generations on the host);
- `dispatch plain`: a jitted call with the plain parameters: the time until it
  returns, with a body that does no work (`keep_unused=True`), so only the
  handling of its arguments is timed;
- `dispatch served`: the same with the parameters and `bank.served(idx)`: the
  pattern the Serving page teaches (`lx.loraify(params, served)` runs inside
  the trace, so never per call);
- and the eager pattern: `lx.loraify(params, bank, idx)` outside the step,
  `lx.with_indices(tree, idx)`, and the dispatch of the tree they make.

Targets (from the "Serving you can trust" issue): `bank.indices` + routing and
`with_indices` at most 1 ms each; dispatch of the served step at most 2x the
plain one's.

Run: python -m benchmarks.host_cost            (~1 minute on 2 CPU cores)
     python -m benchmarks.host_cost --quick    (2 layers, fewer rounds; the tests)
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lorax_arrays as lx
from benchmarks._common import interleaved

LAYERS, D, FF, KV = 32, 64, 128, 32
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def init_params(seed: int = 0, n_layers: int = LAYERS) -> dict:
    keys = iter(jr.split(jr.key(seed), 8 * n_layers + 1))
    shapes = {"wq": (D, D), "wk": (D, KV), "wv": (D, KV), "wo": (D, D)}
    shapes |= {"w_gate": (D, FF), "w_up": (D, FF), "w_down": (FF, D)}
    layers = []
    for _ in range(n_layers):
        layer = {n: jr.normal(next(keys), s) / s[0] ** 0.5 for n, s in shapes.items()}
        layers.append(layer | {"norm1": jnp.ones(D), "norm2": jnp.ones(D)})
    return {"embed": jr.normal(next(keys), (256, D)), "layers": layers}


def _rms(h):
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


def forward(params, tokens):
    """A pre-norm decoder layer stack without attention's mixing (host time is
    what is measured): every projection is used once per layer."""
    h = params["embed"][tokens]
    for layer in params["layers"]:
        x = _rms(h) * layer["norm1"]
        q, k, v = x @ layer["wq"], x @ layer["wk"], x @ layer["wv"]
        h = h + (q + jnp.concatenate([k, v], -1)) @ layer["wo"]
        x = _rms(h) * layer["norm2"]
        h = (
            h
            + (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]
        )
    return h


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (30 if args.quick else 400)
    layers = 2 if args.quick else LAYERS  # quick: compiles in seconds

    params = init_params(n_layers=layers)
    rules = lx.LoraRule(rf"layers/\d+/({'|'.join(PROJECTIONS)})$", rank=8)
    bank = lx.AdapterBank(params, rules, slots=16)
    for i in range(4):
        adapter = lx.init_adapter(params, rules, key=jr.key(i))  # B = 0: made
        adapter = jax.tree.map(  # non-zero, so that the check below means something
            lambda v, i=i: v + 0.05 * jr.normal(jr.key(100 + i), v.shape, v.dtype),
            adapter,
        )
        bank.add(f"tenant{i}", adapter)
    names = [f"tenant{i % 4}" for i in range(32)]
    tokens = jnp.arange(32) % 256
    idx = bank.indices(names)
    n_adapted = len(bank.paths)

    nothing = jax.jit(lambda *args: args[-1] + 1, keep_unused=True)

    @jax.jit
    def served_step(params, served, tokens):
        return lx.quaxify(forward)(lx.loraify(params, served), tokens)

    eager_step = jax.jit(lx.quaxify(forward))
    tree = lx.loraify(params, bank, idx)

    variants = {
        "bank.indices": lambda: bank.indices(names),
        "bank.served": lambda: bank.served(idx),
        "dispatch plain": functools.partial(nothing, params, tokens),
        "dispatch served": functools.partial(nothing, params, bank.served(idx), tokens),
        "eager loraify": lambda: lx.loraify(params, bank, bank.indices(names)),
        "with_indices": lambda: lx.with_indices(tree, idx),
        "dispatch eager tree": functools.partial(nothing, tree, tokens),
    }
    # Results of async calls are waited for outside the timed part, by the next
    # round's calls queueing behind them; block once at the end.
    t = interleaved(variants, repeats)
    # Both patterns serve the same rows (and the adapters move them).
    served_out = np.asarray(served_step(params, bank.served(idx), tokens))
    np.testing.assert_array_equal(served_out, np.asarray(eager_step(tree, tokens)))
    plain_out = np.asarray(jax.jit(forward)(params, tokens))
    assert np.isfinite(served_out).all() and np.abs(served_out - plain_out).max() > 1e-3

    step = t["bank.indices"] + t["bank.served"] + t["dispatch served"]
    n_plain = len(jax.tree.leaves(params))
    n_served = n_plain + len(jax.tree.leaves(bank.served(idx)))
    n_tree = len(jax.tree.leaves(tree))
    rows = [
        ("`bank.indices(names)`", t["bank.indices"], "", ""),
        ("`bank.served(idx)`", t["bank.served"], "", ""),
        (
            "routing (`indices` + `served`)",
            t["bank.indices"] + t["bank.served"],
            "",
            "<= 1 ms",
        ),
        (
            f"dispatch, plain params ({n_plain} arrays)",
            t["dispatch plain"],
            "1.00x",
            "",
        ),
        (
            f"dispatch, params + served ({n_served} arrays)",
            t["dispatch served"],
            f"{t['dispatch served'] / t['dispatch plain']:.2f}x",
            "<= 2x",
        ),
        (
            "a step's host time: routing + dispatch, served",
            step,
            f"{step / t['dispatch plain']:.2f}x",
            "",
        ),
        (
            "eager `lx.loraify(params, bank, bank.indices(names))`",
            t["eager loraify"],
            "",
            "",
        ),
        ("eager `lx.with_indices(tree, idx)`", t["with_indices"], "", "<= 1 ms"),
        (
            f"dispatch, eager tree ({n_tree} arrays)",
            t["dispatch eager tree"],
            f"{t['dispatch eager tree'] / t['dispatch plain']:.2f}x",
            "",
        ),
    ]
    print(
        f"Host time per step, {n_adapted} adapted leaves (unscanned, {layers} "
        f"layers), batch 32, {jax.default_backend()}, median of {repeats} rounds\n"
    )
    print("| what | host ms | vs plain | target |\n|---|---|---|---|")
    for what, seconds, ratio, target in rows:
        print(f"| {what} | {ms(seconds)} | {ratio} | {target} |")


if __name__ == "__main__":
    main()
