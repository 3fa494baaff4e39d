"""LoRA layers: drop-in replacements for ``nn.Linear``, ``nn.Embedding`` and ``nn.Conv1d/2d/3d``.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes a pretrained weight ``W`` and learns a low-rank
update ``delta W = B @ A * scaling`` with ``A`` of shape ``(r, in)``, ``B`` of shape ``(out, r)`` and
``scaling = lora_alpha / r`` (section 4.1). ``B`` starts at zero, so training starts from the
pretrained function.

Every layer here subclasses its torch module, so the base keys stay ``weight``/``bias`` and a
pretrained state dict loads with ``strict=False`` with only the ``lora_*`` keys missing. The class
names, constructor arguments, defaults and parameter shapes are those of Microsoft's loralib 0.1.2,
so ``import lora_phi3 as lora`` replaces ``import loralib as lora``.

Shared state and the merge protocol live in :class:`LoRALayer`; each layer adds only its shapes,
its ``delta_weight`` (the single source of the dense update, used by merge and by the tests) and its
forward, which stays in rank-``r`` space and never builds the dense delta (Conv excepted: there the
delta is kernel-sized, independent of the number of tokens).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import _apply as _fused_lora_linear

__all__ = ["LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
           "lora_layers"]


def _check_lora_args(r: Any, lora_alpha: Any, lora_dropout: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0 (0 means no adapter), got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")


class LoRALayer:
    """Mixin holding the LoRA state shared by every layer and the merge/unmerge protocol.

    Attributes:
        r: rank of the update; 0 means the layer behaves exactly like its torch module.
        lora_alpha: numerator of the scaling.
        scaling: ``lora_alpha / r``, computed once here.
        lora_dropout: ``nn.Dropout`` (or ``nn.Identity`` for p=0) applied to the adapter's input.
            A module, not a lambda, so layers pickle and deepcopy.
        merged: True while ``delta_weight()`` is folded into ``weight``.
        merge_weights: if True, ``eval()`` merges and ``train()`` unmerges, as in loralib.
        lora_disabled: if True, the forward skips the adapter (see ``inject.disable_lora``).
    """

    r: int
    weight: torch.Tensor

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        _check_lora_args(r, lora_alpha, lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r if r > 0 else 0.0
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merge_weights = merge_weights
        self.merged = False
        self.lora_disabled = False

    # -- the dense update: one method per layer type -------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` in ``weight``'s layout, in fp32 (fp64 for fp64 adapters)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        # The torch module's own init (next in the MRO), then the adapter's, as in loralib.
        super().reset_parameters()  # type: ignore[misc]
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Section 4.1 of the paper: A ~ kaiming-uniform, B = 0, so delta W = 0 at the start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- which parameters are the adapter's: the one answer, asked of the layer -------------------
    adapter_param_names: tuple[str, ...] = ("lora_A", "lora_B")

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """This layer's own adapter parameters by attribute name (empty for ``r == 0``).

        Callers (``mark_only_lora_as_trainable``, ``lora_state_dict``, adapter files, PEFT export)
        ask the layer rather than matching ``"lora_"`` in names, so a new variant that adds a
        parameter (a DoRA magnitude, a second adapter) declares it here and nowhere else.
        """
        params = self._parameters  # type: ignore[attr-defined]
        return {n: params[n] for n in self.adapter_param_names if params.get(n) is not None}

    @property
    def lora_active(self) -> bool:
        """True when the forward must add the adapter's output (rank > 0, not merged, not disabled)."""
        return self.r > 0 and not self.merged and not self.lora_disabled

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.Tensor:
        """``t`` in the dtype the update is formed in: fp32, or fp64 for fp64 adapters."""
        return t.to(torch.promote_types(t.dtype, torch.float32))

    # -- merge protocol --------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the update into ``weight``. Idempotent.

        The sum is formed in fp32 and rounded once to the weight's dtype. Where rounding would keep
        ``unmerge`` from landing exactly on the original value (it happens when ``W + delta`` moves
        to a coarser binade), the original values are kept aside, so ``unmerge`` restores the weight
        bit for bit however many eval/train cycles run (loralib drifts by ~4e-3 over 50 in bf16).
        The kept values are a sparse ``(indices, values)`` pair, usually a tiny fraction of the weight.

        Raises:
            ValueError: with ``safe_merge=True``, if the merged weight would hold NaN or Inf; the
                weight is left untouched.
        """
        if self.merged or self.r == 0:
            return
        delta = self.delta_weight()
        merged = (self.weight.to(delta.dtype) + delta).to(self.weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"safe_merge refused {type(self).__name__}: the merged weight would "
                             "contain NaN or Inf; the weight is unchanged")
        round_trip = (merged.to(delta.dtype) - delta).to(self.weight.dtype)
        lost = (round_trip != self.weight).flatten().nonzero().squeeze(1)
        self._unmerge_fix = (lost, self.weight.flatten()[lost].clone())
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``weight`` again, restoring the original bits. Idempotent."""
        if not self.merged:
            return
        delta = self.delta_weight()
        restored = (self.weight.to(delta.dtype) - delta).to(self.weight.dtype)
        lost, values = getattr(self, "_unmerge_fix", (None, None))
        if lost is not None and lost.numel():
            restored.view(-1)[lost.to(restored.device)] = values.to(restored.device)
        self.weight.copy_(restored)
        self._unmerge_fix = (None, None)
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    # -- state dict ------------------------------------------------------------------------------
    _legacy_keys: dict[str, str] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loading while merged would leave the old delta baked into `weight` (loralib #190-style
        # corruption on the next train()). Unmerge first, load, then merge the new delta.
        was_merged = self.merged
        self.unmerge()
        for old, new in self._legacy_keys.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, r={self.r}, lora_alpha={self.lora_alpha}" if self.r > 0 else base

    # -- helpers for subclasses ------------------------------------------------------------------
    def _cast_in(self, x: torch.Tensor) -> torch.Tensor:
        # An fp32 adapter on a bf16/fp16 base runs in the adapter's dtype (section 'Dtypes').
        return x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)


