"""A run's training and evaluation rows: conversations loaded, tokenised and (optionally) packed.

The three stages live in :mod:`.conversations`, :mod:`.data` and :mod:`.packing`; this module
chains them as a recipe says, for the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .conversations import DataReport, load_conversations
from .data import tokenize_dataset
from .packing import pack_examples
from .recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = ["TrainingData", "prepare_data"]


@dataclass
class TrainingData:
    """The rows a run trains and evaluates on, with what the summary reports about them."""

    train_rows: list[dict]
    eval_rows: list[dict]
    eval_conversations: list[list[dict]]  # held-out chats, for accuracy and the sample answer
    report: DataReport

    @property
    def eval_tasks(self) -> list[str | None]:
        """The ``"task"`` label of each held-out conversation (None where the row had none)."""
        return [self.report.task_of.get(loc) for loc in self.report.eval_locations]


def prepare_data(tokenizer, recipe: Recipe) -> TrainingData:
    """Load, validate, tokenise and (with ``training.packing``) pack the recipe's data.

    Raises:
        ValueError: bad rows with ``on_bad_row="error"``, or no training example that fits
            ``max_seq_length``.
    """
    t = recipe.training
    train, evals, report = load_conversations(recipe.data, on_bad_row=t.on_bad_row,
                                              eval_fraction=t.eval_fraction, seed=t.seed)
    kw = dict(train_on_prompt=t.train_on_prompt, on_bad_row=t.on_bad_row, report=report)
    train_ex = tokenize_dataset(tokenizer, train, t.max_seq_length,
                                locations=report.train_locations, source_name="train", **kw)
    eval_ex = tokenize_dataset(tokenizer, evals, t.max_seq_length,
                               locations=report.eval_locations, source_name="eval", **kw)
    if not train_ex:
        raise ValueError(f"no training example fits max_seq_length {t.max_seq_length} "
                         f"({report.summary()})")
    if t.packing:
        train_rows = pack_examples(train_ex, t.max_seq_length)
        eval_rows = pack_examples(eval_ex, t.max_seq_length)
    else:
        train_rows, eval_rows = train_ex, eval_ex
    logger.info("data: %d train examples -> %d rows, %d eval examples -> %d rows (packing=%s)",
                len(train_ex), len(train_rows), len(eval_ex), len(eval_rows), t.packing)
    return TrainingData(train_rows, eval_rows, evals, report)
