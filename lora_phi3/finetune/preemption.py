"""Stopping on SIGTERM / SIGINT at a step boundary, with a checkpoint, instead of dying mid-step.

Spot and preemptible machines send SIGTERM and allow a grace period; Ctrl-C sends SIGINT. While
:class:`StopSignals` is installed (around the training loop), either signal only records that a
stop was asked for: the current optimizer step finishes, every rank agrees on the step to stop at
(:meth:`StopSignals.agreed`, one all-reduce of a small integer per step), the job writes a
checkpoint and raises :class:`TrainingInterrupted`. A second signal while that happens is logged
and ignored, so it cannot cut the checkpoint write short (which is atomic anyway). The CLI turns
the exception into the conventional exit status, 128 + the signal number (143 for SIGTERM, 130 for
SIGINT); ``--resume`` continues bit-exact from the checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from .distributed import DistState, all_reduce_max

logger = logging.getLogger(__name__)

__all__ = ["StopSignals", "TrainingInterrupted", "STOP_SIGNALS"]

#: The signals that stop training at the next step boundary.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after ``step`` optimizer steps; ``checkpoint`` holds them.

    Attributes:
        signum: the signal received (on some rank).
        step: optimizer steps done (the checkpoint's step).
        total_steps: the steps the run was planned for.
        checkpoint: the checkpoint directory written at ``step``.
        exit_status: 128 + ``signum``, what a shell reports for a process killed by the signal.
    """

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Path) -> None:
        self.signum, self.step, self.total_steps = signum, step, total_steps
        self.checkpoint = Path(checkpoint)
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of "
                         f"{total_steps}; checkpoint written to {self.checkpoint}. To continue, run "
                         "the same command again with --resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Record SIGTERM/SIGINT instead of dying, while installed (a context manager).

    Handlers can only be installed from the main thread; elsewhere this does nothing and the
    signals keep their handlers. The previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            logger.warning("%s received: stopping after the current step and writing a checkpoint",
                           name)
        else:
            logger.warning("%s received again: still stopping; the checkpoint is being written, "
                           "please wait", name)

    def agreed(self, dist: DistState) -> int | None:
        """The signal to stop for if any rank received one, else None; the same on every rank.

        A collective under torchrun: every rank must call it at the same step.
        """
        if not dist.distributed:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=dist.device)
        got = int(all_reduce_max(flag, dist).item())
        return got or None
