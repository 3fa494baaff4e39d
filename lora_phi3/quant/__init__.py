"""Quantised base weights: NF4 storage in pure PyTorch and the QLoRA entry points.

- :mod:`.nf4`: the NF4 format (:class:`NF4Tensor`, :func:`nf4_quantize`, :func:`nf4_dequantize`);
- :mod:`.nf4_linear`: ``x @ dequant(W).T`` without the whole dense weight (:func:`nf4_matmul`);
- :mod:`.nf4_base`: :class:`NF4Weight`, the 4-bit base a LoRA linear layer can hold;
- :mod:`.qlora`: :class:`Linear4bit`/:class:`MergedLinear4bit` constructors and the ``inject_lora``
  builder for ``quantize_base="nf4"``;
- :mod:`.loading`: :func:`load_quantized_model`, :func:`dequantize_and_merge`.
"""

from .loading import dequantize_and_merge, load_quantized_model
from .nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from .nf4_base import NF4Weight
from .nf4_linear import nf4_matmul
from .qlora import Linear4bit, MergedLinear4bit

__all__ = ["NF4Tensor", "nf4_quantize", "nf4_dequantize", "nf4_matmul", "NF4Weight", "Linear4bit",
           "MergedLinear4bit", "dequantize_and_merge", "load_quantized_model"]
