"""The job's evaluation (``Evaluator``): held-out loss as ``train.evaluate`` gives it, and exact
match on a fixed first-N subset of the held-out chats, labelled by task, or nothing when off."""

from __future__ import annotations

import pytest
import torch

from lora_phi3.finetune.conversations import DataReport
from lora_phi3.finetune.data import tokenize_dataset
from lora_phi3.finetune.dataset import TrainingData
from lora_phi3.finetune.distributed import DistState
from lora_phi3.finetune.evaluation import Evaluator
from lora_phi3.finetune.models import build_tiny_phi3
from lora_phi3.finetune.recipe import TrainingConfig
from lora_phi3.finetune.train import CausalLMLoss, evaluate

CHATS = [[{"role": "user", "content": f"What comes after {n}?"},
          {"role": "assistant", "content": str(n + 1)}] for n in range(5)]
TASKS = ["next", "next", None, "next", "next"]


def _evaluator(tok, **training):
    model = build_tiny_phi3(len(tok), num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                            num_attention_heads=2, num_key_value_heads=1,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    locs = [f"eval.jsonl:{i + 1}" for i in range(len(CHATS))]
    report = DataReport(eval_locations=locs,
                        task_of={loc: t for loc, t in zip(locs, TASKS) if t is not None})
    rows = tokenize_dataset(tok, CHATS, 64)
    data = TrainingData(train_rows=rows, eval_rows=rows, eval_conversations=CHATS, report=report)
    cfg = TrainingConfig(batch_size=2, packing=False, bf16=False, **training)
    loss_module = CausalLMLoss(model)
    ev = Evaluator(loss_module, model, tok, data, cfg, DistState(), use_bf16=False,
                   mask_dtype=torch.float32, sliding_window=None)
    return ev, loss_module, data


def test_loss_is_train_evaluate_on_the_eval_rows(tok):
    ev, loss_module, data = _evaluator(tok)
    expected = evaluate(loss_module, data.eval_rows, batch_size=2, pad_id=tok.pad_token_id,
                        packing=False, dist=DistState())
    assert ev.loss() == expected and expected[1] > 0


def test_accuracy_scores_the_first_rows_in_order_with_their_task_labels(tok):
    ev, _, data = _evaluator(tok, eval_accuracy=True, eval_accuracy_rows=4)
    assert data.eval_tasks == TASKS
    report = ev.accuracy()
    assert report.total == 4
    assert [s["prompt"] for s in report.samples] == [c[0]["content"] for c in CHATS[:4]]
    assert [s["task"] for s in report.samples] == TASKS[:4]
    assert set(report.per_task) == {"next"}  # the unlabelled row counts only overall
    all_rows = _evaluator(tok, eval_accuracy=True, eval_accuracy_rows=0)[0].accuracy()
    assert all_rows.total == len(CHATS)


@pytest.mark.parametrize("training", [{"eval_accuracy": False}, {}])
def test_accuracy_is_none_when_off(tok, training):
    ev, _, _ = _evaluator(tok, **training)  # TrainingConfig's default is off (real models)
    assert ev.accuracy() is None
