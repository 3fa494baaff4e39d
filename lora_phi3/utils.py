"""The two loralib helpers (freeze everything but LoRA, keep only LoRA's state) and a divergence
guard for training loops.

Which parameters are the adapter's is asked of the layers (``LoRALayer.adapter_params()``), not
read off a ``"lora_"`` substring; for models built from this package's layers the keys are
loralib's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .layers import LoRALayer

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "adapter_keys", "BIAS_MODES",
           "TrainingDiverged", "check_finite_step"]

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


# -- divergence guard ----------------------------------------------------------------------------
class TrainingDiverged(ValueError):
    """Training produced a non-finite loss, gradient norm or weight at optimizer step ``step``.

    Attributes:
        step: the step, numbered as the caller numbers it (``lora-phi3 finetune``: 1-based, as in
            its logs and ``checkpoint-<step>``).
        reason: what was not finite, e.g. ``"loss 7.945, gradient norm nan"``.
        loss, grad_norm: the values checked (None where not given).
        advice: what to do about it (the default suits any loop; the job names its flag).
    """

    def __init__(self, step: int, reason: str, loss: float | None = None,
                 grad_norm: float | None = None, advice: str = "lower the learning rate") -> None:
        # Every field is in ``args``, so the exception pickles and rebuilds whole (multiprocessing).
        super().__init__(step, reason, loss, grad_norm, advice)
        self.step, self.reason, self.loss, self.grad_norm, self.advice = \
            step, reason, loss, grad_norm, advice

    def __str__(self) -> str:
        return f"training diverged at step {self.step}: {self.reason}; {self.advice}"


def check_finite_step(step: int, loss: float | torch.Tensor,
                      grad_norm: float | torch.Tensor | None = None) -> None:
    """Raise :class:`TrainingDiverged` when a step's loss or gradient norm is NaN or infinite.

    Call it after ``backward()`` and the gradient norm (e.g. the value ``clip_grad_norm_``
    returns), and *before* ``optimizer.step()``: a step that fails is then never applied, so the
    weights (and any checkpoint written from them) stay finite. The rule is to stop, not to skip:
    once the loss or a gradient overflows, later steps almost always overflow too, and a skipped
    step would silently change which data the run has seen. In a data-parallel loop pass the
    all-reduced values, so that every rank stops at the same step::

        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        check_finite_step(step, loss.detach(), norm)  # raises before the update
        optimizer.step()

    Args:
        step: the optimizer step, for the message (number it as your logs do).
        loss: the step's loss (a float or a one-element tensor).
        grad_norm: the gradient norm before clipping, or None to check the loss only.

    Raises:
        TrainingDiverged: (a ``ValueError``) naming the step and the non-finite value.
    """
    def value(x: float | torch.Tensor) -> float:  # a loss tensor usually requires grad
        return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)

    loss_value = value(loss)
    norm_value = None if grad_norm is None else value(grad_norm)
    if math.isfinite(loss_value) and (norm_value is None or math.isfinite(norm_value)):
        return
    reason = f"loss {loss_value:.4g}" + ("" if norm_value is None else
                                        f", gradient norm {norm_value:.4g}")
    raise TrainingDiverged(step, reason, loss_value, norm_value)
