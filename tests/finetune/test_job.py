"""The whole job (``finetune`` / ``FinetuneJob``): outputs and their permissions, the train state in
checkpoints, accumulation and DDP equivalence, and exact resume after ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_phi3 import read_adapter
from lora_phi3.finetune import finetune
from lora_phi3.finetune.checkpoint import find_latest_checkpoint, list_checkpoints
from lora_phi3.finetune.cli import main
from lora_phi3.finetune.job import FinetuneJob, TrainState
from runs import bundled_subset, child_env, small_recipe

# Small runs of the real CLI path; dropout 0 so that different batch splits are comparable.
# Two steps, checkpoint after the first. Adapters are compared after step 1 (atol 1e-6) and the
# pre-optimizer quantities of both steps (global loss, gradient norm) to rel 1e-6. The adapter after
# step 2 is not compared at 1e-6: B starts at 0, so many gradient elements are ~1e-9, the size of
# Adam's eps, where the update lr * g / (sqrt(v) + eps) passes float-summation noise of g (which
# differs between one and two processes) through almost undamped; step 1's tiny lr keeps that
# below 1e-6, and any real difference in the update direction would show as ~lr = 3e-5. (The lr was
# 1e-4 with the random-init demo model; with the pretrained one, that step-1 noise moved step 2's
# gradient norm by 1.2e-6 relative, so the lr went down rather than the tolerance up.)
RUN = ["--max-steps", "2", "--max-seq-length", "128", "--eval-steps", "0", "--save-steps", "1",
       "--lora-dropout", "0", "--learning-rate", "3e-5", "--logging-steps", "1", "--no-progress",
       "--log-level", "WARNING", "--device", "cpu"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """The first 96 bundled training and 16 held-out conversations (keeps the runs quick)."""
    return bundled_subset(tmp_path_factory.mktemp("data"), 96, 16)


def _train_records(out: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["type"] == "train"]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return read_adapter(path)[1]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"
    # the runs did train: B moved away from its zero init
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


# -- whole runs through the CLI --------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_data) -> Path:
    """One process, batch 4, no accumulation."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["finetune", "--output-dir", str(out), "--data", small_data, "--batch-size", "4",
                 *RUN]) == 0
    return out


def _same_run(a: Path, b: Path) -> None:
    _assert_same(_adapter(a / "checkpoint-1"), _adapter(b / "checkpoint-1"), atol=1e-6)
    # loss and pre-clipping gradient norm of both steps: scale-sensitive (Adam's update is not)
    ra, rb = _train_records(a), _train_records(b)
    assert [r[0] for r in ra] == [r[0] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        assert x[1] == pytest.approx(y[1], rel=1e-6) and x[2] == pytest.approx(y[2], rel=1e-6)


def test_cli_accumulation_equals_batch(reference_run, small_data, tmp_path):
    assert main(["finetune", "--output-dir", str(tmp_path), "--data", small_data, "--batch-size",
                 "2", "--gradient-accumulation-steps", "2", *RUN]) == 0
    _same_run(tmp_path, reference_run)


def test_two_gloo_processes_match_one_process_with_twice_the_batch(reference_run, small_data,
                                                                   tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lora_phi3.finetune.cli", "finetune", "--output-dir", str(tmp_path), "--data", small_data,
           "--batch-size", "2", *RUN]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "summary.json").read_text()
    assert '"world_size": 2' in summary and '"global_batch_size": 4' in summary
    _same_run(tmp_path, reference_run)


def test_resume_after_kill_9_reproduces_the_uninterrupted_run(small_data, tmp_path):
    # dropout > 0 so that the restored RNG state matters
    args = ["--data", small_data, "--max-steps", "32", "--batch-size", "2", "--max-seq-length", "64",
            "--save-steps", "8", "--eval-steps", "0", "--lora-dropout", "0.1",
            "--no-progress", "--log-level", "WARNING"]
    killed = tmp_path / "killed"
    # The child kills itself with SIGKILL as step 19 starts (after checkpoint-16, before 24), so
    # the kill lands at the same place however loaded the machine is: no race with a poll loop.
    kill_at_step_19 = (
        "import os, signal, sys\n"
        "import lora_phi3.finetune.job\n"
        "ft = sys.modules['lora_phi3.finetune.job']  # the package re-exports the function by name\n"
        "real_step, calls = ft.train_step, [0]\n"
        "def step_or_die(*a, **k):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 19:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_step(*a, **k)\n"
        "ft.train_step = step_or_die\n"
        "from lora_phi3.finetune.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", kill_at_step_19, "finetune", "--output-dir",
                           str(killed), *args], env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (killed / "summary.json").exists()
    first = find_latest_checkpoint(killed)
    assert first is not None and first.name == "checkpoint-16"

    assert main(["finetune", "--output-dir", str(killed), "--resume", *args]) == 0
    metrics = (killed / "metrics.jsonl").read_text()
    assert f'"checkpoint": "{first.name}"' in metrics and '"type": "resume"' in metrics
    straight = tmp_path / "straight"
    assert main(["finetune", "--output-dir", str(straight), *args]) == 0
    _assert_same(_adapter(killed / "adapter"), _adapter(straight / "adapter"), atol=1e-6)
    # save_total_limit of the demo recipe (2) rotated the older checkpoints away
    assert len(list_checkpoints(killed)) == 2


