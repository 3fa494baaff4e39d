"""Input recompute: LoRA layers rebuild cheap inputs in backward instead of saving them.

The fused LoRA linear (:mod:`~lora_phi3.layers.lora_function`) saves its input ``x`` for the
gradients of ``A``. When ``x`` is an RMSNorm/LayerNorm output, or Phi-3's ``up * silu(gate)``,
autograd keeps the tensors it was computed from anyway (the norm's input, the ``gate_up_proj``
output), so the layer can keep those instead and rebuild ``x`` bit for bit in backward.
:func:`enable_input_recompute` installs the forward hooks that register such sources; each match
is verified at run time (tensor identity and version counters). See docs/performance.md.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["register_recompute_source", "find_recompute_recipe", "enable_input_recompute"]


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


def find_recompute_recipe(x: torch.Tensor) -> tuple | None:
    """``(fn, args)`` rebuilding ``x`` bit for bit from tensors autograd keeps anyway, or None.

    Cheap when nothing is registered (no hooks installed): two dict checks."""
    if not (_SOURCES or _GATE_SOURCES):
        return None
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
        The handles of the hooks this call added (call ``.remove()`` on each to undo); modules it
        had hooked already are skipped, so calling it twice is harmless.
    """
    handles = []
    for name, module in model.named_modules():
        hook = _norm_hook if _is_norm(module) else \
            _gate_hook if name.split(".")[-1] == "gate_up_proj" else None
        # A second call (or inject_lora's default after a manual call) adds nothing twice.
        if hook is not None and not any(h is hook for h in module._forward_hooks.values()):
            handles.append(module.register_forward_hook(hook))
    logger.info("input recompute enabled on %d modules", len(handles))
    return handles