def _fused_dropout_p(layer: LoRALayer) -> float | None:
    """The adapter dropout probability the fused path should apply now (0 in eval mode), or None
    when ``lora_dropout`` is a module the fused path does not know (then the plain path runs)."""
    drop = layer.lora_dropout
    if type(drop) is nn.Identity:
        return 0.0
    if type(drop) is nn.Dropout:
        return drop.p if drop.training else 0.0
    return None


def _new_lora_param(like: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype or like.dtype, device=like.device))


class _LinearLoRA(LoRALayer, nn.Linear):
    """What ``Linear`` and ``MergedLinear`` share: construction, wrapping, init and weight layout."""

    fan_in_fan_out: bool

    def _init_linear(self, in_features: int, out_features: int, fan_in_fan_out: bool,
                     kwargs: dict[str, Any]) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        if fan_in_fan_out:  # stored (in, out), as GPT-2's Conv1D and loralib keep it
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()

    @classmethod
    def _wrap(cls, linear: nn.Module, fan_in_fan_out: bool):
        """A bare instance sharing ``linear``'s weight and bias; the caller runs ``_setup``."""
        weight = linear.weight
        if weight.dim() != 2:
            raise ValueError(f"from_linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = getattr(linear, "bias", None)
        return self

    def _base_weight(self) -> torch.Tensor:
        return self.weight.T if self.fan_in_fan_out else self.weight


class Linear(_LinearLoRA):
    """``nn.Linear`` with a LoRA update: ``y = x @ W.T + b + scaling * dropout(x) @ A.T @ B.T``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: rank; 0 (the default, as in loralib) adds no adapter.
        lora_alpha: scaling numerator; ``scaling = lora_alpha / r``.
        lora_dropout: dropout probability on the adapter's input.
        fan_in_fan_out: True if ``weight`` is stored as ``(in_features, out_features)`` (GPT-2 Conv1D).
        merge_weights: merge on ``eval()`` and unmerge on ``train()``.
        lora_dtype: dtype of ``lora_A``/``lora_B`` (default: the weight's dtype, as in loralib).
        **kwargs: passed to ``nn.Linear`` (``bias``, ``device``, ``dtype``).

    Shapes: ``lora_A`` is ``(r, in_features)`` (kaiming-uniform), ``lora_B`` is ``(out_features, r)``
    (zeros); input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 lora_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        self._init_linear(in_features, out_features, fan_in_fan_out, kwargs)
        self._setup(r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, lora_dtype)

    def _setup(self, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, lora_dtype) -> None:
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = _new_lora_param(self.weight, (r, self.in_features), lora_dtype)
            self.lora_B = _new_lora_param(self.weight, (self.out_features, r), lora_dtype)
            self.weight.requires_grad = False
            self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    fan_in_fan_out: bool = False, merge_weights: bool = True,
                    lora_dtype: torch.dtype | None = None) -> "Linear":
        """Wrap an existing linear-like module, sharing (not copying) its ``weight`` and ``bias``.

        ``linear`` may be an ``nn.Linear`` or anything with a 2-D ``weight`` and optional ``bias``,
        such as transformers' GPT-2 ``Conv1D`` (pass ``fan_in_fan_out=True``).
        """
        self = cls._wrap(linear, fan_in_fan_out)
        self._setup(r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, lora_dtype)
        return self

    def delta_weight(self) -> torch.Tensor:
        delta = (self._acc(self.lora_B) @ self._acc(self.lora_A)) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_active:
            return F.linear(x, self._base_weight(), self.bias)  # (..., out)
        p = _fused_dropout_p(self)
        if p is None:  # a custom lora_dropout module: the plain autograd path
            result = F.linear(x, self._base_weight(), self.bias)
            h = F.linear(self.lora_dropout(self._cast_in(x)), self.lora_A) * self.scaling
            return result + F.linear(h, self.lora_B).to(result.dtype)  # (..., out)
        # One autograd node: saves x once, the bit-packed mask and the (..., r) intermediate.
        return _fused_lora_linear(x, self._base_weight(), self.bias, self.lora_A, self.lora_B,
                                  self.scaling, p, ((0, self.out_features),))


class MergedLinear(_LinearLoRA):
    """A fused projection (e.g. Phi-3's ``qkv_proj``) with LoRA on a chosen subset of its slices.

    The output features are split into ``len(enable_lora)`` slices: equal ones as in loralib, or
    the sizes given by ``split_sizes`` (e.g. ``[q, k, v]`` for grouped-query attention, which
    loralib cannot do). Each enabled slice ``i`` gets its own ``A_i`` ``(r, in)`` and ``B_i``
    ``(size_i, r)``; they are stored stacked as in loralib:

    - ``lora_A``: ``(r * k, in_features)`` for ``k`` enabled slices;
    - ``lora_B``: ``(sum of enabled slice sizes, r)``.

    The forward runs one matmul with the stacked ``A`` and then each slice's ``B`` adds into its
    own output slice; the dense ``(out, in)`` delta is never built.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True,
                 split_sizes: Sequence[int] | None = None, lora_dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        self._init_linear(in_features, out_features, fan_in_fan_out, kwargs)
        self._setup(r, lora_alpha, lora_dropout, enable_lora, fan_in_fan_out, merge_weights,
                    split_sizes, lora_dtype)

    def _setup(self, r, lora_alpha, lora_dropout, enable_lora, fan_in_fan_out, merge_weights,
               split_sizes, lora_dtype) -> None:
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        enable_lora = [bool(e) for e in enable_lora]
        if not enable_lora:
            raise ValueError("enable_lora must name at least one slice, got []")
        if split_sizes is None:
            if self.out_features % len(enable_lora) != 0:
                raise ValueError(f"enable_lora has {len(enable_lora)} slices, which does not divide "
                                 f"out_features={self.out_features}; pass split_sizes")
            split_sizes = [self.out_features // len(enable_lora)] * len(enable_lora)
        split_sizes = [int(s) for s in split_sizes]
        if len(split_sizes) != len(enable_lora):
            raise ValueError(f"split_sizes={split_sizes} has {len(split_sizes)} entries but "
                             f"enable_lora={enable_lora} has {len(enable_lora)}")
        if sum(split_sizes) != self.out_features or any(s <= 0 for s in split_sizes):
            raise ValueError(f"split_sizes={split_sizes} must be positive and sum to "
                             f"out_features={self.out_features}")
        self.enable_lora = enable_lora
        self.split_sizes = split_sizes
        # (output offset, size) of each enabled slice, in the order of their A/B blocks.
        offsets = [sum(split_sizes[:i]) for i in range(len(split_sizes))]
        self.lora_slices = [(offsets[i], split_sizes[i]) for i, e in enumerate(enable_lora) if e]
        if r > 0 and self.lora_slices:
            k = len(self.lora_slices)
            self.lora_A = _new_lora_param(self.weight, (r * k, self.in_features), lora_dtype)
            self.lora_B = _new_lora_param(self.weight, (sum(s for _, s in self.lora_slices), r),
                                          lora_dtype)
            self.weight.requires_grad = False
            self.reset_lora_parameters()
        elif r > 0:
            self.r = 0  # no slice enabled: behaves as the plain layer, like loralib
            self.scaling = 0.0

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                    merge_weights: bool = True, split_sizes: Sequence[int] | None = None,
                    lora_dtype: torch.dtype | None = None) -> "MergedLinear":
        """Wrap an existing fused linear module, sharing (not copying) its ``weight`` and ``bias``."""
        self = cls._wrap(linear, fan_in_fan_out)
        self._setup(r, lora_alpha, lora_dropout, enable_lora, fan_in_fan_out, merge_weights,
                    split_sizes, lora_dtype)
        return self

    def delta_weight(self) -> torch.Tensor:
        A, B, r, b0 = self._acc(self.lora_A), self._acc(self.lora_B), self.r, 0
        delta = A.new_zeros((self.out_features, self.in_features))
        for i, (start, size) in enumerate(self.lora_slices):
            delta[start:start + size] = B[b0:b0 + size] @ A[i * r:(i + 1) * r] * self.scaling
            b0 += size
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_active:
            return F.linear(x, self._base_weight(), self.bias)  # (..., out)
        p = _fused_dropout_p(self)
        if p is not None:  # one autograd node, as in Linear.forward
            return _fused_lora_linear(x, self._base_weight(), self.bias, self.lora_A, self.lora_B,
                                      self.scaling, p, tuple(self.lora_slices))
        result = F.linear(x, self._base_weight(), self.bias)  # (..., out)
        h = F.linear(self.lora_dropout(self._cast_in(x)), self.lora_A) * self.scaling  # (..., r*k)
        r, b0 = self.r, 0
        for i, (start, size) in enumerate(self.lora_slices):
            out_i = F.linear(h[..., i * r:(i + 1) * r], self.lora_B[b0:b0 + size])  # (..., size_i)
            # In place into the slice: F.linear does not need its output for backward.
            result.narrow(-1, start, size).add_(out_i.to(result.dtype))
            b0 += size
        return result


class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` with a LoRA update on the embedding table.

    Shapes (loralib's): ``lora_A`` is ``(r, num_embeddings)`` initialised to zeros and ``lora_B`` is
    ``(embedding_dim, r)`` initialised normal, so the update still starts at zero. The delta table is
    ``(B @ A).T * scaling`` of shape ``(num_embeddings, embedding_dim)``. As in loralib, dropout is
    not applied to an embedding's adapter (its input is indices).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, lora_dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._setup(r, lora_alpha, merge_weights, lora_dtype)

    def _setup(self, r, lora_alpha, merge_weights, lora_dtype) -> None:
        self._init_lora(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self.lora_A = _new_lora_param(self.weight, (r, self.num_embeddings), lora_dtype)
            self.lora_B = _new_lora_param(self.weight, (self.embedding_dim, r), lora_dtype)
            self.weight.requires_grad = False
            self.reset_lora_parameters()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int = 0, lora_alpha: float = 1,
                       merge_weights: bool = True, lora_dtype: torch.dtype | None = None) -> "Embedding":
        """Wrap an existing ``nn.Embedding``, sharing (not copying) its table."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self.weight = embedding.weight
        self._setup(r, lora_alpha, merge_weights, lora_dtype)
        return self

    def reset_lora_parameters(self) -> None:
        # loralib's choice for embeddings: A = 0 and B normal (the delta still starts at zero).
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self._acc(self.lora_B) @ self._acc(self.lora_A)).T * self.scaling  # (num_embeddings, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)  # (..., dim)
        if not self.lora_active:
            return result
        # Row lookup in A.T gives x's rank-r codes without forming the dense delta table.
        after_A = F.embedding(x, self.lora_A.T, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)  # (..., r)
        return result + (F.linear(after_A, self.lora_B) * self.scaling).to(result.dtype)


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
                 lora_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        self._conv_cls.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._setup(r, lora_alpha, lora_dropout, merge_weights, lora_dtype)

    def _setup(self, r, lora_alpha, lora_dropout, merge_weights, lora_dtype) -> None:
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            k0, rest = self.kernel_size[0], math.prod(self.kernel_size[1:])
            self.lora_A = _new_lora_param(self.weight, (r * k0, self.in_channels * rest), lora_dtype)
            self.lora_B = _new_lora_param(self.weight, (self.out_channels // self.groups * k0, r * k0),
                                          lora_dtype)
            self.weight.requires_grad = False
            self.reset_lora_parameters()

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, r: int = 0, lora_alpha: float = 1,
                  lora_dropout: float = 0.0, merge_weights: bool = True,
                  lora_dtype: torch.dtype | None = None):
        """Wrap an existing convolution of the matching dimension, sharing its weight and bias."""
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
        self._setup(r, lora_alpha, lora_dropout, merge_weights, lora_dtype)
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
        lora = self._conv_forward(self.lora_dropout(self._cast_in(x)), delta, None)
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


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Qualified name -> LoRA layer, for every layer of ``model`` holding an adapter (``r > 0``).

    The single answer to "which layers carry an adapter"; ``inject.lora_modules`` is this.
    """
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALayer) and m.r > 0 and m.adapter_params()}
