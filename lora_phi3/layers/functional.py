"""Fused LoRA linear: one autograd node that keeps as little as possible for backward.

The plain autograd path for ``y = x @ W.T + b + scaling * dropout(x) @ A.T @ B.T`` keeps, per
layer, the input ``x`` cast to the adapter's dtype, the dropout's fp32 noise tensor (CPU) or bool
mask (CUDA), the dropped-out copy ``dropout(x)``, and the rank-``r`` intermediate: up to three
input-sized tensors on top of what the frozen layer keeps (nothing but its weight). This module's
:class:`LoRALinearFunction` keeps instead

- ``x`` itself, in its own dtype (it is usually kept by a neighbouring op already, so it costs
  nothing once storages are shared);
- the dropout mask bit-packed, 1 bit per element (1/32 of an fp32 ``x``); the dropped-out copy is
  rebuilt in backward from ``x`` and the mask;
- the rank-``r`` intermediate ``dropout(x) @ A.T``, ``(..., r·k)``.

With :func:`enable_input_recompute` it can also skip ``x`` when ``x`` is cheap to rebuild from
tensors autograd keeps anyway: an RMSNorm/LayerNorm output (rebuilt from the norm's input) or
Phi-3's ``up * silu(gate)`` (rebuilt from the ``gate_up_proj`` output). See docs/performance.md.

The same function serves ``Linear`` (one slice covering all outputs) and ``MergedLinear`` (one
slice per enabled block of a fused projection).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

__all__ = ["lora_linear", "LoRALinearFunction", "pack_mask", "unpack_mask",
           "register_recompute_source", "enable_input_recompute"]


# -- dropout mask bit-packing ----------------------------------------------------------------------
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Small constant tensors (the 8 bit shifts, a 0-dim zero), cached per device and dtype in
    eager mode to spare an allocation per call; built in place under torch.compile."""
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
    return _constant("shifts", device, torch.uint8)


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


# -- input recompute registry ----------------------------------------------------------------------
class _Source(NamedTuple):
    out: weakref.ref            # the tensor a LoRA layer may receive
    version: int                # its version counter when registered
    fn: Callable[..., torch.Tensor]
    args: tuple                 # weakrefs to fn's tensor arguments
    versions: tuple             # their version counters when registered


# Keyed by id(); entries are checked with `is` (ids are reused) and drop out when the tensor dies.
_SOURCES: dict[int, _Source] = {}
# gate_up outputs keyed by id(their grad_fn) (alive as long as the output), for the SwiGLU pattern.
_GATE_SOURCES: dict[int, tuple[weakref.ref, int]] = {}


def _forget(table: dict, key: int) -> Callable[[Any], None]:
    def callback(_ref: Any) -> None:
        entry = table.get(key)
        if entry is not None and entry[0]() is None:
            del table[key]
    return callback


def register_recompute_source(output: torch.Tensor, fn: Callable[..., torch.Tensor],
                              *args: torch.Tensor) -> None:
    """Declare that ``output`` equals ``fn(*args)`` bit for bit.

    A LoRA layer that later receives exactly this tensor object (unmodified, with ``args``
    unmodified) saves ``args`` for backward instead of ``output`` and rebuilds ``output`` with
    ``fn`` under ``no_grad``. Only worth it when ``args`` are kept by autograd anyway. Nothing is
    held strongly: entries vanish with ``output``.

    Args:
        output: the tensor to be rebuilt.
        fn: a deterministic function, e.g. a norm module's ``forward``.
        *args: its tensor arguments.
    """
    key = id(output)
    _SOURCES[key] = _Source(weakref.ref(output, _forget(_SOURCES, key)), output._version, fn,
                            tuple(weakref.ref(a) for a in args), tuple(a._version for a in args))


