"""QLoRA layers: the LoRA ``Linear``/``MergedLinear`` over a frozen NF4 base (Dettmers et al. 2023).

There is no second class tree: a 4-bit layer *is* a :class:`~lora_phi3.layers.Linear` or
:class:`~lora_phi3.layers.MergedLinear` whose frozen base is an :class:`NF4Weight` (its
``quantized_weight``; its ``weight`` is None until merged). It has the same adapter parameters,
shapes, ``delta_weight``, forward and state-dict keys for the adapter. :class:`Linear4bit` and
:class:`MergedLinear4bit` only add the constructors :meth:`~Linear4bit.from_nf4` and
:meth:`~Linear4bit.from_linear`, and name the kind in ``isinstance`` checks.

Merging never rounds the update into 4 bits: ``merge()`` stores a dense merged ``weight``
``dequant(W) + delta`` in the compute dtype beside the 4-bit base (this layer then costs dense
memory), and ``unmerge()`` drops it again. So ``merge_lora``, ``disable_lora`` and
``merge_and_unload`` work as on dense layers.

:func:`build_nf4_layer` and :func:`check_nf4_target` are what ``inject_lora`` dispatches to for
``LoraConfig(quantize_base="nf4")`` (see :mod:`lora_phi3.inject.factory`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..layers import Linear, LoRALayer, MergedLinear
from .nf4 import NF4Tensor
from .nf4_base import DEFAULT_BLOCK_SIZE, NF4Weight

__all__ = ["Linear4bit", "MergedLinear4bit", "build_nf4_layer", "check_nf4_target",
           "DEFAULT_BLOCK_SIZE"]


def _nf4_base(owner: str, q: NF4Tensor) -> NF4Weight:
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{owner} needs an NF4Tensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"{owner} needs a 2-D NF4Tensor (out_features, in_features), "
                         f"got shape {tuple(q.shape)}")
    return NF4Weight(q)


def _quantized(linear: nn.Module, fan_in_fan_out: bool, block_size: int,
               double_quant: bool) -> NF4Weight:
    weight = linear.weight
    dense = weight.T if fan_in_fan_out and isinstance(weight, torch.Tensor) else weight  # (out, in)
    return NF4Weight.from_weight(dense, block_size, double_quant)


class Linear4bit(Linear):
    """:class:`~lora_phi3.layers.Linear` over a frozen NF4 base weight.

    ``y = x @ dequant(W).T + b + scaling * dropout(x) @ A.T @ B.T``; the first term in the base's
    ``compute_dtype``, the adapter in ``lora_A``'s dtype, cast back. Build with :meth:`from_nf4`
    or :meth:`from_linear`; the 4-bit storage is ``layer.quantized_weight``.
    """

    @classmethod
    def from_nf4(cls, q: NF4Tensor, bias: torch.Tensor | None = None, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 merge_weights: bool = False, lora_dtype: torch.dtype | None = None,
                 use_rslora: bool = False,
                 init_lora_weights: bool | str = True, use_dora: bool = False,
                 lora_bias: bool = False) -> "Linear4bit":
        """Wrap a 4-bit weight ``(out_features, in_features)`` (``bias``: ``(out_features,)``).

        Raises:
            TypeError: ``q`` is not an NF4Tensor. ValueError: ``q`` is not 2-D.
        """
        return cls.with_base(_nf4_base(cls.__name__, q), bias, r=r, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, fan_in_fan_out=fan_in_fan_out,
                             merge_weights=merge_weights, lora_dtype=lora_dtype,
                             use_rslora=use_rslora,
                             init_lora_weights=init_lora_weights, use_dora=use_dora,
                             lora_bias=lora_bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1,
                    lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                    merge_weights: bool = False, lora_dtype: torch.dtype | None = None,
                    block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
                    use_rslora: bool = False,
                    init_lora_weights: bool | str = True, use_dora: bool = False,
                 lora_bias: bool = False) -> "Linear4bit":
        """Quantise ``linear.weight`` (shared ``bias``) and wrap it. ``merge_weights`` defaults to
        False here: merging materialises a dense weight, which ``eval()`` should not do silently."""
        base = _quantized(linear, fan_in_fan_out, block_size, double_quant)
        return cls.with_base(base, getattr(linear, "bias", None), r=r, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, fan_in_fan_out=fan_in_fan_out,
                             merge_weights=merge_weights, lora_dtype=lora_dtype,
                             use_rslora=use_rslora,
                             init_lora_weights=init_lora_weights, use_dora=use_dora,
                             lora_bias=lora_bias)


class MergedLinear4bit(MergedLinear):
    """:class:`~lora_phi3.layers.MergedLinear` (fused projection, per-slice adapters) over a
    frozen NF4 base weight. Build with :meth:`from_nf4` or :meth:`from_linear`."""

    @classmethod
    def from_nf4(cls, q: NF4Tensor, bias: torch.Tensor | None = None, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0,
                 enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = False, split_sizes: Sequence[int] | None = None,
                 lora_dtype: torch.dtype | None = None,
                 use_rslora: bool = False,
                 init_lora_weights: bool | str = True, use_dora: bool = False,
                 lora_bias: bool = False) -> "MergedLinear4bit":
        """Wrap a 4-bit fused weight ``(out_features, in_features)``.

        Raises:
            TypeError / ValueError: as :meth:`Linear4bit.from_nf4`, and as ``MergedLinear`` for
                ``enable_lora``/``split_sizes``.
        """
        return cls.with_base(_nf4_base(cls.__name__, q), bias, r=r, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, enable_lora=enable_lora,
                             fan_in_fan_out=fan_in_fan_out, merge_weights=merge_weights,
                             split_sizes=split_sizes, lora_dtype=lora_dtype,
                             use_rslora=use_rslora,
                             init_lora_weights=init_lora_weights, use_dora=use_dora,
                             lora_bias=lora_bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1,
                    lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                    fan_in_fan_out: bool = False, merge_weights: bool = False,
                    split_sizes: Sequence[int] | None = None, lora_dtype: torch.dtype | None = None,
                    block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True,
                    use_rslora: bool = False,
                    init_lora_weights: bool | str = True, use_dora: bool = False,
                 lora_bias: bool = False) -> "MergedLinear4bit":
        """Quantise ``linear.weight`` (shared ``bias``) and wrap it."""
        base = _quantized(linear, fan_in_fan_out, block_size, double_quant)
        return cls.with_base(base, getattr(linear, "bias", None), r=r, lora_alpha=lora_alpha,
                             lora_dropout=lora_dropout, enable_lora=enable_lora,
                             fan_in_fan_out=fan_in_fan_out, merge_weights=merge_weights,
                             split_sizes=split_sizes, lora_dtype=lora_dtype,
                             use_rslora=use_rslora,
                             init_lora_weights=init_lora_weights, use_dora=use_dora,
                             lora_bias=lora_bias)


# -- what inject_lora dispatches to for quantize_base="nf4" ---------------------------------------
def check_nf4_target(module: nn.Module, name: str, fan_in_fan_out: bool = False) -> None:
    """Raise the builder's errors without building anything (``inject_lora`` checks every target
    first, so a refused injection leaves the model untouched).

    Args:
        module: the module to be replaced.
        name: its qualified name, for errors.
        fan_in_fan_out: True for a linear layer whose weight is ``(in, out)`` (GPT-2's ``Conv1D``;
            the injector tells).

    Raises:
        ValueError: ``module`` is not linear-like, or its row length (in_features) is not a
            multiple of the block size, naming the module.
    """
    if not (isinstance(module, nn.Linear) or fan_in_fan_out):
        raise ValueError(f"LoraConfig.quantize_base='nf4' quantizes linear layers only; {name!r} is "
                         f"{type(module).__name__}: drop it from target_modules or add it to "
                         "exclude_modules")
    shape = tuple(module.weight.shape)
    in_features = shape[0] if fan_in_fan_out else shape[1]
    if in_features % DEFAULT_BLOCK_SIZE:
        raise ValueError(f"LoraConfig.quantize_base='nf4' cannot quantize {name!r} (weight {shape}): "
                         f"its row length in_features={in_features} is not a multiple of the "
                         f"block size {DEFAULT_BLOCK_SIZE}; add it to exclude_modules")


def build_nf4_layer(module: nn.Module, name: str, fan_in_fan_out: bool = False,
                    enable_lora: Sequence[bool] | None = None,
                    split_sizes: Sequence[int] | None = None, **lora_kwargs: Any) -> LoRALayer:
    """The QLoRA layer replacing ``module`` (``inject_lora`` with ``quantize_base="nf4"``).

    The weight is quantised in blocks of :data:`DEFAULT_BLOCK_SIZE` with double quantisation.

    Args:
        module: an ``nn.Linear`` or GPT-2 ``Conv1D``.
        name: its qualified name, for errors.
        fan_in_fan_out: as :func:`check_nf4_target`.
        enable_lora, split_sizes: the adapted slices of a fused projection (Phi-3's
            ``qkv_proj``/``gate_up_proj``, a ``MergedLinear4bit``); None for a whole-output adapter.
        **lora_kwargs: ``r``, ``lora_alpha``, ``lora_dropout``, ``merge_weights``, ``lora_dtype``.

    Raises:
        ValueError: as :func:`check_nf4_target`.
    """
    check_nf4_target(module, name, fan_in_fan_out)
    base = _quantized(module, fan_in_fan_out, DEFAULT_BLOCK_SIZE, True)
    bias = getattr(module, "bias", None)
    if enable_lora is not None:
        return MergedLinear4bit.with_base(base, bias, enable_lora=enable_lora,
                                          split_sizes=split_sizes, fan_in_fan_out=fan_in_fan_out,
                                          **lora_kwargs)
    return Linear4bit.with_base(base, bias, fan_in_fan_out=fan_in_fan_out, **lora_kwargs)
