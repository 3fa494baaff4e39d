"""lora_phi3: LoRA layers for PyTorch (a drop-in for loralib) and a Phi-3 Mini fine-tuning tool.

``import lora_phi3 as lora`` gives the loralib names (``lora.Linear``, ``lora.MergedLinear``,
``lora.Embedding``, ``lora.Conv1d/2d/3d``, ``lora.mark_only_lora_as_trainable``,
``lora.lora_state_dict``) plus the injector, adapter files and QLoRA. The fine-tuning job is
``lora_phi3.finetune.finetune(recipe)`` (the module keeps its name; the function is not re-exported
so ``import lora_phi3.finetune`` gives the module).
"""

from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .utils import lora_state_dict, mark_only_lora_as_trainable
from .config import LoraConfig
from .inject import (disable_lora, get_lora_config, inject_lora, lora_modules, merge_and_unload,
                     merge_lora, unmerge_lora)
from .adapters import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .peft_interop import export_peft, import_peft, peft_state_dict
from .nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from . import qlora  # registers the "nf4" layer factory with the injector
from .qlora import Linear4bit, MergedLinear4bit, dequantize_and_merge, load_quantized_model
from . import phi3
from .recipe import Recipe, TrainingConfig, load_recipe

__version__ = "0.1.0"

__all__ = [
    "LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
    "mark_only_lora_as_trainable", "lora_state_dict",
    "LoraConfig", "inject_lora", "disable_lora", "merge_lora", "unmerge_lora", "merge_and_unload",
    "get_lora_config", "lora_modules", "phi3",
    "save_adapter", "load_adapter", "adapter_state_dict", "read_adapter",
    "export_peft", "import_peft", "peft_state_dict",
    "NF4Tensor", "nf4_quantize", "nf4_dequantize",
    "Linear4bit", "MergedLinear4bit", "load_quantized_model", "dequantize_and_merge",
    "load_recipe", "Recipe", "TrainingConfig",
]
