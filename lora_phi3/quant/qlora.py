"""QLoRA: LoRA layers over a frozen base weight stored in 4-bit NF4 (Dettmers et al. 2023).

:class:`Linear4bit` and :class:`MergedLinear4bit` are :class:`~lora_phi3.layers.Linear` and
:class:`~lora_phi3.layers.MergedLinear` (same adapter parameters, shapes, ``delta_weight`` and
state-dict keys) whose frozen ``weight`` lives as NF4 buffers instead of a dense Parameter:

- the base product runs through :func:`~lora_phi3.nf4.nf4_matmul`, which dequantises in the
  layer's ``compute_dtype`` and keeps only the 4-bit storage for backward; the base never gets a
  gradient;
- ``module.to(device)`` moves the 4-bit storage, ``module.to(dtype)`` changes only the compute
  dtype (codes and fp32 scales are never cast, see :meth:`_NF4Mixin._apply`);
- ``weight`` is a read-only property giving the dequantised weight; it is not a Parameter.

Merging: ``merge()`` never rounds the update into 4 bits. It stores a dense merged weight
``dequant(W) + delta`` in the compute dtype (this layer then costs dense memory), and ``unmerge()``
drops it again, back to the untouched 4-bit base. So ``merge_lora``, ``disable_lora`` and
``merge_and_unload`` work as on dense layers; :func:`dequantize_and_merge` does the latter one
layer at a time, freeing each 4-bit copy as it goes.

Importing this module registers the layers for ``LoraConfig(quantize_base="nf4")``, and
:func:`load_quantized_model` builds a QLoRA model from a bf16 checkpoint, quantising one tensor
at a time as it is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inject import factory
from ..inject import injector as inject
from ..inject.matching import is_hf_conv1d
from ..config import LoraConfig
from ..layers.lora_layers import Linear, LoRALayer, MergedLinear
from .nf4 import _FLOAT_DTYPES, NF4Tensor, nf4_empty, nf4_matmul, nf4_quantize

logger = logging.getLogger(__name__)

__all__ = ["Linear4bit", "MergedLinear4bit", "nf4_lora_factory", "quantized_lora_layers",
           "dequantize_and_merge", "load_quantized_model", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 64  # QLoRA's block size; it must divide every quantised layer's in_features
_NF4_FIELDS = ("codes", "absmax", "absmax_scale", "absmax_offset")
_PREFIX = "weight_nf4_"  # buffer names: weight_nf4_codes, ... (never "lora_": adapters skip them)


class _NF4Mixin:
    """The base-weight side of a quantized LoRA layer; put before the LoRA class in the bases."""

    compute_dtype: torch.dtype

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def _build(cls, q: NF4Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool) -> Any:
        if not isinstance(q, NF4Tensor):
            raise TypeError(f"{cls.__name__} needs an NF4Tensor, got {type(q).__name__}")
        if len(q.shape) != 2:
            raise ValueError(f"{cls.__name__} needs a 2-D NF4Tensor (out_features, in_features), "
                             f"got shape {tuple(q.shape)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = q.shape
        self.bias = bias
        self._set_nf4(q)
        self.fan_in_fan_out = fan_in_fan_out
        return self

    def _set_nf4(self, q: NF4Tensor) -> None:
        for field, tensor in zip(_NF4_FIELDS, q._tensors()):
            self._buffers[_PREFIX + field] = tensor  # None for unused double-quant fields
        self._nf4_meta = (q.shape, q.dtype, q.block_size)
        self.compute_dtype = q.compute_dtype

    @contextlib.contextmanager
    def _weight_stub(self) -> Iterator[None]:
        # LoRALayer code reads self.weight only for its dtype/device here: don't dequantise for it.
        self.__dict__["_stub"] = True
        try:
            yield
        finally:
            self.__dict__.pop("_stub", None)

    # -- the base weight -----------------------------------------------------------------------
    def nf4_weight(self) -> NF4Tensor:
        """The frozen base weight ``(out_features, in_features)`` as an :class:`NF4Tensor`."""
        shape, dtype, block_size = self._nf4_meta
        tensors = [self._buffers[_PREFIX + f] for f in _NF4_FIELDS]
        return NF4Tensor(*tensors, shape, dtype, block_size, self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dense merged weight while merged, else the dequantised base weight in
        ``compute_dtype``, in the layout of the module it replaced (``(in, out)`` for
        ``fan_in_fan_out``). Not a Parameter; a fresh tensor on every access."""
        merged = self._parameters.get("weight")
        if merged is not None:
            return merged
        codes = self._buffers[_PREFIX + "codes"]
        if self.__dict__.get("_stub"):
            return torch.empty(0, dtype=self.compute_dtype, device=codes.device)
        dense = self.nf4_weight().dequantize(self.compute_dtype)
        return dense.T if self.fan_in_fan_out else dense

    @torch.no_grad()
    def set_base_weight(self, weight: torch.Tensor, block_size: int | None = None,
                        double_quant: bool | None = None) -> None:
        """Quantise ``weight`` (the module's layout) into this layer's 4-bit storage, in place.

        Raises:
            ValueError: a shape other than the layer's, a ``block_size`` not dividing the row, or
                a merged layer (its dense merged weight would go stale).
            TypeError: a non-float ``weight``.
        """
        if self.merged:  # type: ignore[attr-defined]
            raise ValueError(f"{type(self).__name__}.set_base_weight on a merged layer; unmerge() first")
        shape, _, old_block = self._nf4_meta
        dense = weight.T if self.fan_in_fan_out else weight  # (out, in)
        if tuple(dense.shape) != tuple(shape):
            want = tuple(shape)[::-1] if self.fan_in_fan_out else tuple(shape)
            raise ValueError(f"weight must have shape {want} for this layer, got {tuple(weight.shape)}")
        double = self._buffers[_PREFIX + "absmax_scale"] is not None if double_quant is None else double_quant
        q = nf4_quantize(dense, block_size or old_block, double, compute_dtype=self.compute_dtype)
        self._set_nf4(q)

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of the 4-bit base storage (codes and scales)."""
        return self.nf4_weight().nbytes

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to(dtype) casts every float buffer: keep the fp32 scales (and uint8 codes)
        # exactly as stored, and let a float cast change only the compute dtype. Device moves
        # (and to_empty) apply to the storage as usual.
        names = [_PREFIX + f for f in _NF4_FIELDS]
        stored = {n: self._buffers.pop(n) for n in names}
        try:
            super()._apply(fn, recurse)  # type: ignore[misc]
        finally:
            self._buffers.update(stored)
        for name, tensor in stored.items():
            if tensor is not None:
                moved = fn(tensor)
                self._buffers[name] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        codes = self._buffers[_PREFIX + "codes"]
        half = fn(torch.empty(0, dtype=torch.float16, device=codes.device)).dtype
        brain = fn(torch.empty(0, dtype=torch.bfloat16, device=codes.device)).dtype
        cast = half if half != torch.float16 else brain if brain != torch.bfloat16 else None
        if cast in _FLOAT_DTYPES:
            self.compute_dtype = cast
        elif cast is not None:
            logger.warning("%s: compute dtype stays %s (NF4 computes in %s only, not %s)",
                           type(self).__name__, self.compute_dtype, list(_FLOAT_DTYPES), cast)
        return self

    def reset_parameters(self) -> None:
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()  # type: ignore[attr-defined]

    # -- LoRA --------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        with self._weight_stub():
            return super().delta_weight()  # type: ignore[misc]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Store ``dequant(W) + delta`` (fp32 sum rounded once to ``compute_dtype``) as a dense,
        frozen ``weight`` Parameter; the 4-bit base is kept so :meth:`unmerge` is exact.
        Merging into the 4-bit codes would round the update away, so it is never done.

        Raises:
            ValueError: with ``safe_merge=True``, if the merged weight would hold NaN or Inf.
        """
        if self.merged or self.r == 0:  # type: ignore[attr-defined]
            return
        merged = (self.weight.float() + self.delta_weight()).to(self.compute_dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"safe_merge refused {type(self).__name__}: the merged weight would "
                             "contain NaN or Inf; the weight is unchanged")
        self._parameters["weight"] = nn.Parameter(merged, requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Drop the dense merged weight: the layer is back on its untouched 4-bit base."""
        if not self.merged:
            return
        if self._buffers[_PREFIX + "codes"] is None:
            raise ValueError(f"{type(self).__name__} released its 4-bit base after merging "
                             "(dequantize_and_merge); it cannot unmerge")
        self._parameters.pop("weight", None)
        self.merged = False

    def release_base(self) -> None:
        """Free the 4-bit storage of a merged layer (it then holds only the dense merged weight)."""
        if not self.merged:
            raise ValueError(f"{type(self).__name__}.release_base needs a merged layer; merge() first")
        for f in _NF4_FIELDS:
            self._buffers[_PREFIX + f] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the dense merged weight, in compute_dtype
            w, b = self._base_weight(), self.bias  # type: ignore[attr-defined]
            return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))
        result = nf4_matmul(x, self.nf4_weight(), self.bias)  # (..., out) in compute_dtype
        if not self.lora_active:  # type: ignore[attr-defined]
            return result
        # The adapter in its own dtype (fp32 over a bf16 base), as in layers.Linear's plain path.
        h = F.linear(self.lora_dropout(self._cast_in(x)), self.lora_A) * self.scaling  # (..., r*k)
        slices = getattr(self, "lora_slices", [(0, self.out_features)])
        if len(slices) == 1 and slices[0][1] == self.out_features:
            return result + F.linear(h, self.lora_B).to(result.dtype)
        r, b0 = self.r, 0  # type: ignore[attr-defined]
        for i, (start, size) in enumerate(slices):
            out_i = F.linear(h[..., i * r:(i + 1) * r], self.lora_B[b0:b0 + size])  # (..., size_i)
            result.narrow(-1, start, size).add_(out_i.to(result.dtype))  # nf4_matmul keeps no output
            b0 += size
        return result

    def extra_repr(self) -> str:
        shape, _, block_size = self._nf4_meta
        double = self._buffers.get(_PREFIX + "absmax_scale") is not None
        return (f"{super().extra_repr()}, base=nf4(block_size={block_size}, "  # type: ignore[misc]
                f"double_quant={double}, compute_dtype={self.compute_dtype})")


class Linear4bit(_NF4Mixin, Linear):
    """:class:`~lora_phi3.layers.Linear` over a frozen NF4 base weight.

    ``y = x @ dequant(W).T + b + scaling * dropout(x) @ A.T @ B.T``; the first term in
    ``compute_dtype``, the adapter in ``lora_A``'s dtype, cast back. Build with :meth:`from_nf4`
    or :meth:`from_linear`.
    """

    @classmethod
    def from_nf4(cls, q: NF4Tensor, bias: torch.Tensor | None = None, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 merge_weights: bool = False, lora_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Wrap a 4-bit weight ``(out_features, in_features)`` (``bias``: ``(out_features,)``)."""
        self = cls._build(q, bias, fan_in_fan_out)
        with self._weight_stub():
            self._setup(r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, lora_dtype)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1,  # type: ignore[override]
                    lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                    merge_weights: bool = False, lora_dtype: torch.dtype | None = None,
                    block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = True) -> "Linear4bit":
        """Quantise ``linear.weight`` (shared ``bias``) and wrap it. ``merge_weights`` defaults to
        False here: merging materialises a dense weight, which ``eval()`` should not do silently."""
        q = _quantize_weight(linear.weight, fan_in_fan_out, block_size, double_quant)
        return cls.from_nf4(q, getattr(linear, "bias", None), r, lora_alpha, lora_dropout,
                            fan_in_fan_out, merge_weights, lora_dtype)


