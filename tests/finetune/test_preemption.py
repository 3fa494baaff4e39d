"""SIGTERM / SIGINT stop training at a step boundary with a checkpoint
(``lora_phi3/finetune/preemption.py``): exit status 128 + signum, a second signal during the write
ignored, ``--resume`` bit-exact, and ``finetune()`` raising ``TrainingInterrupted``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from lora_phi3 import read_adapter
from lora_phi3.finetune.checkpoint import list_checkpoints
from lora_phi3.finetune.cli import main
from lora_phi3.finetune.job import FinetuneJob, TrainingInterrupted
from runs import bundled_subset, child_env, small_recipe



@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """The first 48 bundled training and 8 held-out conversations (keeps the runs quick)."""
    return bundled_subset(tmp_path_factory.mktemp("data"), 48, 8)


# The child sends itself SIGTERM as step 5 starts, and SIGINT again while the checkpoint is written.
TERM_AT_STEP_5 = (
    "import os, signal, sys\n"
    "import lora_phi3.finetune.job\n"
    "import lora_phi3.finetune.checkpoint as ckpt\n"
    "ft = sys.modules['lora_phi3.finetune.job']\n"
    "real_step, calls = ft.train_step, [0]\n"
    "def step_or_term(*a, **k):\n"
    "    calls[0] += 1\n"
    "    if calls[0] == 5:\n"
    "        os.kill(os.getpid(), signal.SIGTERM)\n"
    "    return real_step(*a, **k)\n"
    "ft.train_step = step_or_term\n"
    "real_save = ckpt.save_checkpoint\n"
    "def save_under_fire(*a, **k):\n"
    "    os.kill(os.getpid(), signal.SIGINT)\n"
    "    return real_save(*a, **k)\n"
    "ckpt.save_checkpoint = save_under_fire\n"
    "from lora_phi3.finetune.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def test_sigterm_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(small_data, tmp_path):
    # dropout > 0 so that the restored RNG state matters; --save-steps 0: no periodic checkpoint
    args = ["--data", small_data, "--max-steps", "10", "--batch-size", "2", "--max-seq-length", "64",
            "--save-steps", "0", "--eval-steps", "0", "--lora-dropout", "0.1", "--logging-steps", "3",
            "--no-progress", "--log-level", "WARNING", "--device", "cpu"]
    stopped = tmp_path / "stopped"
    proc = subprocess.run([sys.executable, "-c", TERM_AT_STEP_5, "finetune", "--output-dir",
                           str(stopped), *args], env=child_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM == 143, proc.stderr[-2000:]
    assert (f"lora-phi3 finetune: stopped by SIGTERM after step 5 of 10; checkpoint written to "
            f"{stopped / 'checkpoint-5'}. To continue, run the same command again with --resume"
            ) in proc.stderr
    assert "SIGINT received again: still stopping" in proc.stderr
    assert [s for s, _ in list_checkpoints(stopped)] == [5]
    assert not (stopped / "summary.json").exists() and not (stopped / "adapter").exists()
    records = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [3, 5]  # the open window too

    assert main(["finetune", "--output-dir", str(stopped), "--resume", *args]) == 0
    straight = tmp_path / "straight"
    assert main(["finetune", "--output-dir", str(straight), *args]) == 0
    a, b = read_adapter(stopped / "adapter")[1], read_adapter(straight / "adapter")[1]
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= 1e-6, worst
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


def test_finetune_raises_training_interrupted_and_restores_the_handlers(small_data, tmp_path,
                                                                          monkeypatch):
    import lora_phi3.finetune.job as job_module

    real_step, calls = job_module.train_step, [0]

    def step_or_interrupt(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)

    monkeypatch.setattr(job_module, "train_step", step_or_interrupt)
    received: list[int] = []

    def mine(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGINT, mine)
    try:
        recipe = small_recipe(small_data, tmp_path, max_steps=4, save_steps=0, max_seq_length=64)
        job = FinetuneJob(recipe, progress=False, device="cpu")
        with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 2 of 4") as e:
            job.run()
        assert signal.getsignal(signal.SIGINT) is mine  # restored when the job ended
    finally:
        signal.signal(signal.SIGINT, previous)
    assert received == []  # the job took the signal, not the handler it replaced
    assert (e.value.step, e.value.signum, e.value.exit_status) == (2, signal.SIGINT, 130)
    assert e.value.checkpoint == tmp_path / "checkpoint-2" and e.value.checkpoint.is_dir()
    assert not job.lock.held and not (tmp_path / ".lora-phi3.lock").exists()


# Only rank 1 gets the signal, as step 3 starts; rank 0 must stop after the same step.
TERM_RANK_1_AT_STEP_3 = (
    "import os, signal, sys\n"
    "import lora_phi3.finetune.job\n"
    "ft = sys.modules['lora_phi3.finetune.job']\n"
    "real_step, calls = ft.train_step, [0]\n"
    "def step_or_term(*a, **k):\n"
    "    calls[0] += 1\n"
    "    if calls[0] == 3 and os.environ['RANK'] == '1':\n"
    "        os.kill(os.getpid(), signal.SIGTERM)\n"
    "    return real_step(*a, **k)\n"
    "ft.train_step = step_or_term\n"
    "from lora_phi3.finetune.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def test_under_torchrun_every_rank_stops_after_the_same_step(small_data, tmp_path):
    script = tmp_path / "term_rank_1.py"
    script.write_text(TERM_RANK_1_AT_STEP_3)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "finetune", "--output-dir", str(out), "--data", small_data, "--max-steps",
           "6", "--batch-size", "2", "--max-seq-length", "64", "--save-steps", "0", "--eval-steps",
           "0", "--no-progress", "--log-level", "WARNING", "--device", "cpu"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # rank 0 received nothing, yet stopped at rank 1's step and wrote the checkpoint
    assert "stopped by SIGTERM after step 3 of 6" in proc.stderr, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [3]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2
    assert not (out / "adapter").exists() and not (out / ".lora-phi3.lock").exists()