def test_resume_refuses_a_different_global_batch(small_data, tmp_path):
    args = ["--output-dir", str(tmp_path), "--data", small_data, "--max-steps", "3", "--save-steps", "2",
            "--max-seq-length", "64", "--batch-size", "2", "--eval-steps", "0", "--no-progress",
            "--log-level", "WARNING"]
    assert main(["finetune", *args, "--resume"]) == 0  # nothing to resume yet: starts from scratch
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    with pytest.raises(SystemExit) as e:
        main(["finetune", *args, "--resume", "--gradient-accumulation-steps", "2"])
    assert e.value.code == 2


# -- outputs -----------------------------------------------------------------------------------------
SUMMARY_KEYS = {"model", "demo", "base_eval_loss", "base_eval_perplexity", "final_eval_loss",
                "final_eval_perplexity", "steps", "epochs", "global_batch_size", "world_size",
                "train_tokens", "train_seconds", "tokens_per_second", "peak_memory_bytes",
                "peak_memory_kind", "seconds", "trainable_parameters", "total_parameters", "data",
                "base_eval_accuracy", "final_eval_accuracy", "eval_accuracy_rows",
                "eval_accuracy_per_task", "samples", "sample"}


def test_summary_and_checkpoint_state_hold_the_train_state(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary.keys() == SUMMARY_KEYS
    assert summary["steps"] == 2 and summary["world_size"] == 1
    state = json.loads((reference_run / "checkpoint-1" / "trainer_state.json").read_text())
    assert state.keys() == {"step", "train_tokens", "train_seconds", "base_eval_loss",
                            "base_eval_accuracy", "base_eval_accuracy_per_task", "seed",
                            "global_batch_size", "n_rows", "total_steps", "world_size",
                            "data_position"}
    restored = TrainState.from_dict(state)
    assert restored.step == 1 and 0 < restored.train_tokens < summary["train_tokens"]
    assert restored.base_eval_loss == summary["base_eval_loss"]
    assert restored.base_eval_accuracy == summary["base_eval_accuracy"] is not None
    assert restored.base_eval_accuracy_per_task == {
        t: v["base"] for t, v in summary["eval_accuracy_per_task"].items()}
    assert TrainState.from_dict(restored.to_dict()) == restored


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_every_file_the_job_writes_gets_0666_minus_the_umask(small_data, tmp_path):
    """Under umask 022 every file is 0644 and every directory 0755, also after a resume (which
    rewrites metrics.jsonl), as ``open()`` and ``mkdir()`` would make them."""
    out = tmp_path / "run"
    recipe = small_recipe(small_data, out, max_steps=2, save_steps=1, max_seq_length=128,
                          save_total_limit=0)
    old = os.umask(0o022)
    try:
        finetune(recipe, progress=False, device="cpu")
        finetune(recipe, resume=True, progress=False, device="cpu")
    finally:
        os.umask(old)
    modes = _modes(out)
    for name in ("summary.json", "recipe.json", "metrics.jsonl", "adapter/adapter.safetensors",
                 "loss_curve.svg", "checkpoint-1/trainer_state.json", "checkpoint-1/optimizer.pt",
                 "checkpoint-1/adapter.safetensors", "checkpoint-1/adapter_config.json"):
        assert name in modes, name
    wrong = {n: oct(m) for n, m in modes.items()
             if m != (0o755 if (out / n).is_dir() else 0o644)}
    assert not wrong, wrong


def test_the_job_runs_step_by_step(small_data, tmp_path):
    """``finetune`` is ``FinetuneJob.run``: setup, train, finish, cleanup, with the state in
    attributes that a caller can inspect between the steps."""
    recipe = small_recipe(small_data, tmp_path, max_steps=2, save_steps=0, max_seq_length=128)
    job = FinetuneJob(recipe, progress=False, device="cpu")
    try:
        job.setup()
        assert job.state.step == 0 and job.state.base_eval_loss is not None
        assert job.plan.total_steps == 2 and job.params
        job.train()
        assert job.state.step == 2 and job.state.train_tokens > 0
        assert not list_checkpoints(tmp_path)  # save_steps 0: no checkpoint
        loss = job.evaluate(job.state.step)
        summary = job.finish()
    finally:
        job.cleanup()
    assert summary["final_eval_loss"] == pytest.approx(loss)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 2, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
