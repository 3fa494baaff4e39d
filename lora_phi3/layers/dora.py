"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

DoRA splits the adapted weight into a direction and a magnitude (section 4.1, eq. 5):
``W' = m * (W + s B A) / ||W + s B A||``, the norm taken per output row as PEFT takes it, and the
magnitude ``m`` (one value per adapted output row) trained beside ``A`` and ``B``. ``m`` starts at
``||W + s B A||`` of the initial adapter, so training starts from the LoRA function (the base
function for ``B = 0``).

What an "output row" is depends on the layer, as in PEFT 0.21: a row of a linear weight
``(out, in)``; a column of an embedding table ``(num_embeddings, dim)``, i.e. one value per
embedding dimension (the table is the weight ``(dim, num_embeddings)`` of a linear layer over
one-hot inputs); an output channel of a convolution kernel ``(out, in / groups, *kernel)``.

Two choices, both PEFT's or better, and both documented in ``docs/variants.md``:

- **The norm is never formed from a dense update.** Per output row ``i``,
  ``||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T``: one
  ``(r, in) x (in, out)`` product and ``(out, r)`` temporaries, ``O(out * in * r)`` FLOPs and
  ``O(out * r)`` memory, where PEFT builds the ``(out, in)`` update every forward. ``||W_i||^2`` of the
  frozen base is cached until the base changes. (A grouped convolution is the exception: see
  :func:`peft_grouped_conv_update`.)
- **The norm is detached** (section 4.3 of the paper, and PEFT): it is a constant in the backward,
  so gradients reach ``m`` through ``m / ||.||`` and ``A``/``B`` through the direction only.

The output is ``y = g * (x W^T + s dropout(x) A^T B^T) + b`` with ``g = m / ||W + s B A||`` on the
adapted rows; rows of slices a fused layer leaves alone keep ``g = 1``, i.e. are not touched at
all. Dropout acts on the adapter's input only (as in LoRA); PEFT instead also multiplies
``(g - 1) W`` by the dropped-out input during training, which costs a second base product. With
dropout 0, and always in eval mode, the two are the same function.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn as nn

from .lora_function import base_linear
from .slices import iter_slices

__all__ = ["dora_norm", "dora_rescale", "dora_rescale_channels", "weight_row_sq", "cached",
           "version_key", "peft_grouped_conv_update"]

Spans = Sequence[tuple[int, int]]
T = TypeVar("T")


def version_key(t: torch.Tensor) -> tuple[Any, ...]:
    """What identifies ``t``'s values for a cache: its storage, its in-place version and device (an
    optimizer step bumps the version; a new tensor has another storage)."""
    return t.data_ptr(), t._version, t.device


def cached(layer: nn.Module, slot: str, key: tuple[Any, ...], compute: Callable[[], T]) -> T:
    """``compute()``, kept in ``layer.__dict__[slot]`` until ``key`` changes.

    Outside the state dict and the parameters; a deepcopy copies it, and the new tensors' keys
    then differ, so the copy recomputes."""
    hit = layer.__dict__.get(slot)
    if hit is None or hit[0] != key:
        hit = (key, compute())
        layer.__dict__[slot] = hit
    return hit[1]


