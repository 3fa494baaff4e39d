"""Which LoRA layer replaces a module, and which plain module a LoRA layer stands for.

:func:`make_lora_module` is the single place where a base module becomes a LoRA layer (dense or
over a quantized base); :func:`plain_module` is its inverse, used by ``merge_and_unload``.
Convolutions get PEFT's factorisation (``lora_layout="peft"``), so an injected model exports to and
imports from PEFT exactly; ``nn.MultiheadAttention`` gets :class:`~lora_phi3.layers.MultiheadAttention`
(its ``out_proj`` a LoRA ``Linear`` inside it); the embeddings of ``trainable_token_indices`` get
:class:`~lora_phi3.layers.TrainableTokens`; a module whose parameters ``target_parameters`` selects
gets a host holding a :class:`~lora_phi3.layers.ParamLoRA` per parameter
(:class:`~lora_phi3.layers.LoRAExperts` for transformers' experts, else
:class:`~lora_phi3.layers.LoRAParameters`). A
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
from ..layers import (Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRAExperts, LoRALayer,
                      LoRAParameters, MergedLinear, MultiheadAttention, ParamLoRA, TrainableTokens,
                      is_experts_module)
from ..layers.base import is_data_init
from ..quant import qlora
from .matching import ParamSpec, SliceSpec, TokenSpec, is_hf_conv1d

logger = logging.getLogger(__name__)

__all__ = ["make_lora_module", "lora_kwargs", "plain_module", "quantized_factory", "quantized_check",
           "check_lora_target", "BASE_ATTR"]

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


def lora_kwargs(config: LoraConfig, module: nn.Module) -> dict[str, Any]:
    """The LoRA arguments every layer constructor takes, from ``config``, for a layer over
    ``module``'s weight (dense, or a quantized LoRA layer's base)."""
    weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) \
        else getattr(module, "weight", None)
    dtype = weight.dtype if weight is not None else module.quantized_weight.compute_dtype
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(r=config.r, lora_alpha=config.lora_alpha, merge_weights=False,
                lora_dtype=torch.float32 if half else None, use_rslora=config.use_rslora,
                init_lora_weights=config.init_lora_weights, use_dora=config.use_dora,
                lora_bias=config.lora_bias)


def _layer_class(module: nn.Module) -> type[LoRALayer]:
    """The LoRA layer kind :func:`make_lora_module` builds for ``module`` (a quantized base's
    layers subclass ``Linear``/``MergedLinear`` and take the same variants)."""
    if isinstance(module, nn.Embedding):
        return Embedding
    conv = next((c for base, c in _CONV_LORA.items() if isinstance(module, base)), None)
    if conv is not None:
        return conv
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttention
    return Linear


def check_lora_target(module: nn.Module, name: str, config: LoraConfig,
                      slice_spec: SliceSpec | TokenSpec | None = None) -> None:
    """Raise, without building anything, the ``ValueError`` the layer chosen for ``module`` gives
    for ``config``'s variant switches (DoRA, ``lora_bias``), so an injection can refuse before its
    first replacement.

    Raises:
        ValueError: naming ``name``, the switch and the layer kinds that take it.
    """
    if isinstance(slice_spec, TokenSpec):
        return
    try:
        kind = ParamLoRA if isinstance(slice_spec, ParamSpec) else _layer_class(module)
        kind.check_variants(config.use_dora, config.lora_bias)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def make_lora_module(module: nn.Module, name: str, config: LoraConfig,
                     slice_spec: SliceSpec | TokenSpec | None) -> nn.Module:
    """The LoRA layer that replaces ``module`` (the single place where layers are chosen).

    Adapters are kept in fp32 when the base weight is fp16/bf16: the optimizer then updates fp32
    values, and the layers cast the input to fp32 and the adapter's output back (trainable tokens
    keep the table's dtype, as PEFT's do).

    Args:
        slice_spec: the plan's entry for ``module``: a :class:`SliceSpec` (slices of a fused
            projection), a :class:`TokenSpec` (trainable tokens), a :class:`ParamSpec` (adapters
            on its parameters: the host that stands for it) or None (the whole module).

    Raises:
        NotImplementedError: ``config.quantize_base`` names no known quantized layer.
        ValueError: the quantized builder refuses ``module`` (see its check); a layer refuses the
            config (e.g. DoRA or ``lora_bias`` on ``nn.MultiheadAttention``, ``lora_bias`` on an
            embedding, ``r`` not divisible by a conv's ``groups``; :func:`check_lora_target`
            raises the variant refusals without building anything).
    """
    new: LoRALayer
    check_lora_target(module, name, config, slice_spec)  # the variant refusals, named
    if isinstance(slice_spec, ParamSpec):
        return _parameter_host(module, name, config, slice_spec)
    if isinstance(slice_spec, TokenSpec):
        new = TrainableTokens.from_embedding(module, slice_spec.token_indices, merge_weights=False,
                                             init_lora_weights=config.init_lora_weights)
        return _keep_base(new, module)
    common = lora_kwargs(config, module)
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
    elif (kind := _layer_class(module)) is Embedding:
        new = Embedding.from_embedding(module, **common)
    elif kind in _CONV_LORA.values():
        # PEFT's layout (A a full-kernel conv, B a 1x1 conv), so the adapter exports exactly; a
        # grouped conv cannot merge in it, which merge_weights=False never asks of it.
        new = kind.from_conv(module, lora_dropout=config.lora_dropout, lora_layout="peft", **common)
    elif kind is MultiheadAttention:
        common.pop("lora_bias")  # refused above when set: its layer has no lora_bias argument
        new = MultiheadAttention.from_mha(module, lora_dropout=config.lora_dropout, **common)
        if isinstance(new.out_proj, LoRALayer):
            _keep_base(new.out_proj, module.out_proj)
    else:
        if config.fan_in_fan_out and not is_hf_conv1d(module):
            logger.warning("%s is nn.Linear (weight (out, in)); ignoring fan_in_fan_out=True", name)
        new = _dense_linear_lora(module, config, slice_spec, common)
    return _keep_base(new, module)


def _parameter_host(module: nn.Module, name: str, config: LoraConfig,
                    spec: ParamSpec) -> LoRAParameters:
    """The host of ``module``'s adapters on ``spec.parameter_names``: :class:`LoRAExperts` for
    transformers' experts layout (a low-rank forward per expert), else :class:`LoRAParameters` (the
    module's own forward with the dense ``W + s * B @ A``). It keeps ``module`` itself."""
    dtypes = {module._parameters[p].dtype for p in spec.parameter_names}
    half = bool(dtypes & {torch.float16, torch.bfloat16})
    kwargs = dict(r=config.r, lora_alpha=config.lora_alpha, merge_weights=False,
                  lora_dtype=torch.float32 if half else None, use_rslora=config.use_rslora,
                  init_lora_weights=config.init_lora_weights)
    host = LoRAExperts if is_experts_module(module) else LoRAParameters
    try:
        return host(module, spec.parameter_names, **kwargs)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _keep_base(new: LoRALayer, module: nn.Module) -> LoRALayer:
    """Keep the original module (minus its parameters, which now live in the LoRA layer, or were
    quantized and freed) so merge_and_unload returns the very class it replaced, hooks and
    attributes included."""
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


