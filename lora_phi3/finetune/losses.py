"""Causal-LM loss that never materialises the full ``(tokens, vocab)`` fp32 logits.

At Phi-3's vocabulary (32064) the logits of a 2k-token batch are 263 MB in fp32; plain
cross-entropy keeps its log-softmax output for backward and builds as much again for each of the
gradients, about three such tensors at the peak. Here positions whose label is ``-100`` (prompts,
padding) never reach the head, and the rest go through the head in chunks of ``chunk_size`` tokens:

- for an ``nn.Linear`` head (the usual case) one autograd function computes, chunk by chunk, the
  logits, the loss and already the gradient ``(softmax - onehot) @ W`` with respect to the hidden
  states; backward only scales that stored ``(N, hidden)`` gradient. At most one chunk's logits
  exist at a time, and the head's GEMM runs twice per token instead of three times (no recompute);
- any other head (a LoRA-wrapped one, say) runs each chunk under activation checkpointing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["lm_loss_sum", "IGNORE_INDEX"]

#: Label of a position that is not trained (prompt, padding, an example's first token in a packed
#: row); the value ``torch.nn.functional.cross_entropy`` and transformers ignore by default.
IGNORE_INDEX = -100


def _chunk_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (chunk, vocab), freed after this call
    return F.cross_entropy(logits, targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ W.T + b`` against ``targets``, chunk by chunk, with the
    gradients formed in forward (so backward needs no logits). ``h`` is ``(N, H)``, ``targets``
    ``(N,)`` with no ignored entries; returns an fp32 scalar."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], targets[start:start + chunk_size]
            logits = F.linear(hc, weight, bias).float()  # (c, V): the only vocab-sized tensor
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                # d loss / d logits = softmax - onehot, formed in place in the logits' buffer
                logits.sub_(lse[:, None]).exp_()
                logits.scatter_add_(1, yc[:, None], logits.new_full((yc.shape[0], 1), -1.0))
                g = logits.to(weight.dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = torch.mm(g, weight)
                if need_w:
                    grad_w.addmm_(logits.t(), hc.float())
                if need_b:
                    grad_b += logits.sum(0)
                del g
            del logits
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        out = []
        for needed, dtype in zip(ctx.which, ctx.dtypes):
            out.append((next(saved) * grad_loss).to(dtype) if needed else None)
        return (*out, None, None)


def _check(hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, T, H) and labels (B, T); got hidden "
                         f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}")


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

    Raises:
        ValueError: if ``chunk_size`` is not a positive int or None, or the shapes disagree.
    """
    _check(hidden, labels, chunk_size)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # (N, H): only positions with a label
    y = targets[keep]
    n_tokens = keep.sum()
    if y.numel() == 0:
        # A zero that still passes through the head: under DDP a trainable head (modules_to_save)
        # must take part in every backward, or the ranks' gradient reductions fall out of step.
        return lm_head(hidden[:, :1]).float().sum() * 0.0, n_tokens
    if chunk_size is None:
        return _chunk_loss(lm_head, h, y), n_tokens
    if not torch.is_grad_enabled():
        # Evaluation: chunk for memory, but no gradient work (the fused function below would form
        # the head's gradient whenever its weight requires grad, even under no_grad).
        total = sum(_chunk_loss(lm_head, h[i:i + chunk_size], y[i:i + chunk_size])
                    for i in range(0, y.numel(), chunk_size))
        return total, n_tokens
    if isinstance(lm_head, nn.Linear) and type(lm_head).forward is nn.Linear.forward:
        return _LinearCrossEntropy.apply(h, lm_head.weight, lm_head.bias, y, chunk_size), n_tokens
    if y.numel() <= chunk_size:
        return _chunk_loss(lm_head, h, y), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        total = total + checkpoint(_chunk_loss, lm_head, h[start:start + chunk_size],
                                   y[start:start + chunk_size], use_reentrant=False)
    return total, n_tokens
