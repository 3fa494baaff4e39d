"""What an adapter is inside a model: its tensors, its per-module facts, and a weightless preview.

:func:`adapter_state_dict` is the one answer to "what does an adapter file hold" (both our format and
the PEFT export start from it); the layers themselves say which parameters are theirs
(:meth:`~lora_phi3.layers.LoRALayer.adapter_params`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import torch
import torch.nn as nn

from ..config import LoraConfig
from ..inject.injector import get_lora_config, inject_lora
from ..inject.matching import under_any
from ..layers import (Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear, ParamLoRA,
                      lora_layers)

__all__ = ["adapter_state_dict", "adapter_param_keys", "module_meta", "is_bare", "injected_preview", "to_saveable"]

# The layer family a module belongs to (MergedLinear first: it is not a Linear subclass, but a
# quantized variant may subclass either); files are compared by family, so an adapter trained
# over an NF4 base loads into the same layers over a bf16 base. ParamLoRA is an adapter on a
# parameter (target_parameters): its file path is ``<module>.param_lora.<parameter>``, and its
# tensors' shapes carry the experts.
_KINDS = (MergedLinear, Linear, Embedding, Conv1d, Conv2d, Conv3d, ParamLoRA)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`~lora_phi3.adapters.save_adapter` writes: everything the fine-tune trained.

    That is each LoRA layer's own adapter parameters (``adapter_params()``: ``lora_A``/``lora_B``);
    the biases selected by the config's ``bias`` (``"all"``: every bias parameter; ``"lora_only"``:
    the biases of LoRA layers); and every parameter of the ``modules_to_save`` modules. Without a
    stored config, only the adapter parameters.

    Args:
        model: a model with LoRA layers (or none: the result is then empty).

    Returns:
        ``{state_dict key: detached tensor}`` sharing storage with the model, sorted by key.
    """
    config = get_lora_config(model)
    bias = config.bias if config is not None else "none"
    to_save = config.modules_to_save if config is not None else None
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        prefix = f"{name}." if name else ""
        for key, param in layer.adapter_params().items():
            out[prefix + key] = param.detach()
        if bias == "lora_only" and getattr(layer, "bias", None) is not None:
            out[prefix + "bias"] = layer.bias.detach()
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, leaf = name.rpartition(".")
        if bias == "all" and leaf == "bias":
            out[name] = param.detach()
        elif to_save and under_any(module_name, to_save):
            out[name] = param.detach()
    return dict(sorted(out.items()))


def adapter_param_keys(model: nn.Module) -> set[str]:
    """The keys of :func:`adapter_state_dict` that are the LoRA layers' own adapter parameters
    (not the trained biases or ``modules_to_save`` parameters that travel with them)."""
    return {f"{name}.{key}" if name else key
            for name, layer in lora_layers(model).items() for key in layer.adapter_params()}


def module_meta(module: LoRALayer) -> dict[str, Any]:
    """The per-module facts a file must agree with: type, rank, scaling and shapes."""
    kind = next((c.__name__ for c in _KINDS if isinstance(module, c)), type(module).__name__)
    meta: dict[str, Any] = {"type": type(module).__name__, "kind": kind, "r": module.r,
                            "lora_alpha": module.lora_alpha, "scaling": module.scaling}
    for attr in ("in_features", "out_features", "fan_in_fan_out", "num_embeddings",
                 "embedding_dim", "in_channels", "out_channels", "groups"):
        if hasattr(module, attr):
            meta[attr] = getattr(module, attr)
    if hasattr(module, "kernel_size"):
        meta["kernel_size"] = list(module.kernel_size)
    if isinstance(module, MergedLinear):
        meta["split_sizes"] = list(module.split_sizes)
        meta["enable_lora"] = list(module.enable_lora)
    if hasattr(module, "lora_layout"):  # a conv's factorisation: loralib's or PEFT's
        meta["lora_layout"] = module.lora_layout
    if hasattr(module, "token_indices"):  # trainable tokens: which rows the values replace
        meta["token_indices"] = [int(i) for i in module.token_indices]
    return meta


def is_bare(model: nn.Module) -> bool:
    """True if ``model`` holds no adapter yet (no LoRA layer and no stored config)."""
    return not lora_layers(model) and get_lora_config(model) is None


def injected_preview(model: nn.Module, config: LoraConfig) -> nn.Module:
    """A copy of ``model`` with every tensor on the meta device, injected with ``config``.

    It has the adapter keys, shapes and dtypes that ``inject_lora(model, config)`` would create,
    at no memory cost, so a file can be checked completely before the real model is touched.

    Raises:
        ValueError: from ``inject_lora`` (e.g. a target that matches nothing), or if the model
            cannot be copied.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as e:  # a module holding something deepcopy cannot copy
        raise ValueError(f"cannot preview the injection on a copy of {type(model).__name__} ({e}); "
                         "call inject_lora(model, config) yourself, then load") from None
    # The preview needs only adapter shapes: a quantized base is not built on meta tensors, and
    # the copy never runs, so it needs no recompute hooks.
    return inject_lora(clone, dataclasses.replace(config, quantize_base=None), input_recompute=False)


def to_saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies that own their storage (safetensors refuses shared or strided storage,
    e.g. a tied ``lm_head``/embedding)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
