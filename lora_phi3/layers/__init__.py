"""The LoRA layers (loralib's names) and the one LoRA computation they share."""

from .lora_layers import (Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear,
                          lora_layers)
from .functional import enable_input_recompute, lora_linear

__all__ = ["LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
           "lora_linear", "enable_input_recompute", "lora_layers"]
