"""``x @ dequant(W).T + b`` over an NF4 weight, never holding the whole dense weight.

QLoRA (Dettmers et al. 2023) section 3: the frozen 4-bit weight is dequantised in the compute
dtype for each product, and only the 4-bit storage is kept for backward.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .nf4 import NF4Tensor, chunk_elements, decode_pairs, nf4_dequantize

__all__ = ["NF4LinearFunction", "nf4_matmul", "nf4_input_grad"]


def _row_step(q: NF4Tensor) -> Optional[int]:
    """Rows of ``W`` per step of the slab-wise product, or None to dequantise ``W`` whole.

    Slabs need byte-aligned rows (an even ``in_features``); a weight that fits one chunk is
    simply dequantised whole.
    """
    out_f, in_f = q.shape
    chunk = chunk_elements(q.device)
    if in_f % 2 or out_f * in_f <= chunk:
        return None
    return max(1, chunk // in_f)


def _dequantize_rows(q: NF4Tensor, absmax: torch.Tensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of ``dequant(q)``, ``(r1 - r0, in_features)``; ``absmax``: decoded block scales."""
    in_f = q.shape[1]
    per_row = in_f // q.block_size
    rows = dataclasses.replace(q, codes=q.codes[r0 * in_f // 2 : r1 * in_f // 2],
                               absmax=absmax[r0 * per_row : r1 * per_row], absmax_scale=None,
                               absmax_offset=None, shape=torch.Size((r1 - r0, in_f)))  # fmt: skip
    return nf4_dequantize(rows, dtype)


def _dequantize_cols(q: NF4Tensor, absmax: torch.Tensor, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns ``c0:c1`` of ``dequant(q)``, ``(out_features, c1 - c0)``; both bounds multiples of
    the block size and even, so the slab is whole blocks and whole bytes of every row."""
    out_f, in_f = q.shape
    size = q.block_size
    byte_index = q.codes.view(out_f, in_f // 2)[:, c0 // 2 : c1 // 2].reshape(-1).int()
    values = decode_pairs(byte_index)
    values = values.view(out_f, (c1 - c0) // size, size)
    values.mul_(absmax.view(out_f, in_f // size)[:, c0 // size : c1 // size, None])  # fp32 product
    return values.view(out_f, c1 - c0).to(dtype)


class NF4LinearFunction(torch.autograd.Function):
    """``y = x @ dequant(W).T + bias`` in ``q.compute_dtype``; only the NF4 storage is saved.

    Backward dequantises ``W`` again instead of keeping the dense copy alive between forward and
    backward (QLoRA section 3). The frozen weight gets no gradient. A weight larger than one
    dequantisation chunk is never dense as a whole: the forward takes it in slabs of rows
    (``y[..., rows] = x @ W[rows].T``) and the backward in slabs of whole-block columns
    (``grad_x[..., cols] = grad_y @ W[:, cols]``), so each output element is still one full dot
    product and the transient weight is one slab (a few MiB, reused by the allocator).

    Usage: ``NF4LinearFunction.apply(x, q, bias)`` with ``x`` ``(..., in_features)``, ``q`` an
    NF4Tensor of shape ``(out_features, in_features)`` and ``bias`` ``(out_features,)`` or None.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        _check_linear_args(x, q, bias)
        ct = q.compute_dtype
        xc, b = x.to(ct), None if bias is None else bias.to(ct)
        step = _row_step(q)
        if step is None:
            out = F.linear(xc, q.dequantize(ct), b)  # (out_features, in_features) weight, whole
        else:
            out_f = q.shape[0]
            absmax = q.block_absmax()
            out = xc.new_empty(*x.shape[:-1], out_f)
            for r0 in range(0, out_f, step):
                r1 = min(r0 + step, out_f)
                part = F.linear(xc, _dequantize_rows(q, absmax, r0, r1, ct), None if b is None else b[r0:r1])
                out.narrow(-1, r0, r1 - r0).copy_(part)
        ctx.save_for_backward(*q.storage())
        ctx.q = q.with_storage(None, None, None, None)  # metadata only; tensors come from saved
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_input_grad(grad_out, ctx.q.with_storage(*ctx.saved_tensors)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias


def nf4_input_grad(grad_out: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``grad_out @ dequant(q)`` in ``q.compute_dtype``: ``(..., out_features) -> (..., in_features)``.

    A weight larger than one dequantisation chunk is taken in slabs of whole-block columns, so the
    dense weight never exists as a whole.
    """
    ct = q.compute_dtype
    g = grad_out.to(ct)
    step = _row_step(q)
    if step is None:
        return g @ q.dequantize(ct)
    out_f, in_f = q.shape
    absmax = q.block_absmax()
    unit = q.block_size * (2 if q.block_size % 2 else 1)  # whole blocks, whole bytes
    cols = max(unit, chunk_elements(q.device) // out_f // unit * unit)
    grad_x = g.new_empty(*g.shape[:-1], in_f)
    for c0 in range(0, in_f, cols):
        c1 = min(c0 + cols, in_f)
        grad_x.narrow(-1, c0, c1 - c0).copy_(g @ _dequantize_cols(q, absmax, c0, c1, ct))
    return grad_x


def _check_linear_args(x: torch.Tensor, q: NF4Tensor, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"q must hold a 2-D (out_features, in_features) weight, got shape {tuple(q.shape)}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"x must have shape (..., in_features={q.shape[1]}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (q.shape[0],):
        raise ValueError(f"bias must have shape ({q.shape[0]},) (out_features), got {tuple(bias.shape)}")


def nf4_matmul(x: torch.Tensor, q: NF4Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ dequant(q).T + bias`` with gradients for ``x`` (and ``bias``); see NF4LinearFunction.

    Args:
        x: ``(..., in_features)`` float tensor.
        q: NF4Tensor of shape ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.

    Returns:
        ``(..., out_features)`` in ``q.compute_dtype``.

    Raises:
        TypeError / ValueError: wrong argument types or shapes.
    """
    return NF4LinearFunction.apply(x, q, bias)
