"""Packing and batching: tokenised examples into fixed-length rows and padded batches.

Packed rows hold several examples; ``collate`` gives them a block-diagonal causal mask so that no
example attends to another (see docs/data.md for why a 4-D mask and not position ids alone), and
``batches`` orders rows from the seed alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .data import ExampleTooLong
from .losses import IGNORE_INDEX

__all__ = ["pack_examples", "collate", "batches"]

def pack_examples(examples: Sequence[dict], seq_length: int) -> list[dict]:
    """Greedily concatenate examples (in order) into rows of at most ``seq_length`` tokens.

    A new row starts whenever the next example does not fit; no example is split.
    The label of each example's first token is set to -100: the model's internal shift
    would otherwise train the previous example's last token to predict it.

    Returns:
        Rows with ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 per
        example) and ``seq_lens`` (example lengths, summing to the row length).

    Raises:
        ValueError: bad ``seq_length``; an example longer than it (``ExampleTooLong``);
            ``input_ids``/``labels`` of different lengths.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
    rows: list[dict] = []
    cur: dict | None = None
    for k, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n or n == 0:
            raise ValueError(f"example {k}: input_ids ({n}) and labels ({len(ex['labels'])}) "
                             "must be non-empty and of equal length")
        if n > seq_length:
            raise ExampleTooLong(n, seq_length)
        if cur is None or len(cur["input_ids"]) + n > seq_length:
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
            rows.append(cur)
        cur["input_ids"].extend(ex["input_ids"])
        cur["labels"].append(IGNORE_INDEX)
        cur["labels"].extend(ex["labels"][1:])
        cur["position_ids"].extend(range(n))
        cur["seq_lens"].append(n)
    return rows


def collate(
    rows: Sequence[dict],
    pad_id: int,
    *,
    packing: bool,
    mask_dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row.

    Args:
        rows: examples (``packing=False``) or packed rows from :func:`pack_examples`.
        pad_id: id for padding ``input_ids`` (labels pad with -100, positions with 0).
        packing: build a block-diagonal causal mask so packed examples cannot see each other.
        mask_dtype: floating dtype of the packed mask; pass the model's dtype (sdpa needs it
            to match the query dtype or be float32).
        sliding_window: the model's ``config.sliding_window`` (packed mask only), so the
            explicit mask matches what transformers would build itself.

    Returns:
        ``input_ids``/``labels``/``position_ids`` of shape ``(B, T)`` (long) and
        ``attention_mask``: ``(B, T)`` long 1/0 padding mask without packing, or with
        packing an additive ``(B, 1, T, T)`` mask (0 = attend, ``finfo(mask_dtype).min``
        = blocked) that transformers 5 passes unchanged to eager and sdpa attention.

    Raises:
        ValueError: empty batch, a row holding several examples with ``packing=False``,
            a non-floating ``mask_dtype``, or a bad ``sliding_window``.
    """
    if not rows:
        raise ValueError("rows must be a non-empty list of examples")
    if not (isinstance(mask_dtype, torch.dtype) and mask_dtype.is_floating_point):
        raise ValueError(f"mask_dtype must be a floating torch dtype, got {mask_dtype!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool)
                                       or not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    # segment id per token; padding gets unique negative ids so it only sees itself
    segments = -1 - torch.arange(T).repeat(B, 1)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        seq_lens = list(r.get("seq_lens", [n]))
        if sum(seq_lens) != n or len(r["labels"]) != n:
            raise ValueError(f"row {b}: seq_lens {seq_lens} / labels ({len(r['labels'])}) "
                             f"do not match {n} input_ids")
        if len(seq_lens) > 1 and not packing:
            raise ValueError(f"row {b} holds {len(seq_lens)} packed examples; use packing=True")
        input_ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
        pos = r.get("position_ids")
        position_ids[b, :n] = torch.tensor(pos, dtype=torch.long) if pos is not None else torch.arange(n)
        segments[b, :n] = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    if not packing:
        attention_mask = (segments >= 0).long()
    else:
        q = torch.arange(T)
        allowed = (segments[:, :, None] == segments[:, None, :]) & (q[None, :, None] >= q[None, None, :])
        if sliding_window is not None:
            allowed &= (q[None, :, None] - q[None, None, :]) < sliding_window
        attention_mask = torch.zeros((B, 1, T, T), dtype=mask_dtype)
        attention_mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": attention_mask}


def batches(
    rows: Sequence[Any] | int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[list[int]]:
    """Index batches for one epoch; the order depends only on ``(seed, epoch, len(rows))``.

    Uses ``numpy.random.default_rng([seed, epoch])``, so it is independent of any global
    RNG state and reproducible across runs and machines.

    Args:
        rows: the rows (only ``len`` is used) or their count.
        batch_size: rows per batch; the last batch may be smaller unless ``drop_last``.

    Returns:
        Lists of row indices.

    Raises:
        ValueError: ``batch_size`` < 1, negative ``seed``/``epoch``.
    """
    n = rows if isinstance(rows, int) else len(rows)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for name, v in (("seed", seed), ("epoch", epoch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist() if shuffle else list(range(n))
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]
