"""The LoRA layers (loralib's names) and the one LoRA computation they share.

- :mod:`.base`: :class:`LoRALayer` (shared state, merge protocol, ``adapter_params``) and
  :func:`lora_layers`;
- :mod:`.linear`, :mod:`.embedding`, :mod:`.conv`, :mod:`.mha`: the layers;
- :mod:`.tokens`: trainable tokens (new values for chosen rows of an embedding);
- :mod:`.param_lora`: LoRA on parameters (``target_parameters``): :class:`ParamLoRA`, one adapter
  per parameter (per expert for 3-D expert weights), held by a host that stands for the module
  (:class:`LoRAParameters`; :mod:`.experts`: :class:`LoRAExperts` for MoE expert weights);
- :mod:`.lora_function`: the one LoRA computation of every linear-like layer (fused and plain);
- :mod:`.slices`: how a fused projection's adapters are laid out per slice (:func:`iter_slices`);
- :mod:`.dropout_mask`, :mod:`.recompute`: what the fused path keeps for backward.
"""

from .base import LoRALayer, lora_layers
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear, MergedLinear
from .mha import MultiheadAttention
from .param_lora import LoRAParameters, ParamLoRA
from .experts import LoRAExperts, is_experts_module
from .lora_function import lora_linear
from .recompute import enable_input_recompute
from .slices import LoraSlice, iter_slices
from .tokens import TrainableTokens

__all__ = ["LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
           "MultiheadAttention", "TrainableTokens", "ParamLoRA", "LoRAParameters", "LoRAExperts",
           "is_experts_module",
           "lora_linear", "enable_input_recompute", "lora_layers", "LoraSlice", "iter_slices"]
