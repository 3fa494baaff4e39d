"""FSDP2 in the job (``--fsdp``), on CPU with gloo: two sharded processes train what one process
trains with their joint batch (fp32 base and NF4 base), checkpoints hold whole tensors, a sharded
run resumes on another process count, and a bad setup is refused before anything is loaded."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_phi3 import read_adapter
from lora_phi3.finetune.checkpoint import find_latest_checkpoint
from lora_phi3.finetune.cli import main
from runs import bundled_subset, child_env

# As in test_job.py: dropout 0, a small lr (see there why), checkpoint after step 1.
RUN = ["--max-steps", "3", "--max-seq-length", "128", "--eval-steps", "0", "--save-steps", "1",
       "--save-total-limit", "0", "--lora-dropout", "0", "--learning-rate", "3e-5",
       "--logging-steps", "1", "--no-progress", "--log-level", "WARNING", "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return bundled_subset(tmp_path_factory.mktemp("data"), 96, 16)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_data) -> Path:
    """The reference: one process, batch 4."""
    out = tmp_path_factory.mktemp("one")
    assert main(["finetune", "--output-dir", str(out), "--data", small_data, "--batch-size", "4",
                 *RUN]) == 0
    return out


def _torchrun(n: int, out: Path, data: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "--nproc_per_node", str(n), "-m", "lora_phi3.finetune.cli", "finetune",
           "--output-dir", str(out), "--data", data, *extra]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return read_adapter(path)[1]


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x - b[k]).abs().max().item() for k, x in a.items())


def _records(out: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["type"] == "train"]


def test_two_sharded_processes_train_what_one_process_trains(one_process, small_data, tmp_path):
    proc = _torchrun(2, tmp_path, small_data, "--fsdp", "--batch-size", "2", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    # whole tensors in every checkpoint and the final adapter (not rank 0's shard)
    for ckpt in ("checkpoint-1", "checkpoint-2", "adapter"):
        mine, ref = _adapter(tmp_path / ckpt), _adapter(one_process / ckpt)
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    # step 1 to 1e-6; later steps carry Adam's eps-level noise (see test_job.py), so the final
    # adapter is compared loosely and the per-step loss and gradient norm tightly
    assert _worst(_adapter(tmp_path / "checkpoint-1"), _adapter(one_process / "checkpoint-1")) <= 1e-6
    assert _worst(_adapter(tmp_path / "adapter"), _adapter(one_process / "adapter")) <= 1e-4
    # token-weighted loss and the clipped gradient norm agree step by step
    assert [r[0] for r in _records(tmp_path)] == [1, 2, 3]
    for (s1, l1, g1), (s2, l2, g2) in zip(_records(tmp_path), _records(one_process)):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6) and g1 == pytest.approx(g2, rel=1e-5)
    # the optimizer state is saved whole too: it resumes on one process (below, and here by shape)
    mine = torch.load(tmp_path / "checkpoint-1" / "optimizer.pt", weights_only=True)
    ref = torch.load(one_process / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert mine["state"].keys() == ref["state"].keys()
    for i, st in ref["state"].items():
        assert mine["state"][i]["exp_avg"].shape == st["exp_avg"].shape
        got, want = mine["state"][i]["exp_avg"], st["exp_avg"]
        # float summation order differs between 1 and 2 processes: compare at the tensor's scale
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-12


def test_sharded_accumulation_equals_one_process(one_process, small_data, tmp_path):
    # 2 processes x batch 1 x 2 micro-batches: the first micro-batch skips the reduce-scatter
    # (set_requires_gradient_sync(False)), and the step equals one process with batch 4.
    proc = _torchrun(2, tmp_path, small_data, "--fsdp", "--batch-size", "1",
                     "--gradient-accumulation-steps", "2", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _worst(_adapter(tmp_path / "checkpoint-1"), _adapter(one_process / "checkpoint-1")) <= 1e-6
    for (s1, l1, g1), (s2, l2, g2) in zip(_records(tmp_path), _records(one_process)):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6) and g1 == pytest.approx(g2, rel=1e-5)


def test_a_sharded_bf16_base_keeps_fp32_adapters_and_saves_them_whole(small_data, tmp_path):
    proc = _torchrun(2, tmp_path, small_data, "--fsdp", "--bf16", "--batch-size", "2", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = _adapter(tmp_path / "adapter")
    one = tmp_path / "one"
    assert main(["finetune", "--output-dir", str(one), "--data", small_data, "--bf16",
                 "--batch-size", "4", *RUN]) == 0
    ref = _adapter(one / "adapter")
    assert {k: (v.shape, v.dtype) for k, v in saved.items()} == \
        {k: (v.shape, v.dtype) for k, v in ref.items()}
    assert all(v.dtype == torch.float32 for v in saved.values())
    # bf16 products differ in rounding between 1 and 2 processes: the same run, loosely
    assert _worst(saved, ref) <= 1e-3
    for (s1, l1, _), (s2, l2, _) in zip(_records(tmp_path), _records(one)):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-3)


def test_a_sharded_run_killed_after_a_checkpoint_resumes_on_another_process_count(one_process,
                                                                                small_data, tmp_path):
    killed = tmp_path / "run"
    # step 2 of the 2-process sharded run: each rank kills itself (after checkpoint-1)
    kill = ("import os, signal, sys\nimport lora_phi3.finetune.job\n"
            "ft = sys.modules['lora_phi3.finetune.job']\nreal, calls = ft.train_step, [0]\n"
            "def die(*a, **k):\n    calls[0] += 1\n"
            "    if calls[0] == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(*a, **k)\nft.train_step = die\n"
            "from lora_phi3.finetune.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    script = tmp_path / "die.py"
    script.write_text(kill)
    cmd = [*TORCHRUN, "--nproc_per_node", "2", str(script), "finetune", "--output-dir", str(killed),
           "--data", small_data, "--fsdp", "--batch-size", "2", *RUN]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert find_latest_checkpoint(killed).name == "checkpoint-1"
    assert not (killed / "summary.json").exists()
    # resumed by ONE process with the whole batch (global batch 4 as before)
    assert main(["finetune", "--output-dir", str(killed), "--data", small_data, "--resume",
                 "--batch-size", "4", *RUN]) == 0
    assert _worst(_adapter(killed / "adapter"), _adapter(one_process / "adapter")) <= 1e-4
    for (s1, l1, g1), (s2, l2, g2) in zip(_records(killed)[-2:], _records(one_process)[-2:]):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6) and g1 == pytest.approx(g2, rel=1e-5)
    # and a one-process checkpoint resumes sharded on two processes
    again = tmp_path / "again"
    assert main(["finetune", "--output-dir", str(again), "--data", small_data, "--batch-size", "4",
                 *RUN]) == 0
    shutil.rmtree(again / "checkpoint-2")  # as if killed after checkpoint-1
    shutil.rmtree(again / "adapter")
    (again / "summary.json").unlink()
    proc = _torchrun(2, again, small_data, "--fsdp", "--resume", "--batch-size", "2", *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _worst(_adapter(again / "adapter"), _adapter(one_process / "adapter")) <= 1e-4
    for (s1, l1, g1), (s2, l2, g2) in zip(_records(again)[-2:], _records(one_process)[-2:]):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6) and g1 == pytest.approx(g2, rel=1e-5)


def test_fsdp_without_torchrun_is_refused_before_loading(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--output-dir", str(tmp_path), "--data", small_data, "--fsdp", *RUN])
    assert e.value.code == 2
    assert "training.fsdp (--fsdp) shards the model over processes, but this run has " \
        "WORLD_SIZE=1: launch it with torchrun" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before the run started


def test_two_sharded_processes_with_an_nf4_base_train_what_one_process_trains(small_data,
                                                                              tmp_path):
    # The 4-bit storage is sharded too (registered as frozen parameters for fully_shard).
    one = tmp_path / "one"
    assert main(["finetune", "--output-dir", str(one), "--data", small_data, "--quantize-base",
                 "nf4", "--batch-size", "4", *RUN]) == 0
    two = tmp_path / "two"
    proc = _torchrun(2, two, small_data, "--fsdp", "--quantize-base", "nf4", "--batch-size", "2",
                     *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _worst(_adapter(two / "checkpoint-1"), _adapter(one / "checkpoint-1")) <= 1e-6
    assert _worst(_adapter(two / "adapter"), _adapter(one / "adapter")) <= 1e-4
    assert [r[0] for r in _records(two)] == [1, 2, 3]
    for (s1, l1, g1), (s2, l2, g2) in zip(_records(two), _records(one)):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-6) and g1 == pytest.approx(g2, rel=1e-5)