@torch.no_grad()
def weight_row_sq(weight: torch.Tensor) -> torch.Tensor:
    """``||W_i||^2`` per row of a dense ``(out, in)`` weight, accumulated in fp32: ``(out,)``."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()


@torch.no_grad()
def dora_norm(base, row_sq: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scaling: float, slices: Spans) -> torch.Tensor:
    """``||W_i + s B_i A||`` for every adapted output row, without the dense update.

    Args:
        base: the frozen weight, a dense ``(out, in)`` tensor or a quantized base with ``matmul``.
        row_sq: ``||W_i||^2`` for all ``out`` rows, fp32 ``(out,)`` (see :func:`weight_row_sq`).
        lora_A: ``(r * k, in)``, the stacked ``A`` of the ``k`` adapted slices.
        lora_B: ``(sum of slice sizes, r)``.
        scaling: the adapter's scaling ``s``.
        slices: ``(start, size)`` of each adapted output slice.

    Returns:
        ``(sum of slice sizes,)`` in ``lora_B``'s row order, in fp32 (fp64 for fp64 adapters).
    """
    acc = torch.promote_types(lora_A.dtype, torch.float32)
    A, B = lora_A.to(acc), lora_B.to(acc)
    r = A.shape[0] // len(slices)
    dense = isinstance(base, torch.Tensor)
    if not dense:  # a quantized base multiplies in its compute dtype, dequantising block by block
        wa = base_linear(A.to(base.compute_dtype), base, None).to(acc)  # (r*k, out) = A W^T
    norms = []
    for s in iter_slices(slices, r):
        A_i, B_i = A[s.a_rows], B[s.b_rows]  # (r, in), (size, r)
        if dense:  # only this slice's rows, in the accumulation dtype (16-bit bases widened)
            W_i = base[s.out_rows]
            wa_i = base_linear(A_i, W_i if W_i.dtype == acc else W_i.to(acc), None).T
        else:
            wa_i = wa[s.a_rows, s.start:s.start + s.size].T  # (size, r) = W_i A_i^T
        cross = (B_i * wa_i).sum(1)
        quad = ((B_i @ (A_i @ A_i.T)) * B_i).sum(1)
        sq = row_sq[s.start:s.start + s.size].to(acc) + 2 * scaling * cross + scaling ** 2 * quad
        norms.append(sq.clamp_min(0).sqrt())  # clamp: rounding must not make a ~0 row negative
    return torch.cat(norms) if len(norms) > 1 else norms[0]


@torch.no_grad()
def peft_grouped_conv_update(lora_A: torch.Tensor, lora_B: torch.Tensor,
                             weight_shape: Sequence[int]) -> torch.Tensor:
    """The update HF PEFT 0.21 takes the DoRA norm of for a convolution with ``groups > 1``, fp32.

    PEFT's layout (``A`` ``(r, in, *k)``, ``B`` ``(out, r // groups, 1, ...)``, see
    :mod:`.conv`) gives a grouped conv an update that spans all ``in`` channels, which has no
    ``(out, in / groups, *k)`` form. PEFT's ``_DoraConvNdLayer`` nevertheless forms
    ``(B.view(-1, r) @ A.view(r, -1)).reshape(W.shape)`` (a reshape that re-blocks ``B``'s rows
    and ``A``'s columns; for ``groups == 1`` it is exactly ``B A``) and divides by
    ``||W + s * that||``, in its forward and when it initialises ``m``. A PEFT file's magnitudes are
    trained against that norm, so loading one means taking the same norm: this is it, kept
    apart so that the quirk has one home. Conv kernels are small, so it is formed densely, as
    PEFT does.

    Returns:
        ``(out, in / groups, *k)``, unscaled.
    """
    acc = torch.promote_types(lora_A.dtype, torch.float32)
    r = lora_A.shape[0]
    return (lora_B.to(acc).reshape(-1, r) @ lora_A.to(acc).reshape(r, -1)).reshape(weight_shape)


def dora_rescale(out: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None,
                 slices: Spans) -> torch.Tensor:
    """``out[..., rows] = gain * (out[..., rows] - b) + b`` on the adapted rows, in place.

    ``out`` is the LoRA layer's output ``x W^T + b + s h B^T`` ``(..., out)``; ``gain`` is
    ``m / ||W + s B A||`` ``(sum of slice sizes,)`` and carries the gradient to ``m``. Other rows are
    returned untouched, so a fused layer's unadapted slices are exactly the base layer's output.
    In place when nothing needs a gradient; a new tensor otherwise.
    Saves the adapted rows of ``out`` for ``m``'s gradient: one ``(..., sum of slice sizes)``
    activation in ``out``'s dtype.
    """
    slices = tuple((int(s), int(n)) for s, n in slices)
    if torch.is_grad_enabled() and (out.requires_grad or gain.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _DoraRescale.apply(out, gain, bias, slices)
    _rescale_(out, gain, bias, slices)
    return out


def dora_rescale_channels(out: torch.Tensor, gain: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`dora_rescale` of a channels-first output ``(N, C, *spatial)`` (a convolution's), every
    channel adapted: ``gain`` and ``bias`` are ``(C,)``."""
    rows = ((0, out.shape[1]),)
    return dora_rescale(out.movedim(1, -1), gain, bias, rows).movedim(-1, 1)


def _views(t: torch.Tensor, slices: tuple) -> list[torch.Tensor]:
    return [t.narrow(-1, s, n) for s, n in slices]


def _rescale_(out: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None,
              slices: tuple) -> None:
    offset = 0
    for (start, size), view in zip(slices, _views(out, slices)):
        g = gain[offset:offset + size]
        offset += size
        if bias is None:
            view.mul_(g)  # computed in g's dtype (fp32 over a 16-bit output), rounded once
        else:
            b = bias[start:start + size].to(g.dtype)
            view.copy_((view.to(g.dtype) - b).mul_(g).add_(b))


class _DoraRescale(torch.autograd.Function):
    """:func:`dora_rescale` with its gradients: ``d out`` scaled by ``gain`` on the adapted rows,
    ``d gain = sum (dy * (out - b))`` over tokens, and the bias's direct share ``(1 - gain) * dy``."""

    @staticmethod
    def forward(ctx, out, gain, bias, slices):
        # Out of place (the LoRA output may be a view autograd will not let us write into). The
        # adapted rows before scaling are saved: the input itself when every row is adapted,
        # else a (..., sum sizes) copy of them.
        whole = len(slices) == 1 and slices[0][1] == out.shape[-1]
        kept = out if whole else torch.cat(_views(out, slices), dim=-1)
        if whole and bias is None and out.dtype == gain.dtype:
            result = out * gain  # one pass, where a copy and an in-place rescale would take two
        else:
            result = out.clone()
            _rescale_(result, gain, bias, slices)
        ctx.save_for_backward(kept, gain, bias)
        ctx.slices = slices
        return result

    @staticmethod
    def backward(ctx, dy):
        kept, gain, bias = ctx.saved_tensors
        slices = ctx.slices
        need_out, need_gain, need_bias = ctx.needs_input_grad[:3]
        whole = len(slices) == 1 and slices[0][1] == dy.shape[-1]
        d_out = None
        if need_out:
            d_out = torch.empty_like(dy) if whole else dy.clone()
        d_gain = torch.empty_like(gain) if need_gain else None
        d_bias = torch.zeros_like(bias) if need_bias else None
        acc = gain.dtype
        offset = 0
        dys, keeps = _views(dy, slices), torch.split(kept, [n for _, n in slices], dim=-1)
        for (start, size), dy_i, kept_i in zip(slices, dys, keeps):
            g = gain[offset:offset + size]
            if need_out:
                torch.mul(dy_i, g, out=d_out.narrow(-1, start, size)) if d_out.dtype == acc else \
                    d_out.narrow(-1, start, size).copy_(dy_i.to(acc) * g)
            dy2 = dy_i.reshape(-1, size).to(acc)
            if need_gain:
                z = kept_i.reshape(-1, size).to(acc)
                if bias is not None:
                    z = z - bias[start:start + size].to(acc)
                d_gain[offset:offset + size] = (dy2 * z).sum(0)
            if need_bias:
                d_bias[start:start + size] = ((1 - g) * dy2.sum(0)).to(bias.dtype)
            offset += size
        return d_out, d_gain, d_bias, None
