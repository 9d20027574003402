"""A LoRA over an int8-quantised base weight: your own quax type, composed with ours.

`Int8Weight` is a user-defined `quax.ArrayValue` with one rule (`x @ W`). Put it as
the `w` of a `BatchedLoraArray` and the batched-LoRA rewrite calls your rule for the
base product and adds the low-rank term: QLoRA-style serving, many adapters at once,
without either type knowing the other.

Run: python examples/quantised_base.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import quax
from jax import lax

import lorax_arrays as lx


class Int8Weight(quax.ArrayValue):
    """A `(d_in, d_out)` weight stored as int8 with one float scale per column."""

    q: jax.Array  # int8, (d_in, d_out)
    col_scale: jax.Array  # float32, (d_out,)

    @staticmethod
    def quantise(w):
        col_scale = jnp.max(jnp.abs(w), axis=0) / 127.0
        return Int8Weight(jnp.round(w / col_scale).astype(jnp.int8), col_scale)

    def aval(self):
        return jax.core.ShapedArray(self.q.shape, self.col_scale.dtype)

    def materialise(self):
        raise RuntimeError("Int8Weight is only ever used through `x @ W`.")


@lx.register(lax.dot_general_p)
def _(x: jax.Array, w: Int8Weight, *, dimension_numbers, **params):
    (x_contract, w_contract), (x_batch, w_batch) = dimension_numbers
    if tuple(w_contract) != (0,) or w_batch:
        raise NotImplementedError("Int8Weight supports only x @ W.")
    y = lax.dot_general(x, w.q.astype(x.dtype), dimension_numbers)
    return y * w.col_scale.astype(y.dtype)


def main():
    k_w, k_a, k_b, k_x = jr.split(jr.PRNGKey(0), 4)
    d_in, d_out, n_adapters, rank = 64, 32, 3, 4
    w = jr.normal(k_w, (d_in, d_out)) / 8
    a = jr.normal(k_a, (n_adapters, d_in, rank)) / 8
    b = jr.normal(k_b, (n_adapters, rank, d_out)) / 2
    indices = jnp.array([0, 2, -1, 1, 2])
    x = jr.normal(k_x, (5, 7, d_in))

    w_q = Int8Weight.quantise(w)
    lora = lx.BatchedLoraArray(
        w_q, a, b, scale=0.5, indices=indices, in_axes=0, out_axes=1
    )
    print("Compiling…", flush=True)
    y = jax.jit(lx.quaxify(lambda W, x: x @ W))(lora, x)

    w_deq = w_q.q.astype(jnp.float32) * w_q.col_scale
    for e, i in enumerate(indices.tolist()):
        w_e = w_deq if i < 0 else w_deq + 0.5 * a[i] @ b[i]
        err = float(jnp.max(jnp.abs(y[e] - x[e] @ w_e)))
        print(
            f"request {e}: adapter {i:>2}, max |batched - dequantised merged| "
            f"= {err:.1e}"
        )
        assert err < 1e-4
    return y


if __name__ == "__main__":
    main()
