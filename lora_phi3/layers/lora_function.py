"""The one LoRA computation of every linear-like layer: ``x @ W.T + b + scaling * dropout(x) @ A.T @ B.T``.

``Linear``, ``MergedLinear`` and their 4-bit forms all call :func:`apply_lora_linear`; only the
slices differ (one slice covering all outputs for ``Linear``, one per enabled block of a fused
projection for ``MergedLinear``, see :mod:`~lora_phi3.layers.slices`). The forward stays in
rank-``r`` space and never builds the dense ``(out, in)`` delta. Two ways to run it:

- fused, :class:`LoRALinearFunction`: one autograd node over a dense frozen weight that keeps, for
  backward, ``x`` itself (or, with :func:`~lora_phi3.layers.enable_input_recompute`, the tensors
  it is rebuilt from), the dropout mask bit-packed (1 bit per element instead of the dropped-out
  copy) and the rank-``r`` intermediate ``dropout(x) @ A.T``;
- plain autograd ops: the reference, and the path for a custom ``lora_dropout`` module.

The base ``W`` is whatever the layer's frozen weight is: a dense ``(out, in)`` tensor, or a frozen
object with ``matmul(x, bias) -> (..., out)`` and ``input_grad(dy) -> dy @ W`` (e.g.
:class:`~lora_phi3.quant.NF4Weight`, which dequantises slab by slab and never trains).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dropout_mask import cached_constant, pack_mask, unpack_mask
from .recompute import find_recompute_recipe
from .slices import iter_slices

__all__ = ["lora_linear", "apply_lora_linear", "base_linear", "fused_dropout_p", "LoRALinearFunction"]

Spans = tuple[tuple[int, int], ...]


def base_linear(x: torch.Tensor, base, bias: torch.Tensor | None) -> torch.Tensor:
    """The frozen layer alone, ``x @ W.T + b``: ``(..., in) -> (..., out)``.

    ``base`` is a dense ``(out, in)`` tensor or an object with ``matmul(x, bias)`` (a quantized base).
    """
    if isinstance(base, torch.Tensor):
        return F.linear(x, base, bias)
    return base.matmul(x, bias)


def fused_dropout_p(dropout: nn.Module) -> float | None:
    """The dropout probability the fused path applies now (0 in eval mode), or None for a custom
    module the fused path does not know (then the plain path runs that module)."""
    if type(dropout) is nn.Identity:
        return 0.0
    if type(dropout) is nn.Dropout:
        return dropout.p if dropout.training else 0.0
    return None


def apply_lora_linear(x: torch.Tensor, base, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float, dropout: nn.Module,
                      slices: Spans) -> torch.Tensor:
    """The layers' entry to the one LoRA computation (no argument checks; see :func:`lora_linear`).

    Args:
        x: ``(..., in)``.
        base: the frozen weight, dense ``(out, in)`` (a transposed view for ``fan_in_fan_out``), or
            an object with ``matmul(x, bias)``.
        bias: ``(out,)`` or None.
        lora_A: ``(r * k, in)``; lora_B: ``(sum of slice sizes, r)``.
        scaling: ``lora_alpha / r``.
        dropout: the layer's ``lora_dropout`` module.
        slices: ``(start, size)`` of each of the ``k`` adapted output slices.

    Returns:
        ``(..., out)``.
    """
    p = fused_dropout_p(dropout)
    if p is None:
        return _plain(x, base, bias, lora_A, lora_B, scaling, dropout, slices)
    return _fused(x, base, bias, lora_A, lora_B, float(scaling), p, slices)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, slices: Sequence[tuple[int, int]] | None = None,
                fused: bool = True) -> torch.Tensor:
    """LoRA linear ``x @ W.T + b + scaling * dropout(x) @ A.T @ B.T``, optionally per output slice.

    Args:
        x: input ``(..., in)``, in the base dtype.
        weight: the frozen weight ``(out, in)`` (a transposed view for ``fan_in_fan_out``).
        bias: ``(out,)`` or None.
        lora_A: ``(r * k, in)``, the stacked ``A`` of the ``k`` slices.
        lora_B: ``(sum of slice sizes, r)``.
        scaling: ``lora_alpha / r``.
        dropout_p: dropout probability on the adapter input; pass 0 in eval mode.
        slices: ``(start, size)`` of each adapted block of the output; default the whole output.
        fused: False runs the plain autograd path (more saved memory; the reference).

    Returns:
        ``(..., out)`` in the base dtype.

    Raises:
        ValueError: if the shapes of ``A``, ``B`` and ``slices`` disagree, or ``dropout_p`` is
            outside [0, 1).
    """
    out_f = weight.shape[0]
    if slices is None:
        slices = ((0, out_f),)
    slices = tuple((int(s), int(n)) for s, n in slices)
    if not slices or lora_A.shape[0] % len(slices) or lora_B.shape[0] != sum(n for _, n in slices) \
            or lora_A.shape[1] != x.shape[-1] or lora_B.shape[1] != lora_A.shape[0] // len(slices) \
            or any(s < 0 or n <= 0 or s + n > out_f for s, n in slices):
        raise ValueError(f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)} and "
                         f"slices={slices} do not fit x (..., {x.shape[-1]}) -> (..., {out_f})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if not fused:
        dropout = functools.partial(F.dropout, p=dropout_p, training=True) if dropout_p > 0 \
            else _identity
        return _plain(x, weight, bias, lora_A, lora_B, scaling, dropout, slices)
    return _fused(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), slices)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# -- the plain path --------------------------------------------------------------------------------
def _plain(x, base, bias, lora_A, lora_B, scaling, dropout: Callable[[torch.Tensor], torch.Tensor],
           slices: Spans) -> torch.Tensor:
    """The computation in ordinary autograd ops (the reference; also the general fallback)."""
    result = base_linear(x, base, bias)  # (..., out)
    xa = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)  # fp32 adapter over a 16-bit base
    h = F.linear(dropout(xa), lora_A) * scaling  # (..., r*k)
    r = lora_A.shape[0] // len(slices)
    if len(slices) == 1 and slices[0][1] == result.shape[-1]:
        return result + F.linear(h, lora_B).to(result.dtype)
    for s in iter_slices(slices, r):
        out_i = F.linear(h[..., s.a_rows], lora_B[s.b_rows])  # (..., size_i)
        # in place into the slice: the base product keeps no output for its backward
        result.narrow(-1, s.start, s.size).add_(out_i.to(result.dtype))
    return result


# -- the fused path --------------------------------------------------------------------------------
def _fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
           lora_B: torch.Tensor, scaling: float, dropout_p: float, slices: Spans) -> torch.Tensor:
    if not torch.is_grad_enabled() or not (
            x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
            or (isinstance(weight, torch.Tensor) and weight.requires_grad)
            or (bias is not None and bias.requires_grad)):
        # Nothing to differentiate (inference, generation): skip the autograd node.
        return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices,
                        keep_mask=False)[0]
    if not torch.compiler.is_compiling():
        found = find_recompute_recipe(x)
        if found is not None:
            return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                            slices, found[0], *found[1])
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices,
                                    None)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * a @ b`` as one GEMM (``beta=0`` ignores the dummy 0-dim input)."""
    return torch.addmm(cached_constant("zero", a.device, a.dtype), a, b, beta=0, alpha=alpha, out=out)


