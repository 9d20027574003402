"""lorax_arrays: serve and train many LoRA adapters in one batch, in unmodified JAX
models, through quax's multiple dispatch.

The package is layered (each subpackage's README says what it owns and may import;
`tests/test_architecture.py` enforces it):

- `_core`: the array type, layout, indices, options, errors. Imports nothing above.
- `_rules`: the dispatch rules (one module per primitive family), the strategies,
  `quaxify`, and the only code that touches quax's private API.
- `_integrations`: foreign weight types (qwix), through the core's hooks.
- `_adapters`: adapter kinds, targeting, stacks, the served contract, `loraify`.
- `_serving`: the `AdapterBank`.
- `_training`: the `AdapterTrainer` (many adapters trained in one step).
- `_io`: safetensors, orbax checkpoints, PEFT directories.
"""

# Importing `_rules` registers every dispatch rule (and quax's custom_vjp support).
from . import _rules as _rules
from ._adapters.adapter import Adapter as Adapter
from ._adapters.combine import combine_adapters as combine_adapters
from ._adapters.init import init_adapter as init_adapter
from ._adapters.loraify import (
    adapter_mask as adapter_mask,
    loraify as loraify,
    merge as merge,
    with_indices as with_indices,
)
from ._adapters.served import ServedAdapters as ServedAdapters
from ._adapters.stack import (
    AdapterStack as AdapterStack,
    stack_adapters as stack_adapters,
)
from ._adapters.targeting import (
    LeafLayout as LeafLayout,
    LoraRule as LoraRule,
    RuleMatch as RuleMatch,
    RuleMatches as RuleMatches,
    match_rules as match_rules,
)
from ._core.array import BatchedLoraArray as BatchedLoraArray
from ._core.errors import (
    CheckpointError as CheckpointError,
    IndicesShapeError as IndicesShapeError,
    LoraIndexError as LoraIndexError,
    NonFiniteAdapterError as NonFiniteAdapterError,
    PeftFormatError as PeftFormatError,
    QuaxifyMissingError as QuaxifyMissingError,
    SafetensorsError as SafetensorsError,
    StaleIndicesError as StaleIndicesError,
    UnknownAdapterError as UnknownAdapterError,
    UnsetIndicesError as UnsetIndicesError,
    UnsupportedOperationError as UnsupportedOperationError,
)
from ._core.version import __version__ as __version__
from ._integrations.qwix import QwixArray as QwixArray, from_qwix as from_qwix
from ._io.checkpoint import load_adapter as load_adapter, save_adapter as save_adapter
from ._io.peft import (
    load_peft_adapter as load_peft_adapter,
    save_peft_adapter as save_peft_adapter,
)
from ._rules.explain import explain_strategies as explain_strategies
from ._rules.quaxify import quaxify as quaxify, register as register
from ._rules.row_bias import RowBias as RowBias
from ._serving.bank import AdapterBank as AdapterBank, BankEvent as BankEvent
from ._training.trainer import AdapterTrainer as AdapterTrainer