class MergedLinear4bit(_NF4Mixin, MergedLinear):
    """:class:`~lora_phi3.layers.MergedLinear` (fused projection, per-slice adapters) over a
    frozen NF4 base weight. Build with :meth:`from_nf4` or :meth:`from_linear`."""

    @classmethod
    def from_nf4(cls, q: NF4Tensor, bias: torch.Tensor | None = None, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0,
                 enable_lora: list[bool] = (False,), fan_in_fan_out: bool = False,  # type: ignore[assignment]
                 merge_weights: bool = False, split_sizes: list[int] | None = None,
                 lora_dtype: torch.dtype | None = None) -> "MergedLinear4bit":
        """Wrap a 4-bit fused weight ``(out_features, in_features)``."""
        self = cls._build(q, bias, fan_in_fan_out)
        with self._weight_stub():
            self._setup(r, lora_alpha, lora_dropout, enable_lora, fan_in_fan_out, merge_weights,
                        split_sizes, lora_dtype)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1,  # type: ignore[override]
                    lora_dropout: float = 0.0, enable_lora: list[bool] = (False,),  # type: ignore[assignment]
                    fan_in_fan_out: bool = False, merge_weights: bool = False,
                    split_sizes: list[int] | None = None, lora_dtype: torch.dtype | None = None,
                    block_size: int = DEFAULT_BLOCK_SIZE,
                    double_quant: bool = True) -> "MergedLinear4bit":
        """Quantise ``linear.weight`` (shared ``bias``) and wrap it."""
        q = _quantize_weight(linear.weight, fan_in_fan_out, block_size, double_quant)
        return cls.from_nf4(q, getattr(linear, "bias", None), r, lora_alpha, lora_dropout,
                            enable_lora, fan_in_fan_out, merge_weights, split_sizes, lora_dtype)


