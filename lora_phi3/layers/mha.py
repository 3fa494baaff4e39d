"""``MultiheadAttention``: LoRA on ``nn.MultiheadAttention``'s fused input and its output projection.

Torch's attention never calls a module for its projections: it reads ``in_proj_weight`` (q, k and v
stacked, ``(3 * embed_dim, embed_dim)``) and ``out_proj.weight`` directly. So, as in HF PEFT 0.21's
``lora.MultiheadAttention``, both get an adapter and the forward runs torch's attention with the
adapted weights ``W + scaling * B @ A``. PEFT swaps merged weights into the module for each call;
here they are passed to ``F.multi_head_attention_forward`` as arguments, so no parameter is ever
replaced and gradients reach ``A`` and ``B`` directly.

The in-projection's adapter is this layer's own ``lora_A`` ``(r, embed_dim)`` / ``lora_B``
``(3 * embed_dim, r)``; the output projection is a LoRA :class:`~lora_phi3.layers.Linear` child,
``out_proj``, with the same rank and scaling (PEFT's shapes both, so its tensors load unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoRALayer, new_lora_param
from .linear import Linear

__all__ = ["MultiheadAttention"]


class MultiheadAttention(LoRALayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with LoRA on ``in_proj_weight`` and on ``out_proj``.

    Its ``state_dict`` keys are the torch module's plus ``lora_A``/``lora_B`` and
    ``out_proj.lora_A``/``out_proj.lora_B``. ``weight`` is ``in_proj_weight``, the matrix this
    layer's own adapter updates (what merge and ``delta_weight`` act on); ``out_proj`` merges itself,
    and :meth:`merge`/:meth:`unmerge` move both, as PEFT's do.

    Differences from the other layers, all PEFT's as well: the update is a whole weight formed on
    each forward (attention reads weights, not module outputs); ``lora_dropout`` is therefore not
    applied; only a shared q/k/v embedding size (``kdim == vdim == embed_dim``) is supported; DoRA
    and the data-driven inits are not.
    """

    def __init__(self, embed_dim: int, num_heads: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True,
                 lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, use_dora: bool = False,
                 **kwargs: Any) -> None:
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, **kwargs)
        self._setup(r, lora_alpha, lora_dropout, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights, use_dora)
        if r > 0:
            self.reset_lora_parameters()

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, merge_weights: bool = True,
                 lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                 init_lora_weights: bool | str = True,
                 use_dora: bool = False) -> "MultiheadAttention":
        """Wrap an existing ``nn.MultiheadAttention``, sharing (not copying) its parameters.

        Raises:
            TypeError: ``mha`` is not an ``nn.MultiheadAttention``.
            ValueError: separate q/k/v weights (``kdim``/``vdim`` other than ``embed_dim``),
                ``use_dora=True``, a data-driven ``init_lora_weights``, or a bad LoRA argument.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttention.from_mha needs an nn.MultiheadAttention, "
                            f"got {type(mha).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                     "batch_first", "head_dim", "add_zero_attn"):
            setattr(self, name, getattr(mha, name))
        for name, param in mha._parameters.items():  # in_proj_*, q/k/v_proj_weight, bias_k/v
            self.register_parameter(name, param)
        for name in ("bias_k", "bias_v"):  # plain None attributes without add_bias_kv
            if name not in self._parameters:
                setattr(self, name, getattr(mha, name))
        self.out_proj = mha.out_proj
        self._setup(r, lora_alpha, lora_dropout, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights, use_dora)
        if r > 0:
            self.reset_lora_parameters()
        return self

    def _setup(self, r, lora_alpha, lora_dropout, merge_weights, lora_dtype, use_rslora=False,
               init_lora_weights=True, use_dora=False) -> None:
        if not self._qkv_same_embed_dim:
            raise ValueError(f"MultiheadAttention LoRA needs kdim == vdim == embed_dim (one fused "
                             f"in_proj_weight, as PEFT does), got embed_dim={self.embed_dim}, "
                             f"kdim={self.kdim}, vdim={self.vdim}")
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora,
                        init_lora_weights, use_dora)
        # The in-projection as a linear layer (q, k, v rows stacked): what module facts and the
        # PEFT format describe.
        self.in_features, self.out_features = self.embed_dim, 3 * self.embed_dim
        if r == 0:
            return
        dtype, device = lora_dtype or self.in_proj_weight.dtype, self.in_proj_weight.device
        self.lora_A = new_lora_param((r, self.in_features), dtype, device)
        self.lora_B = new_lora_param((self.out_features, r), dtype, device)
        self.in_proj_weight.requires_grad = False
        out = self.out_proj
        self.out_proj = Linear.from_linear(out, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                           merge_weights=merge_weights, lora_dtype=lora_dtype,
                                           use_rslora=use_rslora, init_lora_weights=init_lora_weights)

    @property
    def weight(self) -> torch.Tensor:
        """The matrix this layer's own adapter updates: ``in_proj_weight`` ``(3 * embed_dim, embed_dim)``."""
        return self.in_proj_weight

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, ``(3 * embed_dim, embed_dim)``, in fp32 (the in-projection's update)."""
        return (self._acc(self.lora_B) @ self._acc(self.lora_A)) * self.scaling

    # -- merge: both projections, as PEFT merges both --------------------------------------------
    def merge(self, safe_merge: bool = False) -> None:
        """Fold both updates into ``in_proj_weight`` and ``out_proj.weight``. Idempotent.

        Raises:
            ValueError: with ``safe_merge=True``, if either merged weight would hold NaN or Inf;
                both weights are then left untouched.
        """
        out = self.out_proj
        if safe_merge and isinstance(out, LoRALayer) and not out.merged and out.r > 0 \
                and not torch.isfinite(out.merged_weight()).all():
            raise ValueError("safe_merge refused MultiheadAttention: the merged out_proj weight "
                             "would contain NaN or Inf; the weights are unchanged")
        super().merge(safe_merge)
        if isinstance(out, LoRALayer):
            out.merge(safe_merge)

    def unmerge(self) -> None:
        """Take both updates out again, restoring the original bits. Idempotent."""
        super().unmerge()
        if isinstance(self.out_proj, LoRALayer):
            self.out_proj.unmerge()

    # -- forward ---------------------------------------------------------------------------------
    @staticmethod
    def _adapted(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` plus ``layer``'s update when it is active, summed in fp32 and rounded once,
        as merge rounds it (so merged and unmerged outputs agree)."""
        if not isinstance(layer, LoRALayer) or not layer.lora_active:
            return weight
        delta = layer.delta_weight()
        return (weight.to(delta.dtype) + delta).to(weight.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward`` with the adapted weights: query ``(L, N, E)`` (or
        ``(N, L, E)`` with ``batch_first``, or unbatched ``(L, E)``) -> ``(output, weights)``."""
        out_active = isinstance(self.out_proj, LoRALayer) and self.out_proj.lora_active
        if not self.lora_active and not out_active:  # torch's own path, its fast path included
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal)
        in_weight = self._adapted(self, self.in_proj_weight)  # (3E, E)
        out_weight = self._adapted(self.out_proj, self.out_proj.weight)  # (E, E)
        batched_first = self.batch_first and query.dim() == 3
        if batched_first:  # the functional form is sequence-first
            # Transposed as torch does, keeping ``query is key is value`` (self-attention then
            # projects q, k and v in one matmul, as the plain module does).
            if key is value:
                if query is key:
                    query = key = value = query.transpose(0, 1)
                else:
                    query, key = query.transpose(0, 1), key.transpose(0, 1)
                    value = key
            else:
                query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, out_weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (output.transpose(0, 1) if batched_first else output), weights

    def extra_repr(self) -> str:
        if self.r == 0:
            return super().extra_repr()
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, r={self.r}, " \
               f"lora_alpha={self.lora_alpha}"
