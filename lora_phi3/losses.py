"""Causal-LM loss that never materialises the full ``(tokens, vocab)`` fp32 logits.

At Phi-3's vocabulary (32064) the logits of a 4k-token batch are 0.5 GB in fp32, plus as much
again for their gradient. Here the LM head and cross-entropy run over chunks of label tokens under
activation checkpointing, so at most one chunk's logits exist at a time, and positions whose
label is ``-100`` (prompts, padding) never reach the head at all.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["lm_loss_sum", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (chunk, vocab), freed after this call
    return F.cross_entropy(logits, targets, reduction="sum")


def lm_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                chunk_size: int | None = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of label tokens.

    Uses the Hugging Face convention: ``labels`` are aligned with the inputs and shifted here, so
    position ``t`` predicts ``labels[:, t + 1]``; ``-100`` is ignored.

    Args:
        hidden: final hidden states ``(B, T, H)`` (the model's output before the LM head).
        lm_head: the output projection, ``(..., H) -> (..., V)``.
        labels: ``(B, T)`` token ids or ``-100``.
        chunk_size: label tokens per chunk; ``None`` computes all logits at once (the plain way).

    Returns:
        ``(loss_sum, n_tokens)``: an fp32 scalar and an int64 scalar. Divide by the global token
        count to get the mean over a (possibly accumulated or distributed) batch.
    """
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # (N, H): only positions with a label
    y = targets[keep]
    n_tokens = keep.sum()
    if y.numel() == 0:
        return hidden.sum() * 0.0, n_tokens
    if chunk_size is None or y.numel() <= chunk_size:
        return _chunk_loss(lm_head, h, y), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        total = total + checkpoint(_chunk_loss, lm_head, h[start:start + chunk_size],
                                   y[start:start + chunk_size], use_reentrant=False)
    return total, n_tokens
