"""What ``summary.json`` holds: base and final exact match per task, merged from the base state
and the final report, and the run's totals taken from the job."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch.nn as nn

from lora_phi3.finetune.accuracy import AccuracyReport
from lora_phi3.finetune.conversations import DataReport
from lora_phi3.finetune.dataset import TrainingData
from lora_phi3.finetune.distributed import DistState
from lora_phi3.finetune.run_state import TrainState
from lora_phi3.finetune.summary import accuracy_summary, run_summary
from lora_phi3.finetune.train import StepPlan


def _sample(task, correct):
    return {"prompt": "q", "reference": "a", "answer": "a" if correct else "b",
            "correct": correct, "task": task}


def test_accuracy_summary_joins_base_and_final_per_task():
    final = AccuracyReport.from_samples([_sample("add", True), _sample("add", False),
                                         _sample("sort", True)])
    out = accuracy_summary(0.25, {"add": 0.5, "capital": 0.0}, final)
    assert out == {"base_eval_accuracy": 0.25, "final_eval_accuracy": 2 / 3,
                   "eval_accuracy_rows": 3,
                   "eval_accuracy_per_task": {"add": {"base": 0.5, "final": 0.5},
                                              "capital": {"base": 0.0, "final": None},
                                              "sort": {"base": None, "final": 1.0}}}
    assert accuracy_summary(None, {}, None) == {
        "base_eval_accuracy": None, "final_eval_accuracy": None, "eval_accuracy_rows": None,
        "eval_accuracy_per_task": {}}


def test_run_summary_reads_the_job():
    model = nn.Linear(3, 2)
    model.bias.requires_grad = False
    state = TrainState(step=6, train_tokens=600, train_seconds=2.0, base_eval_loss=2.0,
                       base_eval_accuracy=0.0, base_eval_accuracy_per_task={"add": 0.0})
    report = DataReport(source="d.jsonl", rows_read=10, kept=9, skipped=1, too_long=1)
    job = SimpleNamespace(
        state=state, plan=StepPlan(global_batch_size=4, steps_per_epoch=3, total_steps=6, n_rows=12),
        dist=DistState(), data=TrainingData([{}] * 12, [{}] * 2, [], report), model=model,
        recipe=SimpleNamespace(model=None, is_demo=True), t0=time.time(),
        accuracy=AccuracyReport.from_samples([_sample("add", True)]))
    out = run_summary(job, final_loss=1.0)
    assert out["model"] == "embedded-tiny-phi3" and out["demo"] is True
    assert (out["base_eval_loss"], out["final_eval_loss"]) == (2.0, 1.0)
    assert out["eval_accuracy_per_task"] == {"add": {"base": 0.0, "final": 1.0}}
    assert (out["steps"], out["epochs"], out["tokens_per_second"]) == (6, 2.0, 300.0)
    assert (out["trainable_parameters"], out["total_parameters"]) == (6, 8)
    assert out["data"] == {"source": "d.jsonl", "rows_read": 10, "kept": 9, "skipped": 1,
                           "too_long": 1, "train_rows": 12, "eval_rows": 2}
    assert out["peak_memory_bytes"] > 0 and out["peak_memory_kind"] == "cpu_max_rss"
