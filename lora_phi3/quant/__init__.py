"""Quantised base weights: NF4 storage in pure PyTorch and the QLoRA entry points."""

from .nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from .qlora import Linear4bit, MergedLinear4bit, dequantize_and_merge, load_quantized_model

__all__ = ["NF4Tensor", "nf4_quantize", "nf4_dequantize", "Linear4bit", "MergedLinear4bit",
           "dequantize_and_merge", "load_quantized_model"]