def _quantize_weight(weight: torch.Tensor, fan_in_fan_out: bool, block_size: int,
                     double_quant: bool) -> NF4Tensor:
    """NF4 of a layer weight as ``(out, in)``; uninitialised storage for a meta weight."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"a quantized LoRA layer needs a weight tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"a quantized LoRA layer needs a 2-D weight, got shape {tuple(weight.shape)}")
    dense = weight.detach().T if fan_in_fan_out else weight.detach()  # (out, in)
    if weight.is_meta:
        return nf4_empty(dense.shape, weight.dtype, block_size, double_quant, device="meta")
    return nf4_quantize(dense, block_size, double_quant)


# -- the injector's factory ------------------------------------------------------------------------
def nf4_lora_check(module: nn.Module, name: str) -> None:
    """Raise the factory's errors without building anything (``inject_lora`` checks every target
    first, so a refused injection leaves the model untouched).

    Raises:
        ValueError: ``module`` is not linear-like, or its row length (in_features) is not a
            multiple of the block size, naming the module.
    """
    fan_in_fan_out = is_hf_conv1d(module)
    if not (isinstance(module, nn.Linear) or fan_in_fan_out):
        raise ValueError(f"LoraConfig.quantize_base='nf4' quantizes linear layers only; {name!r} is "
                         f"{type(module).__name__}: drop it from target_modules or add it to "
                         "exclude_modules")
    shape = tuple(module.weight.shape)
    in_features = shape[0] if fan_in_fan_out else shape[1]
    if in_features % DEFAULT_BLOCK_SIZE:
        raise ValueError(f"LoraConfig.quantize_base='nf4' cannot quantize {name!r} (weight {shape}): "
                         f"its row length in_features={in_features} is not a multiple of the "
                         f"block size {DEFAULT_BLOCK_SIZE}; add it to exclude_modules")


def nf4_lora_factory(module: nn.Module, name: str, config: LoraConfig,
                     slice_spec: inject.SliceSpec | None) -> nn.Module:
    """Build the QLoRA layer replacing ``module`` for ``inject_lora`` (``quantize_base="nf4"``).

    The weight is quantised in blocks of :data:`DEFAULT_BLOCK_SIZE` with double quantisation;
    adapters are fp32 over a 16-bit base (as for dense layers). The replaced module is kept, with
    its parameters removed (so its dense weight is freed), for ``merge_and_unload``.

    Raises:
        ValueError: ``module`` is not linear-like, or its row length (in_features) is not a
            multiple of the block size, naming the module.
    """
    nf4_lora_check(module, name)
    fan_in_fan_out = is_hf_conv1d(module)
    weight = module.weight
    half = weight.dtype in (torch.float16, torch.bfloat16)
    common = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                  fan_in_fan_out=fan_in_fan_out, merge_weights=False,
                  lora_dtype=torch.float32 if half else None)
    q = _quantize_weight(weight, fan_in_fan_out, DEFAULT_BLOCK_SIZE, True)
    bias = getattr(module, "bias", None)
    if slice_spec is not None:
        new: LoRALayer = MergedLinear4bit.from_nf4(q, bias, enable_lora=slice_spec.enable_lora,
                                                   split_sizes=slice_spec.split_sizes, **common)
    else:
        new = Linear4bit.from_nf4(q, bias, **common)
    # As inject does for dense layers: keep the replaced module, minus its parameters, so
    # merge_and_unload hands back the very class it replaced. Its dense weight is not kept.
    for key in module._parameters:
        module._parameters[key] = None
    new.__dict__[factory.BASE_ATTR] = module
    new.train(module.training)
    return new


factory.register_quantized_factory("nf4", nf4_lora_factory, check=nf4_lora_check)


# -- model-wide helpers ----------------------------------------------------------------------------
def quantized_lora_layers(model: nn.Module) -> dict[str, _NF4Mixin]:
    """Every quantized LoRA layer of ``model``, by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _NF4Mixin)}


