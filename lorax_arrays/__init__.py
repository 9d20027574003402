"""lorax_arrays: serve and train many LoRA adapters in one batch, in unmodified JAX
models, through quax's multiple dispatch."""

# Importing these modules registers the dispatch rules (and _compat's custom_vjp
# support for quax).
from . import (
    _compat as _compat,
    _row_bias as _row_bias,
    _rules_control as _rules_control,
    _rules_conv as _rules_conv,
    _rules_dot as _rules_dot,
    _rules_elementwise as _rules_elementwise,
    _rules_layout as _rules_layout,
    _rules_lookup as _rules_lookup,
    _rules_placement as _rules_placement,
)
from ._adapters import (
    Adapter as Adapter,
    AdapterStack as AdapterStack,
    init_adapter as init_adapter,
    stack_adapters as stack_adapters,
)
from ._array import (
    BatchedLoraArray as BatchedLoraArray,
    QuaxifyMissingError as QuaxifyMissingError,
)
from ._bank import (
    AdapterBank as AdapterBank,
    BankEvent as BankEvent,
)
from ._checkpoint import load_adapter as load_adapter, save_adapter as save_adapter
from ._combine import combine_adapters as combine_adapters
from ._errors import (
    CheckpointError as CheckpointError,
    IndicesShapeError as IndicesShapeError,
    LoraIndexError as LoraIndexError,
    NonFiniteAdapterError as NonFiniteAdapterError,
    PeftFormatError as PeftFormatError,
    StaleIndicesError as StaleIndicesError,
    UnsupportedOperationError as UnsupportedOperationError,
)
from ._explain import explain_strategies as explain_strategies
from ._loraify import (
    adapter_mask as adapter_mask,
    loraify as loraify,
    merge as merge,
    with_indices as with_indices,
)
from ._peft import (
    load_peft_adapter as load_peft_adapter,
    save_peft_adapter as save_peft_adapter,
)
from ._quaxify import quaxify as quaxify, register as register
from ._qwix import QwixArray as QwixArray, from_qwix as from_qwix
from ._row_bias import RowBias as RowBias
from ._served import ServedAdapters as ServedAdapters
from ._targeting import (
    LeafLayout as LeafLayout,
    LoraRule as LoraRule,
    RuleMatch as RuleMatch,
    RuleMatches as RuleMatches,
    match_rules as match_rules,
)

__version__ = "0.1.0"
