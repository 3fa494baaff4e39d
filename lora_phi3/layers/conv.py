"""``Conv1d``, ``Conv2d``, ``Conv3d``: LoRA on convolutions, in loralib's layout or HF PEFT's."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoRALayer, new_lora_param
from .dora import (cached, dora_norm, dora_rescale_channels, peft_grouped_conv_update,
                   version_key, weight_row_sq)
from .named import mixed_forward

__all__ = ["Conv1d", "Conv2d", "Conv3d", "LORA_LAYOUTS"]

#: How ``A`` and ``B`` factorise the kernel update: loralib's matrices or PEFT's two convolutions.
LORA_LAYOUTS = ("loralib", "peft")


class _ConvLoRA(LoRALayer):
    """LoRA for ``nn.Conv1d/2d/3d``, in one of two factorisations (``lora_layout``).

    ``"loralib"`` (the default), generalised to any kernel ``(k0, k1, ...)``: ``lora_A`` is
    ``(r * k0, in_channels * k1 * ...)`` and ``lora_B`` is ``(out_channels // groups * k0, r * k0)``;
    ``B @ A`` has exactly ``weight.numel()`` elements and is viewed as the weight's shape. For a
    square Conv2d kernel these are loralib's shapes, so its checkpoints load (its
    ``conv.weight``/``conv.bias`` keys are mapped on load). loralib's Conv1d and Conv3d crash for
    kernel > 1 (loralib #115); these do not. The delta is kernel-sized (independent of the number of
    positions), so it is formed per forward; with dropout the adapter runs as a second convolution
    on the dropped-out input.

    ``"peft"`` (HF PEFT 0.21's ``lora.Conv1d/2d/3d``): ``lora_A`` is a conv weight
    ``(r, in_channels, *kernel_size)`` applied with the layer's stride, padding and dilation, and
    ``lora_B`` a 1x1 conv weight ``(out_channels, r // groups, 1, ...)`` applied with the layer's
    groups, so PEFT's ``lora_A.<name>.weight``/``lora_B.<name>.weight`` tensors load unchanged. The
    forward stays in rank-r space: ``conv(x) + B_conv(A_conv(dropout(x))) * scaling``. Two places
    where PEFT's own forward disagrees with its own merge, and this layer follows the merge:
    PEFT's ``A`` ignores ``dilation`` (its forward then crashes, or with ``padding="same"`` computes
    a different function) and always zero-pads whatever ``padding_mode`` says. ``A`` spans all
    input channels even when ``groups > 1``, so that update does not fit the grouped weight: such a
    layer cannot merge (PEFT refuses too) and needs ``merge_weights=False``.

    Variants, as PEFT 0.21 has them. ``lora_bias=True`` (either layout): a bias ``lora_bias``
    ``(out_channels,)`` on ``B``'s output, so the adapter adds ``scaling * (B_conv(A_conv(x)) + b_B)``
    and a merge adds ``scaling * lora_bias`` to ``bias``. ``use_dora=True`` (``"peft"`` only): a
    magnitude ``lora_magnitude`` ``(out_channels,)`` (PEFT stores it as ``(1, out, 1, ...)``) over
    the norm of each output channel's kernel ``W + delta``; the output is
    ``g * (conv(x, W) + scaling * B_conv(A_conv(x))) + bias`` per channel. For ``groups > 1`` the
    norm is the one PEFT takes (:func:`~lora_phi3.layers.dora.peft_grouped_conv_update`).
    """

    _legacy_keys = {"conv.weight": "weight", "conv.bias": "bias"}
    _conv_cls: type[nn.modules.conv._ConvNd]
    _conv_fn: Callable[..., torch.Tensor]  # F.conv1d/2d/3d, for the adapter's two convolutions

    supports_dora = True  # in lora_layout="peft"; loralib's layout refuses it in _setup
    supports_lora_bias = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, merge_weights: bool = True,
                 lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, use_dora: bool = False,
                 lora_layout: str = "loralib", lora_bias: bool = False, **kwargs: Any) -> None:
        self._conv_cls.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._setup(r, lora_alpha, lora_dropout, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights, use_dora, lora_layout, lora_bias)
        self.reset_parameters()  # loralib's order: kernel and bias (again), then A

    def _setup(self, r, lora_alpha, lora_dropout, merge_weights, lora_dtype,
               use_rslora=False, init_lora_weights=True, use_dora=False,
               lora_layout="loralib", lora_bias=False) -> None:
        if not isinstance(lora_layout, str) or lora_layout not in LORA_LAYOUTS:
            raise ValueError(f"lora_layout must be one of {', '.join(map(repr, LORA_LAYOUTS))}, "
                             f"got {lora_layout!r}")
        if use_dora is True and lora_layout != "peft":
            raise ValueError(f"use_dora=True on {type(self).__name__} needs lora_layout='peft' "
                             "(PEFT's factorisation, which inject_lora uses), got "
                             f"lora_layout={lora_layout!r}")
        self.lora_layout = lora_layout
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora,
                        init_lora_weights, use_dora, lora_bias)
        if r == 0:
            return
        dtype, device = lora_dtype or self.weight.dtype, self.weight.device
        if lora_layout == "peft":
            self._check_peft_groups(r, merge_weights)
            ones = (1,) * len(self.kernel_size)
            self.lora_A = new_lora_param((r, self.in_channels, *self.kernel_size), dtype, device)
            self.lora_B = new_lora_param((self.out_channels, r // self.groups, *ones), dtype, device)
        else:
            k0, rest = self.kernel_size[0], math.prod(self.kernel_size[1:])
            self.lora_A = new_lora_param((r * k0, self.in_channels * rest), dtype, device)
            self.lora_B = new_lora_param((self.out_channels // self.groups * k0, r * k0), dtype, device)
        if use_dora:  # one value per output channel (PEFT's (1, out, 1, ...) vector, flattened)
            self.lora_magnitude = new_lora_param((self.out_channels,), dtype, device)
        if lora_bias:  # the bias of PEFT's B conv
            self.lora_bias = new_lora_param((self.out_channels,), dtype, device)
        self.weight.requires_grad = False

    def _check_peft_groups(self, r: int, merge_weights: bool) -> None:
        # B is a grouped 1x1 conv from r channels, so r must split into the groups (PEFT's rule).
        if r % self.groups:
            raise ValueError(f"lora_layout='peft' needs r divisible by groups (B is a grouped 1x1 "
                             f"conv, as in PEFT), got r={r}, groups={self.groups}")
        if self.groups > 1 and merge_weights:
            raise ValueError(f"lora_layout='peft' with groups={self.groups} cannot merge (A spans "
                             "all input channels, so the update does not fit the grouped weight; "
                             "PEFT refuses to merge it too): pass merge_weights=False")

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, r: int = 0, lora_alpha: float = 1,
                  lora_dropout: float = 0.0, merge_weights: bool = True,
                  lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                  init_lora_weights: bool | str = True, use_dora: bool = False,
                  lora_layout: str = "loralib", lora_bias: bool = False):
        """Wrap an existing convolution of the matching dimension, sharing its weight and bias.

        ``lora_layout``: ``"loralib"`` or ``"peft"`` (see the class docstring for the shapes and
        for ``use_dora``/``lora_bias``).

        Raises:
            TypeError: ``conv`` is not of this layer's convolution type.
            ValueError: a bad ``lora_layout``; with ``"peft"``, ``r`` not divisible by ``groups``,
                or ``groups > 1`` with ``merge_weights=True``; ``use_dora=True`` in loralib's
                layout; ``lora_bias=True`` with ``use_dora``, or with ``merge_weights`` on a conv
                without a bias.
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
                    init_lora_weights, use_dora, lora_layout, lora_bias)
        if r > 0:
            # The base class's init suits both layouts: kaiming_uniform_ on a conv weight takes
            # fan_in = channels * kernel, exactly as PEFT's nn.ConvNd(...) A and B are drawn.
            self.reset_lora_parameters()
        return self

    def delta_weight(self) -> torch.Tensor:
        """The dense kernel update, ``weight``'s shape, in fp32 (PEFT's ``get_delta_weight``).

        Raises:
            ValueError: ``lora_layout="peft"`` with ``groups > 1`` (the update has no grouped form).
        """
        A, B = self._acc(self.lora_A), self._acc(self.lora_B)
        if self.lora_layout == "loralib":
            return (B @ A).view(self.weight.shape) * self.scaling
        if self.groups > 1:
            raise ValueError(f"lora_layout='peft' with groups={self.groups} has no dense update "
                             "in the grouped weight's shape, so it cannot merge")
        # B is 1x1: delta[o, i, *k] = sum_j B[o, j] * A[j, i, *k], a (out, r) @ (r, in * k) product.
        return (B.flatten(1) @ A.flatten(1)).view(self.weight.shape) * self.scaling

    # -- DoRA (lora_layout="peft") ------------------------------------------------------------------
    def _dora_norm(self) -> torch.Tensor:
        """``||W_o + delta_o||`` per output channel ``o`` over ``(in / groups, *kernel)``, fp32
        ``(out_channels,)``; cached until ``A``, ``B``, the kernel or the scaling change."""
        W, A, B = self.weight, self.lora_A, self.lora_B
        key = (version_key(W), version_key(A), version_key(B), self.scaling)
        return cached(self, "_dora_norm_cache", key, self._compute_dora_norm)

    @torch.no_grad()
    def _compute_dora_norm(self) -> torch.Tensor:
        W = self.weight.flatten(1)  # (out, in / groups * k)
        if self.groups == 1:  # B A is exactly a linear layer's (out, r) @ (r, in * k)
            return dora_norm(W, weight_row_sq(W), self.lora_A.flatten(1), self.lora_B.flatten(1),
                             self.scaling, ((0, self.out_channels),))
        update = peft_grouped_conv_update(self.lora_A, self.lora_B, self.weight.shape)
        return weight_row_sq(W.to(update.dtype) + self.scaling * update.flatten(1)).sqrt()

    @torch.no_grad()
    def _dora_weight_gain(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dora_gain().to(dtype).view(-1, *(1,) * (self.weight.dim() - 1))  # (out, 1, ...)

    def _peft_adapter(self, x: torch.Tensor) -> torch.Tensor:
        """``B_conv(A_conv(dropout(x)))`` in the adapter's dtype: ``(N, C_in, *S) -> (N, C_out, *S_out)``."""
        x = self.lora_dropout(x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype))
        padding = self.padding
        if self.padding_mode != "zeros":  # pad as the base conv does, so unmerged == merged
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        h = self._conv_fn(x, self.lora_A, None, self.stride, padding, self.dilation)  # (N, r, *S_out)
        return self._conv_fn(h, self.lora_B, None, groups=self.groups)  # (N, C_out, *S_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixed_groups is not None:  # rows with different adapters (lora_phi3.mixed_batch)
            return mixed_forward(self, x, self.forward)
        if not self.lora_active:
            return self._conv_forward(x, self.weight, self.bias)
        # PEFT's lora_bias, scaling * lora_bias, is folded into the base convolution's bias.
        bias = self._bias_with_lora(self.weight.dtype)
        if self.lora_layout == "peft":
            result = self._conv_forward(x, self.weight, bias)
            # Summed in the adapter's dtype (fp32 over a 16-bit base) and rounded once, as PEFT does.
            out = (result + self._peft_adapter(x) * self.scaling).to(result.dtype)
            if getattr(self, "use_dora", False):  # (N, C, *S): each channel's gain, bias kept
                return dora_rescale_channels(out, self.dora_gain(), self.bias)
            return out
        delta = ((self.lora_B @ self.lora_A).view(self.weight.shape) * self.scaling)
        if isinstance(self.lora_dropout, nn.Identity):
            return self._conv_forward(x, self.weight + delta.to(self.weight.dtype), bias)
        result = self._conv_forward(x, self.weight, bias)
        xa = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)  # fp32 adapter, 16-bit base
        lora = self._conv_forward(self.lora_dropout(xa), delta, None)
        return result + lora.to(result.dtype)

    def extra_repr(self) -> str:
        layout = ", lora_layout='peft'" if getattr(self, "lora_layout", "loralib") == "peft" else ""
        return super().extra_repr() + layout


class Conv1d(_ConvLoRA, nn.Conv1d):
    """``nn.Conv1d`` with LoRA. Input ``(N, C_in, L)``; see :class:`_ConvLoRA` for shapes."""

    _conv_cls = nn.Conv1d
    _conv_fn = staticmethod(F.conv1d)


class Conv2d(_ConvLoRA, nn.Conv2d):
    """``nn.Conv2d`` with LoRA. Input ``(N, C_in, H, W)``; see :class:`_ConvLoRA` for shapes."""

    _conv_cls = nn.Conv2d
    _conv_fn = staticmethod(F.conv2d)


class Conv3d(_ConvLoRA, nn.Conv3d):
    """``nn.Conv3d`` with LoRA. Input ``(N, C_in, D, H, W)``; see :class:`_ConvLoRA` for shapes."""

    _conv_cls = nn.Conv3d
    _conv_fn = staticmethod(F.conv3d)