def _register_gate_source(output: torch.Tensor) -> None:
    node = output.grad_fn
    if node is None:
        return
    key = id(node)
    _GATE_SOURCES[key] = (weakref.ref(output, _forget(_GATE_SOURCES, key)), output._version)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    # Mirrors transformers' Phi3MLP: gate, up = chunk(2); up * silu(gate). Multiplication is
    # commutative in IEEE arithmetic, so the operand order does not change a bit.
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def _match_swiglu(x: torch.Tensor) -> tuple | None:
    """``(fn, (gate_up,))`` if autograd's graph proves ``x == up * silu(gate)`` for a registered
    ``gate_up`` split in two halves along the last dim, else None."""
    mul = x.grad_fn
    if mul is None or type(mul).__name__ != "MulBackward0":
        return None
    nexts = mul.next_functions
    if len(nexts) != 2:
        return None
    act = next((n for n, i in nexts if n is not None and type(n).__name__ == "SiluBackward0"
                and i == 0), None)
    split = next((n for n, i in nexts if n is not None and type(n).__name__ == "SplitBackward0"
                  and i == 1), None)
    if act is None or split is None or act.next_functions[0] != (split, 0):
        return None
    entry = _GATE_SOURCES.get(id(split.next_functions[0][0]))
    if entry is None:
        return None
    gate_up = entry[0]()
    if gate_up is None or gate_up.grad_fn is not split.next_functions[0][0] \
            or gate_up._version != entry[1]:  # e.g. an in-place SiLU changed it
        return None
    half = gate_up.shape[-1] // 2
    dim = split._saved_dim
    dim = dim - 2**64 if dim >= 2**63 else dim  # autograd reports -1 as an unsigned 64-bit int
    if (dim not in (-1, gate_up.dim() - 1) or split._saved_split_size != half
            or gate_up.shape[-1] != 2 * half or x.shape != gate_up.shape[:-1] + (half,)
            or x.dtype != gate_up.dtype):
        return None
    return _swiglu, (gate_up,)


def _find_recipe(x: torch.Tensor) -> tuple | None:
    """How to rebuild ``x`` from tensors autograd keeps anyway, or None."""
    entry = _SOURCES.get(id(x))
    if entry is not None and entry.out() is x and x._version == entry.version:
        args = tuple(r() for r in entry.args)
        if all(a is not None for a in args) and \
                tuple(a._version for a in args) == entry.versions:
            return entry.fn, args
    if _GATE_SOURCES:
        return _match_swiglu(x)
    return None


class _ForwardOf:
    """``module.forward(x)`` under the autocast state of the original call (backward runs without
    autocast, and e.g. LayerNorm's output dtype depends on it). The module's own parameters ride
    along as ignored arguments so that autograd's version checks on saved tensors cover them too."""

    def __init__(self, module: nn.Module, device_type: str) -> None:
        self.module = module
        self.device_type = device_type
        self.autocast = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.autocast):
            return self.module.forward(x)


def _norm_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    if isinstance(output, torch.Tensor) and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
        register_recompute_source(output, _ForwardOf(module, output.device.type), inputs[0],
                                  *module.parameters(recurse=False))


def _gate_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    if isinstance(output, torch.Tensor):
        _register_gate_source(output)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def enable_input_recompute(model: nn.Module) -> list:
    """Let the LoRA layers of ``model`` rebuild cheap inputs in backward instead of saving them.

    Hooks every norm module (``nn.LayerNorm``, ``nn.RMSNorm`` and classes named ``*RMSNorm``, e.g.
    Phi-3's) so that a LoRA layer fed by its output keeps the norm's input (which the norm keeps
    already) rather than the output; and every ``gate_up_proj`` so that a LoRA ``down_proj`` fed
    ``up * silu(gate)`` keeps the ``gate_up`` output (kept already by SiLU and the product). Each
    match is verified at run time (tensor identity and version counters; for SwiGLU the autograd
    graph), otherwise the layer simply saves its input. Skipped under ``torch.compile``.

    Args:
        model: any module; norms and ``gate_up_proj`` modules are found by type and name.

    Returns:
        The hook handles (call ``.remove()`` on each to undo).
    """
    handles = []
    for name, module in model.named_modules():
        if _is_norm(module):
            handles.append(module.register_forward_hook(_norm_hook))
        elif name.split(".")[-1] == "gate_up_proj":
            handles.append(module.register_forward_hook(_gate_hook))
    logger.info("input recompute enabled on %d modules", len(handles))
    return handles


