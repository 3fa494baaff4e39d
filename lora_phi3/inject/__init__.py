"""Putting LoRA into any model: which modules match, the Phi-3 slice map, the swap and its controls,
and whole QLoRA models (built from a dense checkpoint, merged back into one)."""

from . import phi3
from .injector import (disable_lora, get_lora_config, inject_lora, lora_modules, merge_and_unload,
                       merge_lora, unmerge_lora)
from .named import (active_adapter, add_adapter, adapter_names, delete_adapter, mixed_batch,
                    set_adapter)
from .qlora_model import dequantize_and_merge, load_quantized_model

__all__ = ["inject_lora", "disable_lora", "merge_lora", "unmerge_lora", "merge_and_unload",
           "get_lora_config", "lora_modules", "phi3", "load_quantized_model", "dequantize_and_merge",
           "add_adapter", "set_adapter", "delete_adapter", "mixed_batch", "active_adapter",
           "adapter_names"]
