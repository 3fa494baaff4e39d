"""The job's evaluation: held-out loss and, when asked, exact-match accuracy of greedy answers.

Every rank evaluates its share and the results are combined, so under torchrun each evaluation
costs 1/world of the single-process time and gives the same numbers.
"""

from __future__ import annotations

import torch.nn as nn

from .accuracy import AccuracyReport, exact_match_accuracy
from .dataset import TrainingData
from .distributed import DistState, all_gather_objects
from .generate import scored_turn
from .recipe import TrainingConfig
from .train import evaluate

__all__ = ["Evaluator"]


class Evaluator:
    """Evaluates one run's model on its held-out data.

    Args:
        loss_module: the run's :class:`~.train.CausalLMLoss` (unwrapped).
        model: the adapted model, for generation.
        tokenizer: its tokenizer (chat template, pad token).
        data: the run's data (tokenised eval rows, held-out conversations and their task labels).
        cfg: the training settings (batch size, packing, bf16, ``eval_accuracy`` and
            ``eval_accuracy_rows``).
        dist: this process's place in the run.
        use_bf16: whether the run computes in bf16.
        mask_dtype, sliding_window: how packed rows are masked (as in training).
    """

    def __init__(self, loss_module: nn.Module, model: nn.Module, tokenizer, data: TrainingData,
                 cfg: TrainingConfig, dist: DistState, *, use_bf16: bool, mask_dtype,
                 sliding_window: int | None) -> None:
        self.loss_module, self.model, self.tokenizer = loss_module, model, tokenizer
        self.data, self.cfg, self.dist = data, cfg, dist
        self.use_bf16, self.mask_dtype, self.sliding_window = use_bf16, mask_dtype, sliding_window

    def loss(self) -> tuple[float | None, int]:
        """Token-mean held-out loss and the label-token count (all ranks)."""
        return evaluate(self.loss_module, self.data.eval_rows, batch_size=self.cfg.batch_size,
                        pad_id=self.tokenizer.pad_token_id, packing=self.cfg.packing,
                        dist=self.dist, bf16=self.use_bf16, mask_dtype=self.mask_dtype,
                        sliding_window=self.sliding_window)

    def accuracy(self) -> AccuracyReport | None:
        """Exact match on the first ``eval_accuracy_rows`` held-out conversations (0: all), each
        rank answering every world-th one; None when ``eval_accuracy`` is off or there is no
        held-out conversation."""
        cfg, dist = self.cfg, self.dist
        convs = self.data.eval_conversations
        if not cfg.eval_accuracy or not convs:
            return None
        n = len(convs) if cfg.eval_accuracy_rows == 0 else min(cfg.eval_accuracy_rows, len(convs))
        tasks = self.data.eval_tasks
        mine = list(range(dist.rank, n, dist.world_size))
        report = exact_match_accuracy(self.model, self.tokenizer, [convs[i] for i in mine],
                                      tasks=[tasks[i] for i in mine])
        # Conversations with nothing to score are left out of samples; keep the index of the rest.
        scored = [i for i in mine if scored_turn(convs[i]) is not None]
        gathered = all_gather_objects(list(zip(scored, report.samples)), dist)
        pairs = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
        return AccuracyReport.from_samples([sample for _, sample in pairs])

