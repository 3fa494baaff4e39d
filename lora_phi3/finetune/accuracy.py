"""Exact-match accuracy of greedy chat answers on held-out conversations.

Loss says how probable the references are; accuracy says whether the model's own answers are
right. For each conversation the model answers its last assistant turn, given every message before
it (the reference history, as in the loss), greedily and chat-templated; the answer counts when it
equals the reference after stripping surrounding whitespace. Prompts are generated in left-padded
batches, so scoring 200 held-out chats of the demo takes seconds, not minutes.

Works with any causal LM and fast tokenizer with a chat template (the embedded demo, Phi-3-mini,
your own data)::

    from lora_phi3.finetune import exact_match_accuracy
    report = exact_match_accuracy(model, tokenizer, held_out_chats, tasks=task_labels)
    print(report.accuracy, report.per_task)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn

from .generate import generate_answers, scored_turn

__all__ = ["exact_match_accuracy", "AccuracyReport"]

#: Tokens generated beyond the longest reference of a batch (a right answer then needs at most one
#: more, its stop token; the margin covers a different token split of the same text).
_EXTRA_TOKENS = 8


@dataclass
class AccuracyReport:
    """Exact-match results.

    Attributes:
        correct: answers equal to their reference.
        total: answers scored.
        per_task: ``{task: accuracy}`` for conversations with a task label (empty without labels).
        samples: one ``{"prompt", "reference", "answer", "correct", "task"}`` per scored answer,
            in input order (``prompt`` is the last user message).
    """

    correct: int = 0
    total: int = 0
    per_task: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        """``correct / total``; None when nothing was scored."""
        return self.correct / self.total if self.total else None

    @classmethod
    def from_samples(cls, samples: Sequence[dict]) -> "AccuracyReport":
        """Totals and per-task accuracy of scored samples (e.g. gathered from several ranks)."""
        hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for s in samples:
            if s.get("task") is not None:
                hits[s["task"]][0] += bool(s["correct"])
                hits[s["task"]][1] += 1
        return cls(correct=sum(bool(s["correct"]) for s in samples), total=len(samples),
                   per_task={t: c / n for t, (c, n) in sorted(hits.items())},
                   samples=list(samples))


def exact_match_accuracy(model: nn.Module, tokenizer, conversations: Sequence[Sequence[dict]], *,
                         tasks: Sequence[str | None] | None = None, batch_size: int = 64,
                         max_new_tokens: int | None = None) -> AccuracyReport:
    """Score greedy answers to the last assistant turn of each conversation by exact match.

    Args:
        model: a causal LM with ``generate`` (train/eval mode is restored afterwards).
        tokenizer: its fast tokenizer, with a chat template and a pad token.
        conversations: ``[{"role", "content"}, ...]`` lists; those without an assistant turn after
            another message are skipped.
        tasks: optional label per conversation (same length), for ``per_task``.
        batch_size: prompts generated together (>= 1).
        max_new_tokens: longest answer; default: the batch's longest reference plus 8 tokens.

    Returns:
        An :class:`AccuracyReport`.

    Raises:
        ValueError: ``tasks`` of another length than ``conversations``, or a bad ``batch_size`` /
            ``max_new_tokens``.
    """
    if tasks is not None and len(tasks) != len(conversations):
        raise ValueError(f"tasks must give one label per conversation: {len(tasks)} labels for "
                         f"{len(conversations)} conversations")
    for name, value, optional in (("batch_size", batch_size, False),
                                  ("max_new_tokens", max_new_tokens, True)):
        if (value is not None or not optional) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    items = []
    for i, conv in enumerate(conversations):
        turn = scored_turn(conv)
        if turn is not None:
            items.append((*turn, tasks[i] if tasks is not None else None))
    samples: list[dict] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        limit = max_new_tokens or _EXTRA_TOKENS + max(
            len(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r, _ in chunk)
        answers = generate_answers(model, tokenizer, [p for p, _, _ in chunk],
                                   max_new_tokens=limit)
        for (prompt, ref, task), answer in zip(chunk, answers):
            samples.append({"prompt": prompt[-1]["content"], "reference": ref, "answer": answer,
                            "correct": answer.strip() == ref.strip(), "task": task})
    return AccuracyReport.from_samples(samples)
