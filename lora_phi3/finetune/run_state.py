"""A run's state between steps: the loop's position and totals (what a checkpoint stores), the
logging window, and the seeding that makes a run reproducible."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["TrainState", "LogWindow", "set_seed"]


def set_seed(seed: int) -> None:
    """Seed Python ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """The loop's position and running totals: saved in every checkpoint, restored on resume."""

    step: int = 0                        # optimizer steps done
    train_tokens: int = 0                # tokens (labels or not) of every global batch so far
    train_seconds: float = 0.0           # time inside train_step, summed
    base_eval_loss: float | None = None  # eval loss before training (None: no eval data)
    base_eval_accuracy: float | None = None  # exact match before training (None: not scored)
    base_eval_accuracy_per_task: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        """The fields of ``data`` (a checkpoint's ``trainer_state``, which holds more keys; the
        accuracy fields are absent from checkpoints written before they existed)."""
        optional = ("base_eval_accuracy", "base_eval_accuracy_per_task")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)
                      if f.name in data or f.name not in optional})


@dataclass
class LogWindow:
    """Training records since the last logged step (the logged loss is their token mean)."""

    loss_sum: float = 0.0
    label_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)
