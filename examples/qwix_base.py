"""QLoRA serving with qwix: many adapters in one batch over a qwix-quantised model.

qwix (Google's JAX quantisation library, the one Tunix uses for QLoRA) quantises a
trained Flax NNX model to int8 (or 4-bit) weights. `lx.from_qwix` puts each
quantised weight back at the path the float model's weight had, as an
`lx.QwixArray`, so adapters made for the float model load unchanged; under
`lx.quaxify` the base product is qwix's own quantised `dot_general` and each row's
low-rank term is added in float.

Run: python examples/qwix_base.py [--qtype int8|int4]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

import lorax_arrays as lx


class MLP(nnx.Module):
    def __init__(self, d, hidden, rngs):
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qtype", default="int8", help="qwix weight_qtype (int8, int4)")
    args = p.parse_args()

    d, hidden, n_adapters = 64, 128, 3
    model = MLP(d, hidden, nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 7, d))

    # 1. qwix's post-training quantisation (weights only, as in QLoRA).
    rule = qwix.QtRule(module_path=".*", weight_qtype=args.qtype)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]), x)
    base = lx.from_qwix(qmodel)
    rules = [lx.LoraRule(r"kernel", 8, alpha=16.0)]
    print(lx.match_rules(base, rules))

    # 2. Adapters made for the *float* model (random B, so they do something).
    adapters = []
    for i in range(n_adapters):
        ad = lx.init_adapter(model, rules, key=jax.random.PRNGKey(10 + i))
        ad = with_random_b(ad, jax.random.PRNGKey(20 + i))
        adapters.append(ad)

    # 3. One batch, a different adapter per request, -1 for the base model.
    indices = jnp.array([0, 2, -1, 1, 2])
    served = lx.loraify(base, adapters, indices)
    print("Compiling…", flush=True)
    y = jax.jit(lx.quaxify(lambda m, x: m(x)))(served, x)

    # 4. Check each row against the dequantised model with that adapter merged,
    # in NumPy float64.
    def dequantised(layer):
        qa = jax.tree.map(lambda v: np.asarray(v[...]), layer.kernel.array)
        return np.asarray(qwix.dequantize(qa), np.float64)

    weights = {n: dequantised(getattr(qmodel, n)) for n in ("up", "down")}
    biases = {n: np.asarray(getattr(qmodel, n).bias[...], np.float64) for n in weights}
    for e, i in enumerate(indices.tolist()):
        w = dict(weights)
        if i >= 0:
            for n in w:
                a, b = adapters[i].weights[f"{n}/kernel/value"]
                w[n] = w[n] + adapters[i].scale(f"{n}/kernel/value") * (
                    np.asarray(a, np.float64) @ np.asarray(b, np.float64)
                )
        xe = np.asarray(x[e], np.float64)
        h = gelu_np(xe @ w["up"] + biases["up"])
        ref = xe + h @ w["down"] + biases["down"]
        err = float(np.max(np.abs(np.asarray(y[e]) - ref)) / np.max(np.abs(ref)))
        print(
            f"request {e}: adapter {i:>2}, max |batched - dequantised merged| "
            f"= {err:.1e} (relative)"
        )
        assert err < 1e-4, err
    return y


def gelu_np(h):
    """`jax.nn.gelu` (its tanh approximation) in NumPy float64."""
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))


def with_random_b(adapter: lx.Adapter, key) -> lx.Adapter:
    """The adapter with random B factors (init_adapter's B is zero)."""
    weights = {}
    for path, (a, b) in adapter.weights.items():
        key, sub = jax.random.split(key)
        weights[path] = (a, 0.1 * jax.random.normal(sub, b.shape, b.dtype))
    return dataclasses.replace(adapter, weights=weights)


if __name__ == "__main__":
    main()
