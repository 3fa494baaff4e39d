"""``NF4Weight``: a frozen ``(out_features, in_features)`` weight stored in 4-bit NF4, as a module.

It is the base of a 4-bit LoRA layer: :class:`~lora_phi3.layers.Linear` and
:class:`~lora_phi3.layers.MergedLinear` hold it as ``quantized_weight`` (their ``weight`` is then
None) and multiply through :meth:`NF4Weight.matmul`. The codes and scales are its buffers
(``codes``, ``absmax``, ``absmax_scale``, ``absmax_offset``), so ``module.to(device)`` moves them;
``module.to(dtype)`` never casts them and changes only the compute dtype (see :meth:`_apply`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .nf4 import NF4_FLOAT_DTYPES, NF4Tensor, nf4_empty, nf4_quantize
from .nf4_linear import nf4_input_grad, nf4_matmul

logger = logging.getLogger(__name__)

__all__ = ["NF4Weight", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 64  # QLoRA's block size; it must divide every quantised layer's in_features
_FIELDS = ("codes", "absmax", "absmax_scale", "absmax_offset")


class NF4Weight(nn.Module):
    """A frozen 2-D weight as NF4 codes and block scales; never a Parameter, never trained.

    Attributes:
        shape: ``(out_features, in_features)``.
        dtype: the dense weight's original dtype.
        block_size: elements per quantisation block.
        compute_dtype: the dtype products and :meth:`dequantize` run in.
    """

    def __init__(self, q: NF4Tensor) -> None:
        super().__init__()
        if not isinstance(q, NF4Tensor):
            raise TypeError(f"NF4Weight needs an NF4Tensor, got {type(q).__name__}")
        if len(q.shape) != 2:
            raise ValueError(f"NF4Weight needs a 2-D NF4Tensor (out_features, in_features), "
                             f"got shape {tuple(q.shape)}")
        self._set(q)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE,
                    double_quant: bool = True) -> "NF4Weight":
        """Quantise a dense ``(out, in)`` weight (uninitialised storage for a meta tensor).

        Raises:
            TypeError: ``weight`` is not a float tensor. ValueError: not 2-D, or a bad ``block_size``.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"a quantized LoRA layer needs a weight tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"a quantized LoRA layer needs a 2-D weight, got shape {tuple(weight.shape)}")
        if weight.is_meta:
            return cls(nf4_empty(weight.shape, weight.dtype, block_size, double_quant, device="meta"))
        return cls(nf4_quantize(weight.detach(), block_size, double_quant))

    def _set(self, q: NF4Tensor) -> None:
        as_params = self.__dict__.get("_storage_as_parameters", False)
        for field, tensor in zip(_FIELDS, q.storage()):
            self._buffers.pop(field, None)
            self._parameters.pop(field, None)
            if as_params and tensor is not None:
                self._parameters[field] = nn.Parameter(tensor.reshape(-1), requires_grad=False)
            else:
                self._buffers[field] = tensor  # None for the unused double-quant fields
        self.shape, self.dtype, self.block_size = tuple(q.shape), q.dtype, q.block_size
        self.compute_dtype = q.compute_dtype

    def _field(self, name: str) -> torch.Tensor | None:
        """A storage tensor, wherever it is registered (a buffer, or a frozen parameter)."""
        value = self._parameters.get(name)
        if value is None:
            return self._buffers.get(name)
        return value.reshape(()) if name == "absmax_offset" else value  # 1-D as a parameter

    def storage_as_parameters(self) -> None:
        """Register the 4-bit storage as frozen ``nn.Parameter`` s instead of buffers (same
        state-dict keys), so that FSDP2, which shards parameters only, shards it too
        (``lora_phi3.finetune.distributed.wrap_model`` calls this before ``fully_shard``). The
        0-dim ``absmax_offset`` becomes 1-D, as ``fully_shard`` requires; reads undo it."""
        if self.__dict__.get("_storage_as_parameters", False):
            return
        self.__dict__["_storage_as_parameters"] = True
        for field in _FIELDS:
            tensor = self._buffers.pop(field, None)
            if tensor is not None:
                self._parameters[field] = nn.Parameter(tensor.reshape(-1), requires_grad=False)
            else:
                self._buffers[field] = None

    @property
    def device(self) -> torch.device:
        return self._field("codes").device

    @property
    def double_quant(self) -> bool:
        return self._field("absmax_scale") is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the 4-bit storage (codes and scales)."""
        return self.nf4_tensor().nbytes

    def nf4_tensor(self) -> NF4Tensor:
        """The weight as an :class:`NF4Tensor` sharing this module's buffers."""
        return NF4Tensor(*(self._field(f) for f in _FIELDS), torch.Size(self.shape), self.dtype,
                         self.block_size, self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default ``compute_dtype``)."""
        return self.nf4_tensor().dequantize(dtype or self.compute_dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ dequant(W).T + bias``: ``(..., in) -> (..., out)`` in ``compute_dtype``, saving only
        the 4-bit storage for backward (:func:`~lora_phi3.quant.nf4_linear.nf4_matmul`)."""
        return nf4_matmul(x, self.nf4_tensor(), bias)

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """``grad_out @ dequant(W)``: ``(..., out) -> (..., in)`` in ``compute_dtype``, slab by slab
        (the fused LoRA backward's base term)."""
        return nf4_input_grad(grad_out, self.nf4_tensor())

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` ``(out, in)`` into this storage, keeping block size and double quant."""
        q = nf4_quantize(weight, self.block_size, self.double_quant, compute_dtype=self.compute_dtype)
        self._set(q)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(dtype) casts every float buffer: keep the fp32 scales (and uint8 codes)
        # exactly as stored, and let a float cast change only the compute dtype. Device moves
        # (and to_empty) apply to the storage as usual.
        for name in _FIELDS:
            store = self._parameters if self._parameters.get(name) is not None else self._buffers
            tensor = store.get(name)
            if tensor is not None:
                moved = fn(tensor)
                kept = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
                if store is self._parameters and not isinstance(kept, nn.Parameter):
                    kept = nn.Parameter(kept, requires_grad=False)
                store[name] = kept
        device = self.device
        half = fn(torch.empty(0, dtype=torch.float16, device=device)).dtype
        brain = fn(torch.empty(0, dtype=torch.bfloat16, device=device)).dtype
        cast = half if half != torch.float16 else brain if brain != torch.bfloat16 else None
        if cast in NF4_FLOAT_DTYPES:
            self.compute_dtype = cast
        elif cast is not None:
            logger.warning("NF4Weight: compute dtype stays %s (NF4 computes in %s only, not %s)",
                           self.compute_dtype, list(NF4_FLOAT_DTYPES), cast)
        return self

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, block_size={self.block_size}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")
