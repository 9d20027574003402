"""`explain_strategies`: which strategy each adapted product of a function gets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx

from .quaxify import quaxify
from .strategies import StrategyChoice, record_strategies


def explain_strategies(
    fn: Callable, /, *args: Any, **kwargs: Any
) -> list[StrategyChoice]:
    """Which strategy each adapted matmul in `fn(*args, **kwargs)` gets, and why.

    `fn` is traced under [`lorax_arrays.quaxify`][] with abstract values only (as
    `jax.eval_shape` does: nothing is computed or compiled), and every decision
    of the low-rank rewrite is recorded, in the order the products are traced.
    Useful with `strategy="auto"`, to see what the cost model picked for each layer
    (`"gather"`, `"segment"` or `"dense"`; see the docs' performance page).

    ```python
    for choice in lx.explain_strategies(forward, served, x):
        print(choice.strategy, choice.shapes["x"], choice.reason)
    ```

    **Arguments:**

    - `fn`: the function you would pass to `lx.quaxify` (a forward pass), not yet
        wrapped in `jax.jit`: a jitted function that was already traced for these
        shapes is not traced again, so nothing would be recorded. An
        `lx.quaxify(f, strategy=...)` is fine: its per-call override is reported.
    - `*args`, `**kwargs`: what `fn` is called with, e.g. a tree from
        [`lorax_arrays.loraify`][] and the inputs.

    **Returns:**

    A list with one `(primitive, shapes, strategy, reason)` named tuple per
    adapted product: `primitive` is `"dot_general"`; `shapes` holds the operands'
    shapes (`"x"`, `"w"`) and the sizes of the problem the strategies solve (`"S"`
    stack groups, `"G"` indexed rows, `"R"` tokens per row, `"d_in"`, `"d_out"`,
    `"n_adapters"`, `"rank"`); `strategy` is the one used; `reason` says where it
    came from (a per-call override, the array's own `strategy`, or the `auto` cost
    model).
    """
    with record_strategies() as records:
        eqx.filter_eval_shape(quaxify(fn), *args, **kwargs)
    return list(records)
