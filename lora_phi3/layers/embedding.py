"""``Embedding``: LoRA on an embedding table, with loralib's shapes and init (and DoRA, as PEFT's)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoRALayer, new_lora_param
from .dora import cached, dora_norm, dora_rescale, version_key, weight_row_sq
from .named import mixed_forward

__all__ = ["Embedding"]


class Embedding(LoRALayer, nn.Embedding):
    """``nn.Embedding`` with a LoRA update on the embedding table.

    Shapes (loralib's): ``lora_A`` is ``(r, num_embeddings)`` initialised to zeros and ``lora_B`` is
    ``(embedding_dim, r)`` initialised normal, so the update still starts at zero. The delta table is
    ``(B @ A).T * scaling`` of shape ``(num_embeddings, embedding_dim)``. As in loralib, dropout is
    not applied to an embedding's adapter (its input is indices).

    DoRA (``use_dora=True``, HF PEFT 0.21's ``DoraEmbeddingLayer``): the table is the weight
    ``(embedding_dim, num_embeddings)`` of a linear layer over one-hot inputs, so the magnitude
    ``lora_magnitude`` has one value per embedding dimension, ``(embedding_dim,)``, and the norm is
    taken over each column of ``E + (B @ A).T * scaling``; the output is
    ``g * (E[x] + scaling * A.T[x] @ B.T)`` with ``g = m / ||column||`` (detached norm). PEFT's
    ``lora_bias`` is refused on embeddings, as PEFT refuses it.
    """

    supports_dora = True

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, lora_dtype: torch.dtype | None = None,
                 use_rslora: bool = False, init_lora_weights: bool | str = True,
                 use_dora: bool = False, lora_bias: bool = False, **kwargs: Any) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._setup(r, lora_alpha, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights, use_dora, lora_bias)
        self.reset_parameters()  # loralib's order: table (again), then the adapter

    def _setup(self, r, lora_alpha, merge_weights, lora_dtype, use_rslora=False,
               init_lora_weights=True, use_dora=False, lora_bias=False) -> None:
        self._init_lora(r, lora_alpha, 0.0, merge_weights, use_rslora,
                        init_lora_weights, use_dora, lora_bias)
        if r > 0:
            dtype, device = lora_dtype or self.weight.dtype, self.weight.device
            self.lora_A = new_lora_param((r, self.num_embeddings), dtype, device)
            self.lora_B = new_lora_param((self.embedding_dim, r), dtype, device)
            if use_dora:  # one value per embedding dimension (a column of the table)
                self.lora_magnitude = new_lora_param((self.embedding_dim,), dtype, device)
            self.weight.requires_grad = False

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int = 0, lora_alpha: float = 1,
                       merge_weights: bool = True, lora_dtype: torch.dtype | None = None,
                       use_rslora: bool = False, init_lora_weights: bool | str = True,
                       use_dora: bool = False, lora_bias: bool = False) -> "Embedding":
        """Wrap an existing ``nn.Embedding``, sharing (not copying) its table.

        Raises:
            ValueError: a bad LoRA argument, or ``lora_bias=True`` (PEFT has no embedding form).
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self.weight = embedding.weight
        self._setup(r, lora_alpha, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights, use_dora, lora_bias)
        if r > 0:
            self.reset_lora_parameters()
        return self

    def reset_lora_parameters(self) -> None:
        # loralib's choice for embeddings: A = 0 and B normal (the delta still starts at zero);
        # PEFT keeps it for "gaussian" too. init_lora_weights=False: A normal as well, as PEFT's
        # uninitialised embedding adapter (randn) is.
        if getattr(self, "init_lora_weights", True) is False:
            nn.init.normal_(self.lora_A)
        else:
            nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)
        if getattr(self, "use_dora", False):
            self.reset_dora_magnitude()

    def delta_weight(self) -> torch.Tensor:
        return (self._acc(self.lora_B) @ self._acc(self.lora_A)).T * self.scaling  # (num_embeddings, dim)

    # -- DoRA: the norm of each column of the table, without the dense delta table -----------------
    def _dora_norm(self) -> torch.Tensor:
        """``||E[:, j] + scaling * (B @ A)[j]||`` per embedding dimension ``j``, ``(embedding_dim,)``:
        :func:`~.dora.dora_norm` of the linear weight ``E.T`` ``(dim, num_embeddings)``."""
        table, A, B = self.weight, self.lora_A, self.lora_B
        col_sq = cached(self, "_row_sq_cache", version_key(table), lambda: weight_row_sq(table.T))
        key = (version_key(A), version_key(B), id(col_sq), self.scaling)
        return cached(self, "_dora_norm_cache", key, lambda: dora_norm(
            table.T, col_sq, A, B, self.scaling, ((0, self.embedding_dim),)))

    @torch.no_grad()
    def _dora_weight_gain(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dora_gain().to(dtype)[None, :]  # (1, dim): one gain per column of the table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` -> embeddings ``(..., embedding_dim)``."""
        if self.mixed_groups is not None:  # rows with different adapters (lora_phi3.mixed_batch)
            return mixed_forward(self, x, self.forward)
        result = nn.Embedding.forward(self, x)  # (..., dim)
        if not self.lora_active:
            return result
        # Row lookup in A.T gives x's rank-r codes without forming the dense delta table.
        after_A = F.embedding(x, self.lora_A.T, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse)  # (..., r)
        out = result + (F.linear(after_A, self.lora_B) * self.scaling).to(result.dtype)
        if getattr(self, "use_dora", False):
            return dora_rescale(out, self.dora_gain(), None, ((0, self.embedding_dim),))
        return out
