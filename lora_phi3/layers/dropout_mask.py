"""The adapter's dropout mask kept as bits (1 per element) between forward and backward."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pack_mask", "unpack_mask", "cached_constant"]

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def cached_constant(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``"shifts"`` (the 8 bit shifts 0..7) or ``"zero"`` (a 0-dim zero) on ``device``.

    Cached per device and dtype in eager mode to spare an allocation per call; built in place under
    ``torch.compile``.
    """
    if torch.compiler.is_compiling():
        return torch.arange(8, dtype=dtype, device=device) if kind == "shifts" else \
            torch.zeros((), dtype=dtype, device=device)
    key = (kind, device, dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.arange(8, dtype=dtype, device=device) if kind == "shifts" else \
            torch.zeros((), dtype=dtype, device=device)
        _CONSTANTS[key] = t
    return t


def _shifts(device: torch.device) -> torch.Tensor:
    return cached_constant("shifts", device, torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into bits, 8 elements per byte (little-endian within a byte).

    Args:
        mask: bool tensor of any shape.

    Returns:
        uint8 tensor of shape ``(ceil(mask.numel() / 8),)``.
    """
    flat = mask.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)).bitwise_and_(1)  # (n_bytes, 8): 0/1
    return bits.view(-1)[:math.prod(shape)].view(torch.bool).view(*shape)
