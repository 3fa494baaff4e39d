"""The two loralib helpers: freeze everything but LoRA, and keep only LoRA's state.

Which parameters are the adapter's is asked of the layers (``LoRALayer.adapter_params()``), not
read off a ``"lora_"`` substring; for models built from this package's layers the keys are
loralib's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import LoRALayer

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "adapter_keys", "BIAS_MODES"]

BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def adapter_keys(model: nn.Module) -> dict[str, str]:
    """State-dict key of every adapter parameter -> the path of the layer holding it.

    Every path a shared layer is reachable under is listed, as ``model.state_dict()`` lists it.
    """
    keys = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoRALayer):
            for name in module.adapter_params():
                keys[f"{path}.{name}" if path else name] = path
    return keys


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter but the adapters' own, and make the adapters' trainable.

    Unlike loralib, this also sets ``requires_grad=True`` on the LoRA parameters, so it undoes an
    earlier blanket ``model.requires_grad_(False)``.

    Args:
        model: any module containing LoRA layers.
        bias: ``"none"`` (biases frozen), ``"all"`` (every bias trains) or ``"lora_only"`` (only the
            biases of LoRA layers with an adapter train).

    Raises:
        ValueError: for an unknown ``bias`` mode (loralib raises NotImplementedError).
    """
    _check_bias(bias)
    adapter = {id(p) for m in model.modules() if isinstance(m, LoRALayer)
               for p in m.adapter_params().values()}
    for name, param in model.named_parameters():
        param.requires_grad = id(param) in adapter
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoRALayer) and module.adapter_params() \
                    and getattr(module, "bias", None) is not None:
                module.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA part of ``model.state_dict()``: every adapter parameter, plus biases.

    Args:
        model: any module containing LoRA layers.
        bias: ``"none"``, ``"all"`` (also every key containing ``"bias"``) or ``"lora_only"`` (also
            the bias of each layer that holds an adapter).

    Returns:
        A dict that ``model.load_state_dict(..., strict=False)`` restores; same keys as loralib.

    Raises:
        ValueError: for an unknown ``bias`` mode.
    """
    _check_bias(bias)
    state = model.state_dict()
    adapter = adapter_keys(model)
    if bias == "none":
        return {k: v for k, v in state.items() if k in adapter}
    if bias == "all":
        return {k: v for k, v in state.items() if k in adapter or "bias" in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in adapter:
            out[k] = v
            path = adapter[k]
            bias_name = f"{path}.bias" if path else "bias"
            if bias_name in state:
                out[bias_name] = state[bias_name]
    return out
