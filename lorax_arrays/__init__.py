"""lorax_arrays: serve and train many LoRA adapters in one batch, in unmodified JAX
models, through quax's multiple dispatch."""

from quax import quaxify as quaxify
from quax import register as register

from . import _dot as _dot  # noqa: F401  (registers rules)
from . import _layout_ops as _layout_ops
from ._adapters import (
    Adapter as Adapter,
)
from ._adapters import (
    AdapterStack as AdapterStack,
)
from ._adapters import (
    init_adapter as init_adapter,
)
from ._adapters import (
    stack_adapters as stack_adapters,
)
from ._array import BatchedLoraArray as BatchedLoraArray
from ._errors import (
    IndicesShapeError as IndicesShapeError,
)
from ._errors import (
    LoraIndexError as LoraIndexError,
)
from ._errors import (
    UnsupportedOperationError as UnsupportedOperationError,
)
from ._loraify import (
    adapter_mask as adapter_mask,
)
from ._loraify import (
    loraify as loraify,
)
from ._loraify import (
    merge as merge,
)
from ._loraify import (
    with_indices as with_indices,
)
from ._rules import (
    LeafLayout as LeafLayout,
)
from ._rules import (
    LoraRule as LoraRule,
)
from ._rules import (
    RuleMatch as RuleMatch,
)
from ._rules import (
    RuleMatches as RuleMatches,
)
from ._rules import (
    match_rules as match_rules,
)

__version__ = "0.1.0"
