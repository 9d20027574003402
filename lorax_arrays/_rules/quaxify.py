"""`quaxify` and `register`: quax's transform and rule registry, documented for
BatchedLoraArrays."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import quax

from .nnx import NnxAware
from .strategies import call_strategy, check_strategy

_F = TypeVar("_F", bound=Callable)


def quaxify(fn: _F, /, filter_spec: Any = True, *, strategy: str | None = None) -> _F:
    """Makes `fn` understand `BatchedLoraArray`s (and every other quax type).

    Call the wrapped function with a tree from [`lorax_arrays.loraify`][] in place of
    the plain weights: each `x @ W` against an adapted weight becomes
    `x @ w + s · (x @ A[i]) @ B[i]`, per example. Pair it with `jax.jit` (or
    `eqx.filter_jit`): `jax.jit(lx.quaxify(model.apply))`.

    This is `quax.quaxify` (importing `lorax_arrays` registers its rules), made
    aware of Flax NNX: `nnx.Module`s (and other NNX objects) among the arguments
    are rebuilt inside the trace, so `sow`, `nnx.remat`, `nnx.scan` and other
    in-place updates work, and the state the call changed or added (sown
    intermediates, RNG counts, caches) is written back to them, as when calling
    `fn` directly. Pass an NNX model as an argument (`lx.quaxify(lambda m, x:
    m(x))(model, x)`, or `lx.quaxify(model)(x)`), not closed over.

    **Arguments:**

    - `fn`: any JAX function, e.g. a Flax `apply`, an Equinox module or a function of
        raw parameters.
    - `filter_spec`: which arguments to quaxify (advanced; see `quax.quaxify`). A
        pytree-shaped `filter_spec` is passed to quax as it is, without the NNX
        handling above.
    - `strategy`: force how every adapted product in this call computes its
        low-rank term (`"gather"`, `"segment"`, `"dense"` or `"auto"`), overriding
        each array's own `strategy`. `None` (the default) leaves each array's.

    **Returns:**

    A function with the same signature as `fn`.
    """
    if isinstance(filter_spec, bool) or callable(filter_spec):
        # Not `eqx.module_update_wrapper`, which would copy an NNX `fn` (a pytree),
        # so that state written back would miss the caller's module.
        quaxified = NnxAware(fn, filter_spec)
    else:
        quaxified = quax.quaxify(fn, filter_spec)
    if strategy is None:
        return quaxified
    check_strategy(strategy)

    @functools.wraps(fn)
    def with_strategy(*args, **kwargs):
        with call_strategy(strategy):
            return quaxified(*args, **kwargs)

    return with_strategy


def register(primitive: Any, /, *, precedence: int = 0) -> Callable[[_F], _F]:
    """Registers a dispatch rule for a JAX primitive and some argument types.

    Use it to teach `lorax_arrays` an operation it lacks (the
    `UnsupportedOperationError` names the primitive), or to give your own
    `quax.ArrayValue` (a quantised base weight, say) rules that compose with ours.
    This is `quax.register`; see the docs page "Custom rules".

    **Arguments:**

    - `primitive`: e.g. `jax.lax.mul_p`.
    - `precedence`: breaks ties between equally specific rules.

    **Returns:**

    A decorator for a function whose positional arguments are annotated with the
    types it handles and whose keyword arguments are the primitive's parameters.
    """
    return quax.register(primitive, precedence=precedence)