@torch.no_grad()
def dequantize_and_merge(model: nn.Module, safe_merge: bool = True) -> nn.Module:
    """``merge_and_unload`` for a QLoRA model, one layer at a time: a plain dense model.

    Each quantized layer gets its dense merged weight ``dequant(W) + delta`` (compute dtype) and
    drops its 4-bit storage right away, so at most one layer holds both; then
    :func:`~lora_phi3.inject.merge_and_unload` puts the plain modules back. The 4-bit base is never
    rounded into: merging into 4 bits would round the update away.

    Raises:
        ValueError: with ``safe_merge``, a merged weight would hold NaN/Inf (checked for every
            layer before any is changed); or as ``merge_and_unload``.
    """
    inject._check_not_disabled(model, "dequantize_and_merge")
    layers = {n: m for n, m in quantized_lora_layers(model).items() if m.r > 0 and not m.merged}
    if safe_merge:
        # the same arithmetic as merge(), so the check sees exactly what would be stored
        bad = [n for n, m in layers.items()
               if not torch.isfinite((m.weight.float() + m.delta_weight()).to(m.compute_dtype)).all()]
        if bad:
            raise ValueError(f"safe_merge refused: merged weights would contain NaN or Inf in {bad}; "
                             "no weight was changed")
    for layer in quantized_lora_layers(model).values():
        if layer.r > 0:
            layer.merge()
        elif not layer.merged:  # no adapter: the plain module gets the dequantised base
            layer._parameters["weight"] = nn.Parameter(layer.weight, requires_grad=False)
            layer.merged = True
        layer.release_base()
    return inject.merge_and_unload(model, safe_merge=safe_merge)