def _batched(t2: torch.Tensor, slices: tuple) -> torch.Tensor | None:
    """A ``(k, N, size)`` view of the ``k`` column slices of ``t2`` ``(N, out)`` when they are
    equal and evenly spaced (q,k,v of Phi-3-mini, gate/up), so each step is one batched GEMM
    instead of ``k`` GEMMs; None otherwise."""
    k = len(slices)
    if k < 2 or not t2.is_contiguous():
        return None
    (start0, size), step = slices[0], slices[1][0] - slices[0][0]
    if any(n != size for _, n in slices) or step <= 0 \
            or any(slices[i][0] - slices[i - 1][0] != step for i in range(2, k)) \
            or t2.shape[1] % size or start0 % size or step % size:
        return None
    blocks = t2.view(t2.shape[0], t2.shape[1] // size, size)
    return blocks[:, start0 // size::step // size][:, :k].transpose(0, 1)


class LoRALinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` plus, for each slice ``i`` of the output, ``scaling * h_i @ B_i.T`` with
    ``h = dropout(x) @ A.T`` (``A`` stacks the ``k`` slices' ``r`` rows each).

    Saves ``x`` (or the tensors a recompute recipe rebuilds it from), the bit-packed dropout mask
    and ``h``; the frozen weight and ``A``/``B`` are parameters. Gradients for ``x``, ``weight``,
    ``bias``, ``A`` and ``B`` as needed. ``weight`` is a dense ``(out, in)`` tensor or a frozen
    base object with ``matmul(x, bias)`` and ``input_grad(dy) = dy @ W`` (e.g. an NF4 weight, kept
    by reference: it is frozen storage). Use through :func:`apply_lora_linear` or :func:`lora_linear`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices, recipe_fn,
                *recipe_args):
        result, h, packed = _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices,
                                     keep_mask=True)
        dense = isinstance(weight, torch.Tensor)
        ctx.base = None if dense else weight
        saved_weight = weight if dense else None
        if recipe_fn is None:
            ctx.save_for_backward(saved_weight, lora_A, lora_B, h, packed, x)
        else:
            ctx.save_for_backward(saved_weight, lora_A, lora_B, h, packed, *recipe_args)
        ctx.meta = (scaling, dropout_p, slices, recipe_fn, x.shape, x.dtype)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        scaling, p, slices, recipe_fn, x_shape, x_dtype = ctx.meta
        weight, lora_A, lora_B, h, packed, *rest = ctx.saved_tensors
        base = ctx.base  # a frozen base that is not a dense tensor, or None
        # the input, or its bit-identical rebuild from tensors kept anyway
        x = rest[0] if recipe_fn is None else recipe_fn(*rest)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        ct = lora_A.dtype
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x_shape[-1])
        grad_x = grad_w = grad_b = grad_a = None
        if need_w:
            grad_w = torch.mm(dy.t(), x2.to(dy.dtype)).to(weight.dtype)
        if need_b:
            grad_b = dy.sum(0)
        dyl = dy if dy.dtype == ct else dy.to(ct)
        # dh carries dropout's 1/(1-p) too, so the masks below are plain 0/1 multiplies
        dhT, grad_bb = _lora_out_grads(dyl, h if h.dtype == ct else h.to(ct), lora_B, scaling,
                                       slices, lora_A.shape[0] // len(slices), need_bb,
                                       scaling / (1.0 - p))
        mask = None if packed is None else unpack_mask(packed, x2.shape)
        if need_a:
            xa = x2 if x2.dtype == ct else x2.to(ct)
            if mask is not None:  # the dropped-out input, up to the 1/(1-p) in dh
                xa = xa * mask
            grad_a = torch.mm(dhT, xa)
            del xa
        if need_x:
            g = torch.mm(dhT.t(), lora_A)  # the adapter's part, (N, in)
            if mask is not None:
                g.mul_(mask)
            if base is not None:
                grad_x = base.input_grad(dy)  # (N, in), the frozen product's part
                grad_x.add_(g.to(grad_x.dtype))
            elif g.dtype == dy.dtype == weight.dtype:
                grad_x = g.addmm_(dy, weight)  # the base GEMM accumulates into it, no add pass
            else:
                w = weight if weight.dtype == dy.dtype else weight.to(dy.dtype)
                grad_x = torch.mm(dy, w).add_(g.to(dy.dtype))
            grad_x = grad_x.view(x_shape)
            if grad_x.dtype != x_dtype:
                grad_x = grad_x.to(x_dtype)
        return (grad_x, grad_w, grad_b, grad_a, grad_bb, None, None, None, None) + \
            (None,) * (len(rest) if recipe_fn is not None else 0)


def _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices, keep_mask):
    """``(result, h, packed mask or None)``; the computation shared by training and inference."""
    ct = lora_A.dtype  # the adapter's compute dtype
    out_f = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    autocast = torch.is_autocast_enabled(x.device.type)
    # One slice over the whole output, one dtype, no autocast: the adapter's output is written
    # first and the base GEMM accumulates into it (beta=1), saving a pass over the output.
    single = len(slices) == 1 and slices[0][1] == out_f and isinstance(weight, torch.Tensor) \
        and x.dtype == weight.dtype == ct and not autocast
    result = None if single else base_linear(x, weight, bias)  # (..., out), contiguous
    xa = x2 if x2.dtype == ct else x2.to(ct)
    packed = None
    if dropout_p > 0.0:
        xa, mask = torch.native_dropout(xa, dropout_p, True)
        if keep_mask:
            packed = pack_mask(mask)  # 1 bit per element instead of the dropped-out copy
        del mask
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        # the adapter runs in its own dtype (fp32 on a bf16 base), whatever autocast would pick
        h = torch.mm(xa, lora_A.t())  # (N, r*k), the only activation the adapter adds
        del xa
        if single:
            # Allocated in the final shape, so the output is no view (hooks key on its identity).
            result = x.new_empty((*x.shape[:-1], out_f))
            out2 = result.view(-1, out_f)
            if bias is not None:
                torch.addmm(bias, h, lora_B.t(), alpha=scaling, out=out2)
            else:
                _scaled_mm(h, lora_B.t(), scaling, out=out2)
            out2.addmm_(x2, weight.t())
        else:
            _add_lora_out(result.view(-1, out_f), h, lora_B, scaling, slices,
                          lora_A.shape[0] // len(slices))
    return result, h, packed


def _add_lora_out(out2: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  slices: tuple, r: int) -> None:
    """``out2[:, slice_i] += scaling * h_i @ B_i.T`` for every slice, in place.

    In the adapter's dtype the add and the scaling happen inside the GEMM (``addmm_``/
    ``baddbmm_`` into views of the output); otherwise (bf16 base) the product is cast and added.
    """
    k, n = len(slices), out2.shape[0]
    if out2.dtype == h.dtype == lora_B.dtype:
        if k == 1 and slices[0][1] == out2.shape[1]:
            out2.addmm_(h, lora_B.t(), alpha=scaling)
            return
        dst = _batched(out2, slices)
        if dst is not None:  # (k, N, size) += (k, N, r) @ (k, r, size)
            size = slices[0][1]
            dst.baddbmm_(h.view(n, k, r).transpose(0, 1), lora_B.view(k, size, r).transpose(1, 2),
                         alpha=scaling)
            return
    for s in iter_slices(slices, r):
        h_i, B_i = h[:, s.a_rows], lora_B[s.b_rows]
        dst = out2.narrow(1, s.start, s.size)
        if out2.dtype == h.dtype == lora_B.dtype:
            dst.addmm_(h_i, B_i.t(), alpha=scaling)
        else:
            dst.add_(_scaled_mm(h_i, B_i.t(), scaling).to(dst.dtype))


def _lora_out_grads(dy: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    slices: tuple, r: int, need_b: bool,
                    dh_alpha: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dh.T, grad_B)``: ``dh.T`` ``(r*k, N)`` stacks ``dh_alpha * B_i.T @ dy_i.T`` and ``grad_B``
    ``(sum sizes, r)`` stacks ``scaling * dy_i.T @ h_i``; one (batched) GEMM each when possible."""
    k, n = len(slices), dy.shape[0]
    zero = cached_constant("zero", dy.device, dy.dtype)
    if k == 1:
        start, size = slices[0]
        dy_i = dy if size == dy.shape[1] else dy.narrow(1, start, size)
        dhT = torch.addmm(zero, lora_B.t(), dy_i.t(), beta=0, alpha=dh_alpha)
        return dhT, torch.addmm(zero, dy_i.t(), h, beta=0, alpha=scaling) if need_b else None
    dhT = dy.new_empty((r * k, n))
    grad_b = dy.new_empty(lora_B.shape) if need_b else None
    dy3 = _batched(dy, slices)
    if dy3 is not None:
        size = slices[0][1]
        dy3t = dy3.transpose(1, 2)  # (k, size, N)
        torch.baddbmm(zero, lora_B.view(k, size, r).transpose(1, 2), dy3t, beta=0, alpha=dh_alpha,
                      out=dhT.view(k, r, n))
        if need_b:
            torch.baddbmm(zero, dy3t, h.view(n, k, r).transpose(0, 1), beta=0, alpha=scaling,
                          out=grad_b.view(k, size, r))
        return dhT, grad_b
    for s in iter_slices(slices, r):
        dy_i = dy if s.size == dy.shape[1] else dy.narrow(1, s.start, s.size)
        _scaled_mm(lora_B[s.b_rows].t(), dy_i.t(), dh_alpha, out=dhT[s.a_rows])
        if need_b:
            _scaled_mm(dy_i.t(), h[:, s.a_rows], scaling, out=grad_b[s.b_rows])
    return dhT, grad_b


