"""The two loralib helpers: freeze everything but LoRA, and keep only LoRA's state."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers.lora_layers import LoRALayer

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "BIAS_MODES"]

BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks ``"lora_"``, and make the LoRA ones trainable.

    Unlike loralib, this also sets ``requires_grad=True`` on the LoRA parameters, so it undoes an
    earlier blanket ``model.requires_grad_(False)``.

    Args:
        model: any module containing LoRA layers.
        bias: ``"none"`` (biases frozen), ``"all"`` (every bias trains) or ``"lora_only"`` (only the
            biases of LoRA layers with ``r > 0`` train).

    Raises:
        ValueError: for an unknown ``bias`` mode (loralib raises NotImplementedError).
    """
    _check_bias(bias)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALayer) and module.r > 0 \
                    and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA part of ``model.state_dict()``: every key containing ``"lora_"``, plus biases.

    Args:
        model: any module containing LoRA layers.
        bias: ``"none"``, ``"all"`` (every key containing ``"bias"``) or ``"lora_only"`` (the bias
            of each module that has LoRA parameters).

    Returns:
        A dict that ``model.load_state_dict(..., strict=False)`` restores; same keys as loralib.
    """
    _check_bias(bias)
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if "lora_" in k:
            out[k] = v
            bias_name = k.split("lora_")[0] + "bias"
            if bias_name in state:
                out[bias_name] = state[bias_name]
    return out
