"""lora_phi3: LoRA layers for PyTorch (a drop-in for loralib) and a Phi-3 Mini fine-tuning tool.

``import lora_phi3 as lora`` gives the loralib names (``lora.Linear``, ``lora.MergedLinear``,
``lora.Embedding``, ``lora.Conv1d/2d/3d``, ``lora.mark_only_lora_as_trainable``,
``lora.lora_state_dict``) plus the injector and its controls, several named adapters
(``add_adapter``, ``set_adapter``, ``delete_adapter``, ``mixed_batch``), adapter files and PEFT interop,
QLoRA, LoRA+ optimizer groups (``lora_plus_param_groups``) and a divergence guard for your own
training loop (``check_finite_step``). Importing it loads neither transformers nor the
fine-tuning job; the job is the subpackage :mod:`lora_phi3.finetune`
(``from lora_phi3.finetune import finetune, load_recipe``).
"""

from __future__ import annotations

import warnings
from typing import Any

from .layers import (Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear,
                     MultiheadAttention, TrainableTokens, enable_input_recompute)
from .utils import (TrainingDiverged, check_finite_step, lora_state_dict,
                    mark_only_lora_as_trainable)
from .config import LoraConfig
from .atomic import DiskFullError
from .inject import (active_adapter, add_adapter, adapter_names, delete_adapter,
                     dequantize_and_merge, disable_lora, get_lora_config, inject_lora,
                     load_quantized_model, lora_modules, merge_and_unload, merge_lora, mixed_batch,
                     phi3, set_adapter, unmerge_lora)
from .adapters import (adapter_state_dict, export_peft, import_peft, load_adapter, peft_state_dict,
                       read_adapter, save_adapter)
from .quant import Linear4bit, MergedLinear4bit, NF4Tensor, nf4_dequantize, nf4_quantize
from .optim import lora_plus_param_groups

__version__ = "0.1.0"

__all__ = [
    "LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
    "MultiheadAttention", "TrainableTokens",
    "mark_only_lora_as_trainable", "lora_state_dict",
    "check_finite_step", "TrainingDiverged", "DiskFullError",
    "LoraConfig", "inject_lora", "disable_lora", "merge_lora", "unmerge_lora", "merge_and_unload",
    "get_lora_config", "lora_modules", "enable_input_recompute", "phi3",
    "add_adapter", "set_adapter", "delete_adapter", "mixed_batch", "active_adapter", "adapter_names",
    "save_adapter", "load_adapter", "adapter_state_dict", "read_adapter",
    "export_peft", "import_peft", "peft_state_dict",
    "NF4Tensor", "nf4_quantize", "nf4_dequantize",
    "Linear4bit", "MergedLinear4bit", "load_quantized_model", "dequantize_and_merge",
    "lora_plus_param_groups",
]

# Names the job owns now; they stayed importable from here for scripts written before the split.
_MOVED_TO_FINETUNE = ("Recipe", "TrainingConfig", "load_recipe")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_FINETUNE:
        warnings.warn(f"lora_phi3.{name} moved to lora_phi3.finetune.{name}; the old name will be "
                      "removed in 0.3", DeprecationWarning, stacklevel=2)
        from . import finetune
        return getattr(finetune, name)
    raise AttributeError(f"module 'lora_phi3' has no attribute {name!r}")
