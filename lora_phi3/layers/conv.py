"""``Conv1d``, ``Conv2d``, ``Conv3d``: LoRA on convolutions in loralib's layout, for any kernel."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .base import LoRALayer, new_lora_param

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


class _ConvLoRA(LoRALayer):
    """LoRA for ``nn.Conv1d/2d/3d`` in loralib's layout, generalised to any kernel.

    With kernel ``(k0, k1, ...)``: ``lora_A`` is ``(r * k0, in_channels * k1 * ...)`` and ``lora_B`` is
    ``(out_channels // groups * k0, r * k0)``; ``B @ A`` has exactly ``weight.numel()`` elements and is
    viewed as the weight's shape. For a square Conv2d kernel these are loralib's shapes, so its
    checkpoints load (its ``conv.weight``/``conv.bias`` keys are mapped on load). loralib's Conv1d
    and Conv3d crash for kernel > 1 (loralib #115); these do not.

    The delta is kernel-sized (independent of the number of positions), so it is formed per
    forward; with dropout the adapter runs as a second convolution on the dropped-out input.
    """

    _legacy_keys = {"conv.weight": "weight", "conv.bias": "bias"}
    _conv_cls: type[nn.modules.conv._ConvNd]

    def __init__(self, in_channels: int, out_channels: int, kernel_size, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, merge_weights: bool = True,
                 lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, **kwargs: Any) -> None:
        self._conv_cls.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._setup(r, lora_alpha, lora_dropout, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights)
        self.reset_parameters()  # loralib's order: kernel and bias (again), then A

    def _setup(self, r, lora_alpha, lora_dropout, merge_weights, lora_dtype,
               use_rslora=False,
               init_lora_weights=True) -> None:
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora,
                        init_lora_weights)
        if r > 0:
            k0, rest = self.kernel_size[0], math.prod(self.kernel_size[1:])
            dtype, device = lora_dtype or self.weight.dtype, self.weight.device
            self.lora_A = new_lora_param((r * k0, self.in_channels * rest), dtype, device)
            self.lora_B = new_lora_param((self.out_channels // self.groups * k0, r * k0), dtype, device)
            self.weight.requires_grad = False

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, r: int = 0, lora_alpha: float = 1,
                  lora_dropout: float = 0.0, merge_weights: bool = True,
                  lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                  init_lora_weights: bool | str = True):
        """Wrap an existing convolution of the matching dimension, sharing its weight and bias.

        Raises:
            TypeError: ``conv`` is not of this layer's convolution type.
        """
        if not isinstance(conv, cls._conv_cls):
            raise TypeError(f"{cls.__name__}.from_conv needs a {cls._conv_cls.__name__}, "
                            f"got {type(conv).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode",
                     "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))
        self.weight, self.bias = conv.weight, conv.bias
        self._setup(r, lora_alpha, lora_dropout, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights)
        if r > 0:
            self.reset_lora_parameters()
        return self

    def delta_weight(self) -> torch.Tensor:
        return (self._acc(self.lora_B) @ self._acc(self.lora_A)).view(self.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_active:
            return self._conv_forward(x, self.weight, self.bias)
        delta = ((self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling)
        if isinstance(self.lora_dropout, nn.Identity):
            return self._conv_forward(x, self.weight + delta.to(self.weight.dtype), self.bias)
        result = self._conv_forward(x, self.weight, self.bias)
        xa = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)  # fp32 adapter, 16-bit base
        lora = self._conv_forward(self.lora_dropout(xa), delta, None)
        return result + lora.to(result.dtype)


class Conv1d(_ConvLoRA, nn.Conv1d):
    """``nn.Conv1d`` with LoRA. Input ``(N, C_in, L)``; see :class:`_ConvLoRA` for shapes."""

    _conv_cls = nn.Conv1d


class Conv2d(_ConvLoRA, nn.Conv2d):
    """``nn.Conv2d`` with LoRA. Input ``(N, C_in, H, W)``; see :class:`_ConvLoRA` for shapes."""

    _conv_cls = nn.Conv2d


class Conv3d(_ConvLoRA, nn.Conv3d):
    """``nn.Conv3d`` with LoRA. Input ``(N, C_in, D, H, W)``; see :class:`_ConvLoRA` for shapes."""

    _conv_cls = nn.Conv3d
