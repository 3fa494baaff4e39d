"""What ``summary.json`` holds: a finished run's results in one document.

Every number in it is measured in this run: losses and exact match before and after training (per
task type where the data labels tasks), throughput, peak memory and the data counts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .distributed import all_gather_objects
from .models import count_parameters
from .reporting import peak_memory_bytes, perplexity

if TYPE_CHECKING:
    from .job import FinetuneJob

__all__ = ["run_summary", "accuracy_summary"]


def run_summary(job: "FinetuneJob", final_loss: float | None) -> dict[str, Any]:
    """The summary of ``job`` after its final evaluation (a collective call: every rank)."""
    state, plan, dist, data = job.state, job.plan, job.dist, job.data
    peak, peak_kind = peak_memory_bytes(dist.device)
    peaks = all_gather_objects(peak, dist)
    report = data.report
    return {
        "model": job.recipe.model or "embedded-tiny-phi3", "demo": job.recipe.is_demo,
        "base_eval_loss": state.base_eval_loss,
        "base_eval_perplexity": perplexity(state.base_eval_loss),
        "final_eval_loss": final_loss, "final_eval_perplexity": perplexity(final_loss),
        **accuracy_summary(state.base_eval_accuracy, state.base_eval_accuracy_per_task,
                           job.accuracy),
        "steps": state.step, "epochs": round(state.step / plan.steps_per_epoch, 4),
        "global_batch_size": plan.global_batch_size, "world_size": dist.world_size,
        "train_tokens": state.train_tokens, "train_seconds": round(state.train_seconds, 3),
        "tokens_per_second": state.train_tokens / max(state.train_seconds, 1e-9),
        "peak_memory_bytes": max(peaks), "peak_memory_kind": peak_kind,
        "seconds": round(time.time() - job.t0, 3),
        "trainable_parameters": count_parameters(job.model, trainable_only=True),
        "total_parameters": count_parameters(job.model),
        "data": {"source": report.source, "rows_read": report.rows_read, "kept": report.kept,
                 "skipped": report.skipped, "too_long": report.too_long,
                 "train_rows": len(data.train_rows), "eval_rows": len(data.eval_rows)},
    }


def accuracy_summary(base: float | None, base_per_task: dict[str, float],
                     final: Any) -> dict[str, Any]:
    """Base and final exact match, overall and per task type; None where not scored.

    Args:
        base: the base model's accuracy; base_per_task: its per-task accuracy.
        final: the final evaluation's :class:`~.accuracy.AccuracyReport`, or None.
    """
    final_per_task = final.per_task if final is not None else {}
    tasks = sorted(set(base_per_task) | set(final_per_task))
    return {"base_eval_accuracy": base,
            "final_eval_accuracy": None if final is None else final.accuracy,
            "eval_accuracy_rows": None if final is None else final.total,
            "eval_accuracy_per_task": {t: {"base": base_per_task.get(t),
                                           "final": final_per_task.get(t)} for t in tasks}}
