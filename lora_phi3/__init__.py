"""lora_phi3: LoRA layers for PyTorch (a drop-in for loralib) and a Phi-3 Mini fine-tuning tool.

``import lora_phi3 as lora`` gives the loralib names (``lora.Linear``, ``lora.MergedLinear``,
``lora.Embedding``, ``lora.Conv1d/2d/3d``, ``lora.mark_only_lora_as_trainable``,
``lora.lora_state_dict``) plus the injector, adapter files and QLoRA.
"""

from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .utils import lora_state_dict, mark_only_lora_as_trainable

__version__ = "0.1.0"

__all__ = [
    "LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
    "mark_only_lora_as_trainable", "lora_state_dict",
]
