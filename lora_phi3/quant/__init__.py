"""Quantised base weights: NF4 storage in pure PyTorch and the 4-bit LoRA layers.

- :mod:`.nf4`: the NF4 format (:class:`NF4Tensor`, :func:`nf4_quantize`, :func:`nf4_dequantize`);
- :mod:`.nf4_linear`: ``x @ dequant(W).T`` without the whole dense weight (:func:`nf4_matmul`);
- :mod:`.nf4_base`: :class:`NF4Weight`, the 4-bit base a LoRA linear layer can hold;
- :mod:`.qlora`: :class:`Linear4bit`/:class:`MergedLinear4bit` constructors and the builder that
  ``inject_lora`` dispatches ``quantize_base="nf4"`` to.

Whole QLoRA models (``load_quantized_model``, ``dequantize_and_merge``) are the injector's:
:mod:`lora_phi3.inject.qlora_model`. This part imports only :mod:`lora_phi3.layers`.
"""

from .nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from .nf4_base import NF4Weight
from .nf4_linear import nf4_matmul
from .qlora import Linear4bit, MergedLinear4bit

__all__ = ["NF4Tensor", "nf4_quantize", "nf4_dequantize", "nf4_matmul", "NF4Weight", "Linear4bit",
           "MergedLinear4bit"]