# -- loading a quantized base from a dense checkpoint ----------------------------------------------
def _checkpoint_dir(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise ValueError(f"{str(name_or_path)!r} is not a directory, and huggingface_hub is not "
                         "installed to fetch it") from None
    keys = ("revision", "cache_dir", "token", "local_files_only")
    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.py"],
                                  **{k: hub_kwargs[k] for k in keys if k in hub_kwargs}))


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{str(directory)!r} holds no *.safetensors checkpoint (load_quantized_model "
                         "reads safetensors only, tensor by tensor); found "
                         f"{sorted(p.name for p in directory.iterdir())[:10]}")
    return shards


_Slot = tuple  # (module, leaf name, is_param): one place a parameter or buffer is held


def _slots(model: nn.Module) -> dict[str, list[_Slot]]:
    """state-dict key -> every slot holding that tensor (a tied weight has several)."""
    by_id: dict[int, list[_Slot]] = {}
    names: dict[str, int] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for leaf, t in table.items():
                if t is None or (not is_param and leaf in module._non_persistent_buffers_set):
                    continue
                slots = by_id.setdefault(id(t), [])
                if not any(m is module and n == leaf for m, n, _ in slots):
                    slots.append((module, leaf, is_param))
                names[f"{mname}.{leaf}" if mname else leaf] = id(t)
    return {key: by_id[i] for key, i in names.items()}


