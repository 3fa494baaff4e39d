"""``TrainableTokens``: new values for a few rows of an embedding table, trained alone (HF PEFT's
``trainable_token_indices``).

Adding special tokens to a vocabulary, or retraining a handful, needs those rows of the embedding
to learn, not a low-rank update of the whole table and not the whole table (``modules_to_save``).
PEFT's TrainableTokens layer keeps a ``(k, embedding_dim)`` tensor of the selected rows' values
(PEFT calls it ``trainable_tokens_delta``, though it holds values, not differences) and looks up the
table with those rows replaced. This layer does the same, with PEFT's initialisation, so its
tensor is PEFT's unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoRALayer

__all__ = ["TrainableTokens"]


def check_token_indices(indices: object, num_embeddings: int, where: str) -> list[int]:
    """``indices`` as a list, or ``ValueError`` naming ``where``: a non-empty list of distinct
    ints in ``[0, num_embeddings)``."""
    if not isinstance(indices, (list, tuple)) or not indices or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{where} must be a non-empty list of token ids (ints), got {indices!r}")
    bad = [i for i in indices if not 0 <= i < num_embeddings]
    if bad:
        raise ValueError(f"{where}: token ids {bad} are outside the embedding's "
                         f"[0, {num_embeddings})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{where} lists a token id twice: {list(indices)}")
    return list(indices)


class TrainableTokens(LoRALayer, nn.Embedding):
    """``nn.Embedding`` whose rows ``token_indices`` are replaced by the trained ``token_values``.

    Attributes:
        token_indices: the ``k`` selected rows (a list, also kept as a non-persistent buffer so it
            follows the layer's device; the state dict holds only the torch module's keys and
            ``token_values``).
        token_values: ``(k, embedding_dim)``, the adapter's one parameter (PEFT's
            ``trainable_tokens_delta``).

    For the shared LoRA protocol, ``r`` is ``k`` (the update changes ``k`` rows, so its rank is at
    most ``k``) and the scaling is 1. Merging writes the values into those rows and keeps the rows
    it overwrote, so unmerging restores them bit for bit.
    """

    adapter_param_names = ("token_values",)

    def __init__(self, num_embeddings: int, embedding_dim: int, token_indices: Sequence[int],
                 merge_weights: bool = True, init_lora_weights: bool | str = True,
                 **kwargs) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._setup(token_indices, merge_weights, init_lora_weights)
        self.reset_lora_parameters()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, token_indices: Sequence[int],
                       merge_weights: bool = True,
                       init_lora_weights: bool | str = True) -> "TrainableTokens":
        """Wrap an existing ``nn.Embedding``, sharing (not copying) its table.

        Args:
            embedding: the table whose rows are trained.
            token_indices: the rows to train (distinct, in range).
            merge_weights: merge on ``eval()``, unmerge on ``train()`` (loralib's switch).
            init_lora_weights: ``True`` or ``"gaussian"``: start from the rows' current values (the
                layer is then a no-op); ``False``: standard normal values (PEFT's choice).

        Raises:
            ValueError: bad ``token_indices`` (empty, repeated, out of range, not ints).
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self.weight = embedding.weight
        self._setup(token_indices, merge_weights, init_lora_weights)
        self.reset_lora_parameters()
        return self

    def _setup(self, token_indices, merge_weights, init_lora_weights) -> None:
        indices = check_token_indices(token_indices, self.num_embeddings, "token_indices")
        k = len(indices)
        self._init_lora(k, k, 0.0, merge_weights, init_lora_weights=init_lora_weights)
        self.token_indices = indices
        # slot[t] = position of token t in token_values, -1 for rows that keep the table's value
        slot = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=self.weight.device)
        slot[indices] = torch.arange(k, device=self.weight.device)
        self.register_buffer("token_slot", slot, persistent=False)
        self.token_values = nn.Parameter(torch.empty(k, self.embedding_dim, dtype=self.weight.dtype,
                                                     device=self.weight.device))
        self.weight.requires_grad = False

    def _index(self) -> torch.Tensor:
        return torch.as_tensor(self.token_indices, device=self.weight.device)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's init: the rows' current values (``True``, ``"gaussian"``), or ``randn`` (``False``)."""
        if self.init_lora_weights is False:
            nn.init.normal_(self.token_values)
        else:
            self.token_values.copy_(self.weight[self._index()])

    # -- the update ------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``new table - table``: the values minus the current rows on ``token_indices``, zero
        elsewhere; ``(num_embeddings, embedding_dim)`` in fp32. For information and tests: merging
        writes the values themselves (:meth:`merged_weight`), which is exact."""
        values, index = self._acc(self.token_values), self._index()
        base = self.weight
        if self.merged:  # the table holds the values now; the originals are kept aside
            rows = self._merged_away.to(values.dtype)
        else:
            rows = base[index].to(values.dtype)
        delta = values.new_zeros(base.shape)
        delta[index] = values - rows
        return delta

    @torch.no_grad()
    def merged_weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The table with the selected rows replaced by ``token_values`` (cast to its dtype)."""
        weight = self.weight
        return weight.index_copy(0, self._index(), self.token_values.to(weight.dtype))

    def _store_merged(self, merged: torch.Tensor, delta: torch.Tensor) -> None:
        self._merged_away = self.weight[self._index()].clone()  # restored exactly by unmerge
        self.weight.copy_(merged)

    def _restore_unmerged(self) -> None:
        self.weight.index_copy_(0, self._index(), self._merged_away.to(self.weight.device))
        del self._merged_away

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Indices ``(...)`` -> embeddings ``(..., embedding_dim)``; selected tokens read
        ``token_values``, the others the table (no copy of the table is made)."""
        result = nn.Embedding.forward(self, x)  # (..., dim)
        if not self.lora_active:
            return result
        slot = self.token_slot[x]  # (...), -1 where x is not a selected token
        values = F.embedding(slot.clamp_min(0), self.token_values)  # (..., dim)
        return torch.where((slot >= 0).unsqueeze(-1), values.to(result.dtype), result)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, token_indices={self.token_indices}"