# -- the fused function ----------------------------------------------------------------------------
def _scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * a @ b`` as one GEMM (``beta=0`` ignores the dummy 0-dim input)."""
    return torch.addmm(_constant("zero", a.device, a.dtype), a, b, beta=0, alpha=alpha, out=out)


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
    ``bias``, ``A`` and ``B`` as needed. Use through :func:`lora_linear`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices, recipe_fn,
                *recipe_args):
        result, h, packed = _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices,
                                     keep_mask=True)
        if recipe_fn is None:
            ctx.save_for_backward(weight, lora_A, lora_B, h, packed, x)
        else:
            ctx.save_for_backward(weight, lora_A, lora_B, h, packed, *recipe_args)
        ctx.meta = (scaling, dropout_p, slices, recipe_fn, x.shape, x.dtype)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        scaling, p, slices, recipe_fn, x_shape, x_dtype = ctx.meta
        weight, lora_A, lora_B, h, packed, *rest = ctx.saved_tensors
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
            if g.dtype == dy.dtype == weight.dtype:
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
    single = len(slices) == 1 and slices[0][1] == out_f and x.dtype == weight.dtype == ct \
        and not autocast
    result = None if single else F.linear(x, weight, bias)  # (..., out), contiguous
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
    b0 = 0
    for i, (start, size) in enumerate(slices):
        h_i, B_i = h[:, i * r:(i + 1) * r], lora_B[b0:b0 + size]
        dst = out2.narrow(1, start, size)
        if out2.dtype == h.dtype == lora_B.dtype:
            dst.addmm_(h_i, B_i.t(), alpha=scaling)
        else:
            dst.add_(_scaled_mm(h_i, B_i.t(), scaling).to(dst.dtype))
        b0 += size


def _lora_out_grads(dy: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    slices: tuple, r: int, need_b: bool,
                    dh_alpha: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dh.T, grad_B)``: ``dh.T`` ``(r*k, N)`` stacks ``dh_alpha * B_i.T @ dy_i.T`` and ``grad_B``
    ``(sum sizes, r)`` stacks ``scaling * dy_i.T @ h_i``; one (batched) GEMM each when possible."""
    k, n = len(slices), dy.shape[0]
    zero = _constant("zero", dy.device, dy.dtype)
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
    b0 = 0
    for i, (start, size) in enumerate(slices):
        dy_i = dy if size == dy.shape[1] else dy.narrow(1, start, size)
        _scaled_mm(lora_B[b0:b0 + size].t(), dy_i.t(), dh_alpha, out=dhT[i * r:(i + 1) * r])
        if need_b:
            _scaled_mm(dy_i.t(), h[:, i * r:(i + 1) * r], scaling, out=grad_b[b0:b0 + size])
        b0 += size
    return dhT, grad_b


def _lora_linear_plain(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices):
    """The same computation in ordinary autograd ops (the reference; also the fallback)."""
    result = F.linear(x, weight, bias)
    xa = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
    if dropout_p > 0.0:
        xa = F.dropout(xa, dropout_p, True)
    h = F.linear(xa, lora_A) * scaling
    r, b0, outs = lora_A.shape[0] // len(slices), 0, []
    for i, (start, size) in enumerate(slices):
        outs.append((start, size, F.linear(h[..., i * r:(i + 1) * r], lora_B[b0:b0 + size])))
        b0 += size
    if len(outs) == 1 and outs[0][1] == result.shape[-1]:
        return result + outs[0][2].to(result.dtype)
    for start, size, o in outs:
        result.narrow(-1, start, size).add_(o.to(result.dtype))  # F.linear keeps no output
    return result


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
        return _lora_linear_plain(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices)
    return _apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), slices)


def _apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
           lora_B: torch.Tensor, scaling: float, dropout_p: float,
           slices: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """:func:`lora_linear`'s fused path without the argument checks (the layers call this)."""
    if not torch.is_grad_enabled() or not (
            x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
            or weight.requires_grad or (bias is not None and bias.requires_grad)):
        # Nothing to differentiate (inference, generation): skip the autograd node.
        return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices,
                        keep_mask=False)[0]
    if (_SOURCES or _GATE_SOURCES) and not torch.compiler.is_compiling():
        found = _find_recipe(x)
        if found is not None:
            return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                            slices, found[0], *found[1])
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, slices,
                                    None)