def _held(slot: _Slot) -> torch.Tensor:
    module, leaf, is_param = slot
    return module._parameters[leaf] if is_param else module._buffers[leaf]


def _place(slots: list[_Slot], tensor: torch.Tensor) -> None:
    old = _held(slots[0])
    new = nn.Parameter(tensor, requires_grad=old.requires_grad) if slots[0][2] else tensor
    for module, leaf, is_param in slots:
        (module._parameters if is_param else module._buffers)[leaf] = new


def _load_tensor(key: str, read, layer: _NF4Mixin | None, slots: list[_Slot] | None) -> None:
    """Read one checkpoint tensor; quantise it into ``layer`` or make it the held tensor."""
    if layer is not None:
        out_in = tuple(layer.nf4_weight().shape)
        shape, dtype = out_in[::-1] if layer.fan_in_fan_out else out_in, layer._nf4_meta[1]
    else:
        shape, dtype = tuple(_held(slots[0]).shape), _held(slots[0]).dtype
    tensor = read(key)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the model "
                         f"expects {shape}")
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)  # as from_pretrained(dtype=...) would hold it
    if layer is not None:
        layer.set_base_weight(tensor)  # the dense tensor is dropped on return
    else:
        _place(slots, tensor)


@torch.no_grad()
def load_quantized_model(name_or_path: str | os.PathLike, config: LoraConfig,
                         dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                         **from_pretrained_kwargs: Any) -> nn.Module:
    """A QLoRA causal LM from a dense safetensors checkpoint, quantised while it is read.

    The transformers model is built on the meta device and injected with ``config`` (its targeted
    projections become 4-bit layers with empty storage). Then the checkpoint is read one tensor at
    a time: a targeted weight is cast to ``dtype`` and quantised straight into its layer, any other
    tensor becomes the model's parameter. So only one dense projection is alive at a time, never
    the whole dense model next to its quantised copy. The result equals
    ``inject_lora(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), config)``: adapters are
    initialised as there (``B = 0``), non-persistent buffers (rotary tables) are rebuilt by the
    model's own initialiser.

    Args:
        name_or_path: a local directory with ``config.json`` and ``*.safetensors`` (sharded or
            not), or a hub id (fetched with ``huggingface_hub.snapshot_download``).
        config: the LoRA config; ``quantize_base`` must be ``"nf4"``.
        dtype: dtype of the dense parameters and the compute dtype of the 4-bit layers.
        device: where tensors are read to and quantised (``"cuda"`` quantises on the GPU).
        **from_pretrained_kwargs: passed to ``AutoConfig.from_pretrained`` (e.g.
            ``trust_remote_code``, ``revision``); ``attn_implementation`` goes to the model;
            ``cache_dir``, ``token``, ``local_files_only`` only to the hub download.

    Returns:
        The model in eval mode, with the config ``get_lora_config`` reports.

    Raises:
        ValueError: ``config.quantize_base`` is not ``"nf4"``; a non-float ``dtype``; no
            safetensors files; a checkpoint tensor whose shape differs from the model's; model
            tensors the checkpoint lacks.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(config, LoraConfig) or config.quantize_base != "nf4":
        raise ValueError("load_quantized_model needs a LoraConfig with quantize_base='nf4', got "
                         f"{getattr(config, 'quantize_base', config)!r}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    kwargs = dict(from_pretrained_kwargs)
    directory = _checkpoint_dir(name_or_path, kwargs)
    model_kwargs = {k: kwargs.pop(k) for k in ("attn_implementation",) if k in kwargs}
    for k in ("cache_dir", "token", "local_files_only"):
        kwargs.pop(k, None)
    with torch.device("meta"):
        hf_config = AutoConfig.from_pretrained(str(directory), **kwargs)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **model_kwargs)
    inject.inject_lora(model, config)  # on meta: the 4-bit layers get empty meta storage
    quantized = {n + ".weight": m for n, m in quantized_lora_layers(model).items()}
    slots = _slots(model)
    prefix = getattr(model, "base_model_prefix", "")
    unexpected, loaded = [], set()
    for shard in _shards(directory):
        with safe_open(str(shard), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = key
                if key not in quantized and key not in slots and f"{prefix}.{key}" in slots:
                    name = f"{prefix}.{key}"  # a base-model checkpoint ("layers.0..." keys)
                if name not in quantized and name not in slots:
                    unexpected.append(key)
                    continue
                _load_tensor(key, f.get_tensor, quantized.get(name), slots.get(name))
                loaded.add(name)
    if unexpected:
        logger.warning("load_quantized_model: ignored %d checkpoint tensors the model does not "
                       "have: %s", len(unexpected), unexpected[:10])
    _finish_loading(model, device)
    missing = [k for k in quantized if k not in loaded]
    missing += [k for k, s in slots.items() if k not in loaded and _held(s[0]).is_meta]
    if missing:
        raise ValueError(f"load_quantized_model: the checkpoint in {str(directory)!r} lacks "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.eval()
    logger.info("load_quantized_model: %s, %d layers in NF4 (%.1f MiB of 4-bit storage)",
                directory, len(quantized), sum(m.quantized_nbytes for m in quantized.values()) / 2**20)
    return model


def _finish_loading(model: nn.Module, device: torch.device) -> None:
    """Materialise what the checkpoint does not hold: adapters and non-persistent buffers."""
    for layer in model.modules():
        if isinstance(layer, LoRALayer) and hasattr(layer, "lora_A") and layer.lora_A.is_meta:
            for name in ("lora_A", "lora_B"):
                p = layer._parameters[name]
                layer._parameters[name] = nn.Parameter(torch.empty_like(p, device=device),
                                                       requires_grad=p.requires_grad)
            layer.reset_lora_parameters()
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        meta = [k for k in module._non_persistent_buffers_set
                if module._buffers.get(k) is not None and module._buffers[k].is_meta]
        if not meta:
            continue
        for k in meta:  # NaN-filled, so a buffer the initialiser does not set is caught below
            old = module._buffers[k]
            fill = float("nan") if old.is_floating_point() else 0
            module._buffers[k] = torch.full_like(old, fill, device=device)
        if callable(init):
            init(module)  # transformers recomputes e.g. rotary inv_freq here
        unset = [k for k in meta if module._buffers[k].is_floating_point()
                 and torch.isnan(module._buffers[k]).any()]
        if unset:
            raise ValueError(f"load_quantized_model: {type(module).__name__}'s non-persistent buffers "
                             f"{unset} are not in the checkpoint and its model's _init_weights did not "
                             "rebuild them")
