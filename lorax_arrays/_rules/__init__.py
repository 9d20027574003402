"""The dispatch rules: one module per primitive family, the strategies for the
low-rank term, `quaxify`/`register`, and `quax_compat`, the only module that touches
quax's private API. Importing this package registers every rule."""

from . import (
    control as control,
    conv as conv,
    dot as dot,
    elementwise as elementwise,
    lookup as lookup,
    placement as placement,
    quax_compat as quax_compat,
    ragged as ragged,
    row_bias as row_bias,
    rows as rows,
    shape as shape,
    shard_map as shard_map,
)
