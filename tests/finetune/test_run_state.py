"""The run's state between steps: what a checkpoint stores, the logging window, seeding."""

import random

import numpy as np
import pytest
import torch

from lora_phi3.finetune.run_state import LogWindow, TrainState, set_seed


def test_train_state_round_trips_and_ignores_the_checkpoints_other_keys():
    state = TrainState(step=7, train_tokens=1234, train_seconds=5.5, base_eval_loss=None)
    saved = {**state.to_dict(), "seed": 3, "world_size": 2}  # as trainer_state.json holds it
    assert TrainState.from_dict(saved) == state
    assert state.to_dict() == {"step": 7, "train_tokens": 1234, "train_seconds": 5.5,
                               "base_eval_loss": None, "base_eval_accuracy": None,
                               "base_eval_accuracy_per_task": {}}
    scored = TrainState(step=7, base_eval_accuracy=0.25, base_eval_accuracy_per_task={"add": 0.5})
    assert TrainState.from_dict(scored.to_dict()) == scored


def test_train_state_from_a_checkpoint_before_accuracy_existed_loads():
    old = {"step": 3, "train_tokens": 10, "train_seconds": 1.0, "base_eval_loss": 2.0}
    assert TrainState.from_dict(old) == TrainState(step=3, train_tokens=10, train_seconds=1.0,
                                                   base_eval_loss=2.0)


def test_train_state_from_a_checkpoint_missing_a_field_is_refused():
    with pytest.raises(KeyError, match="train_seconds"):
        TrainState.from_dict({"step": 1, "train_tokens": 2, "base_eval_loss": 0.5})


def test_log_window_rate_and_empty_window():
    w = LogWindow(loss_sum=6.0, label_tokens=3, tokens=500, seconds=2.0)
    assert w.tokens_per_second() == 250.0
    assert LogWindow().tokens_per_second() == 0.0  # no division by zero before the first step


def test_set_seed_makes_python_numpy_and_torch_repeat():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()
    set_seed(11)
    first = draw()
    set_seed(11)
    assert draw() == first
    set_seed(12)
    assert draw() != first
