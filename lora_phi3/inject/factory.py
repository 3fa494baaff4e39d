"""Which LoRA layer replaces a module, and which plain module a LoRA layer stands for.

:func:`make_lora_module` is the single place where a base module becomes a LoRA layer (dense or
over a quantized base); :func:`plain_module` is its inverse, used by ``merge_and_unload``. A
quantized base is dispatched by ``LoraConfig.quantize_base`` to its builder in
:mod:`lora_phi3.quant` (PEFT's ``dispatch_*`` style): the injector imports the formats it knows,
and nothing registers itself at import time.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from ..layers.base import is_data_init
from ..quant import qlora
from .matching import SliceSpec, is_hf_conv1d

logger = logging.getLogger(__name__)

__all__ = ["make_lora_module", "plain_module", "quantized_factory", "quantized_check", "BASE_ATTR"]

BASE_ATTR = "_lora_base_module"  # the module a LoRA layer replaced, kept outside the module tree
_CONV_LORA = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
# Builder signature: builder(module, name, fan_in_fan_out, enable_lora, split_sizes, **lora_kwargs)
QuantizedBuilder = Callable[..., LoRALayer]


def _quantized_backend(method: Any) -> tuple[QuantizedBuilder, Callable[[nn.Module, str], None]]:
    """``(builder, check)`` for ``quantize_base=method``: the one branch a new base format adds."""
    if method == "nf4":
        return qlora.build_nf4_layer, qlora.check_nf4_target
    raise NotImplementedError(f"LoraConfig.quantize_base={method!r}: no quantized LoRA layer for "
                              "it; allowed: 'nf4'")


def quantized_factory(config: LoraConfig) -> QuantizedBuilder:
    """The builder of LoRA layers over ``config.quantize_base``; ``inject_lora`` calls this first
    so an unknown method fails before any module is replaced.

    Raises:
        NotImplementedError: no quantized layer exists for ``config.quantize_base``.
    """
    return _quantized_backend(config.quantize_base)[0]


def quantized_check(config: LoraConfig) -> Callable[[nn.Module, str], None] | None:
    """The pre-check of ``config.quantize_base`` (None for dense bases): ``check(module, name)``
    raises the builder's errors without building anything; ``inject_lora`` runs it on every
    target before replacing any, so a refused injection changes nothing."""
    if not config.quantize_base:
        return None
    check = _quantized_backend(config.quantize_base)[1]
    return lambda module, name: check(module, name, is_hf_conv1d(module))


def make_lora_module(module: nn.Module, name: str, config: LoraConfig,
                     slice_spec: SliceSpec | None) -> nn.Module:
    """The LoRA layer that replaces ``module`` (the single place where layers are chosen).

    Adapters are kept in fp32 when the base weight is fp16/bf16: the optimizer then updates fp32
    values, and the layers cast the input to fp32 and the adapter's output back.

    Raises:
        NotImplementedError: ``config.quantize_base`` names no known quantized layer.
        ValueError: the quantized builder refuses ``module`` (see its check).
    """
    half = module.weight.dtype in (torch.float16, torch.bfloat16)
    common: dict[str, Any] = dict(r=config.r, lora_alpha=config.lora_alpha, merge_weights=False,
                                  lora_dtype=torch.float32 if half else None,
                                  use_rslora=config.use_rslora,
                                  init_lora_weights=config.init_lora_weights,
                                  use_dora=config.use_dora)
    new: LoRALayer
    if config.quantize_base is not None:
        build = quantized_factory(config)
        slices = slice_spec._asdict() if slice_spec is not None else {}
        dense = None
        if is_data_init(config.init_lora_weights):
            # PiSSA/OLoRA over a quantized base (QPiSSA): factorise the full-precision weight,
            # which becomes the residual, and quantise only that residual.
            dense = _dense_linear_lora(module, config, slice_spec, {**common, "use_dora": False})
            common["init_lora_weights"] = True
        new = build(module, name, fan_in_fan_out=is_hf_conv1d(module),
                    lora_dropout=config.lora_dropout, **slices, **common)
        if dense is not None:
            new.adopt_data_init(dense)
    elif isinstance(module, nn.Embedding):
        new = Embedding.from_embedding(module, **common)
    elif isinstance(module, tuple(_CONV_LORA)):
        conv_cls = next(c for base, c in _CONV_LORA.items() if isinstance(module, base))
        new = conv_cls.from_conv(module, lora_dropout=config.lora_dropout, **common)
    else:
        if config.fan_in_fan_out and not is_hf_conv1d(module):
            logger.warning("%s is nn.Linear (weight (out, in)); ignoring fan_in_fan_out=True", name)
        new = _dense_linear_lora(module, config, slice_spec, common)
    # Keep the original module (minus its parameters, which now live in the LoRA layer, or were
    # quantized and freed) so merge_and_unload returns the very class it replaced, hooks and
    # attributes included.
    for key in module._parameters:
        module._parameters[key] = None
    new.__dict__[BASE_ATTR] = module
    new.train(module.training)
    return new


def _dense_linear_lora(module: nn.Module, config: LoraConfig, slice_spec: SliceSpec | None,
                       common: dict[str, Any]) -> LoRALayer:
    """``Linear`` (or ``MergedLinear`` for a fused slice spec) sharing ``module``'s weight."""
    fan_in_fan_out = is_hf_conv1d(module)  # the module type decides; nn.Linear is (out, in)
    if slice_spec is not None:
        return MergedLinear.from_linear(module, lora_dropout=config.lora_dropout,
                                        enable_lora=slice_spec.enable_lora,
                                        split_sizes=slice_spec.split_sizes,
                                        fan_in_fan_out=fan_in_fan_out, **common)
    return Linear.from_linear(module, lora_dropout=config.lora_dropout,
                              fan_in_fan_out=fan_in_fan_out, **common)


def plain_module(layer: LoRALayer) -> nn.Module:
    """The torch module ``layer`` stands for, holding its (merged) weight and bias."""
    base = layer.__dict__.get(BASE_ATTR)
    if base is not None:
        for key in base._parameters:
            base._parameters[key] = layer._parameters.get(key)
        base.train(layer.training)
        return base
    # A layer built by hand (not by inject_lora): rebuild its torch class around the same tensors.
    weight, bias = layer.weight, getattr(layer, "bias", None)
    with torch.device("meta"):
        if isinstance(layer, nn.Linear):
            plain: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
            if layer.fan_in_fan_out:  # nn.Linear wants (out, in): one transposed copy
                weight = nn.Parameter(weight.detach().T.contiguous(), weight.requires_grad)
        elif isinstance(layer, nn.Embedding):
            plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                                 layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse)
        else:
            conv_base = next(b for b in _CONV_LORA if isinstance(layer, b))
            plain = conv_base(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                              layer.padding, layer.dilation, layer.groups, bias is not None,
                              layer.padding_mode)
    plain.weight = weight
    if bias is not None:
        plain.bias = bias
    plain.train(layer.training)
    return plain
