"""Hugging Face PEFT LoRA directories in (`load_peft_adapter`) and out
(`save_peft_adapter`), without PyTorch.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors` with
keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
Whatever the torch module, PEFT stores `A` as `(r, in)` and `B` as `(out, r)`
(embeddings: `lora_embedding_A (r, vocab)`, `lora_embedding_B (dim, r)`). Our
`Adapter` keeps `a: (*in, r)` and `b: (r, *out)` on the leaf's own axes, so the
only questions are which tree leaf a module is, and which axis of that leaf is its
input. One module per job:

| module | job |
|---|---|
| `_config` | `adapter_config.json`: reading, checking, PEFT's matching rules |
| `_names` | PEFT module names <-> tree paths (`key_map`, default matching) |
| `_files` | the safetensors keys: which tensors make which module |
| `_orientation` | which axes of a leaf are a module's in and out |
| `_convert` | one converter per kind (LoRA, conv, IA3, VeRA, LoHa, LoKr) |
| `_load` | `load_peft_adapter` |
| `_save` | `save_peft_adapter` |
"""

from ._config import is_targeted as is_targeted, pattern_key as pattern_key
from ._load import load_peft_adapter as load_peft_adapter
from ._save import save_peft_adapter as save_peft_adapter