def plain_module(layer: LoRALayer | LoRAParameters) -> nn.Module:
    """The torch module ``layer`` (or a host of adapters on parameters) stands for, holding its
    (merged) weight and bias."""
    if isinstance(layer, LoRAParameters):
        return layer.to_base_module()
    base = layer.__dict__.get(BASE_ATTR)
    if base is not None:
        for key in base._parameters:
            base._parameters[key] = layer._parameters.get(key)
        base.train(layer.training)
        return base
    # A layer built by hand (not by inject_lora): rebuild its torch class around the same tensors.
    if isinstance(layer, nn.MultiheadAttention):
        return _plain_mha(layer)
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


def _plain_mha(layer: MultiheadAttention) -> nn.MultiheadAttention:
    """A hand-built LoRA ``MultiheadAttention`` as the torch module, around the same tensors."""
    with torch.device("meta"):
        plain = nn.MultiheadAttention(layer.embed_dim, layer.num_heads, dropout=layer.dropout,
                                      add_bias_kv=layer.bias_k is not None,
                                      add_zero_attn=layer.add_zero_attn, batch_first=layer.batch_first)
    for key in plain._parameters:
        plain._parameters[key] = layer._parameters.get(key)
    out = layer.out_proj
    plain.out_proj = plain_module(out) if isinstance(out, LoRALayer) else out
    plain.train(layer.training)
    return plain
