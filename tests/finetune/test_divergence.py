"""A diverging run (issue 10, part 2): it stops at the step whose loss or gradient norm is not
finite, exits non-zero naming that step, writes no final adapter, keeps the last good checkpoint,
and every JSON file it wrote is standard JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_phi3 import TrainingDiverged, load_adapter, read_adapter
from lora_phi3.finetune import finetune
from lora_phi3.finetune.checkpoint import find_latest_checkpoint, list_checkpoints
from lora_phi3.finetune.cli import main
from lora_phi3.finetune.job import FinetuneJob
from lora_phi3.finetune.models import load_model
from lora_phi3.finetune.tokenizer import load_tokenizer
from runs import bundled_subset, child_env, small_recipe

# lr 1e4 overflows the gradients within a few steps; a checkpoint after every step.
DIVERGING = ["--learning-rate", "1e4", "--max-steps", "8", "--save-steps", "1", "--eval-steps", "0",
             "--max-seq-length", "64", "--logging-steps", "1", "--no-progress", "--log-level",
             "WARNING", "--device", "cpu"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """The first 64 bundled training and 8 held-out conversations (keeps the runs quick)."""
    return bundled_subset(tmp_path_factory.mktemp("data"), 64, 8)


def _strict(text: str):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (as jq does)."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _assert_every_json_file_is_standard(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert {"recipe.json", "metrics.jsonl", "trainer_state.json"} <= {p.name for p in files}
    for p in files:
        lines = p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]
        for line in lines:
            _strict(line)


def _assert_good_checkpoint_kept(out: Path, diverged_at: int) -> None:
    last = find_latest_checkpoint(out)
    assert last is not None and last.name == f"checkpoint-{diverged_at - 1}"
    tensors = read_adapter(last)[1]  # checksum-verified
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    model = load_model(None, tokenizer=load_tokenizer())
    load_adapter(model, last)  # loads into a fresh model; refuses a damaged file
    state = _strict((last / "trainer_state.json").read_text())
    assert state["step"] == diverged_at - 1


def test_cli_exits_non_zero_naming_the_step_and_writes_no_adapter(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--output-dir", str(out), "--data", small_data, "--batch-size", "4",
              *DIVERGING])
    assert e.value.code == 2
    err = capsys.readouterr().err
    m = re.search(r"lora-phi3 finetune: error: training diverged at step (\d+): loss \S+, "
                  r"gradient norm \S+ \(the update was not applied\); lower the learning rate "
                  r"\(--learning-rate, 10000 in this run; try 1000\) and start a new run\. No "
                  r"final adapter was written; the last good checkpoint is kept: (\S+)\n", err)
    assert m, err
    step = int(m.group(1))
    assert 1 < step < 8 and m.group(2) == str(out / f"checkpoint-{step - 1}")
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    # no checkpoint of the diverged step or later: the update was never applied
    assert [s for s, _ in list_checkpoints(out)][-1] == step - 1
    _assert_good_checkpoint_kept(out, step)
    _assert_every_json_file_is_standard(out)
    records = [_strict(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "diverged" and records[-1]["step"] == step
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, step))


def test_finetune_raises_training_diverged_with_the_step(small_data, tmp_path):
    recipe = small_recipe(small_data, tmp_path, learning_rate=1e4, max_steps=8, save_steps=1,
                          max_seq_length=64, save_total_limit=0)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: ") as e:
        finetune(recipe, progress=False, device="cpu")
    assert isinstance(e.value, ValueError) and 1 < e.value.step < 8
    assert e.value.loss is not None  # the all-reduced loss of the refused step
    assert not (tmp_path / "adapter").exists()
    # save_total_limit 0 keeps every checkpoint: all of them come before the diverged step
    assert [s for s, _ in list_checkpoints(tmp_path)] == list(range(1, e.value.step))
    _assert_good_checkpoint_kept(tmp_path, e.value.step)
    _assert_every_json_file_is_standard(tmp_path)


def test_non_finite_weights_are_never_saved(small_data, tmp_path):
    """Weights that a finite step made non-finite (a huge lr on the last step) are refused both as
    a checkpoint and as the final adapter."""
    recipe = small_recipe(small_data, tmp_path, max_steps=2, save_steps=1, max_seq_length=64)
    job = FinetuneJob(recipe, progress=False, device="cpu")
    try:
        job.setup()
        with torch.no_grad():
            job.params[0][0, 0] = float("inf")
        with pytest.raises(TrainingDiverged, match=r"at step 0: 1 trainable tensors hold NaN or "
                                                   r"inf \(.*lora_A.*\); lower the learning rate"):
            job.save_checkpoint()
        with pytest.raises(TrainingDiverged, match=r"at step 0: 1 trainable tensors hold NaN"):
            job.finish()
    finally:
        job.cleanup()
    assert not list_checkpoints(tmp_path) and not (tmp_path / "adapter").exists()
    assert not (tmp_path / "summary.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    _strict((tmp_path / "recipe.json").read_text())


def test_two_gloo_processes_stop_at_the_same_step(small_data, tmp_path):
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lora_phi3.finetune.cli", "finetune", "--output-dir", str(tmp_path), "--data",
           small_data, "--batch-size", "2", *DIVERGING]  # the same global batch of 4
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    steps = re.findall(r"lora-phi3 finetune: error: training diverged at step (\d+)", proc.stderr)
    assert len(steps) == 2 and steps[0] == steps[1], proc.stderr[-3000:]  # both ranks, one step
    step = int(steps[0])
    assert not (tmp_path / "adapter").exists()
    _assert_good_checkpoint_kept(tmp_path, step)
    _assert_every_json_file_is_standard(tmp_path)
