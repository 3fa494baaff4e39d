"""The training loop: global-batch loss, accumulation and DDP equivalence, data order, schedules,
checkpoints (atomic, rotated, RNG round trip) and exact resume after ``kill -9``."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_phi3.adapters.files import read_adapter
from lora_phi3.finetune.checkpoint import (capture_rng_state, find_latest_checkpoint, list_checkpoints,
                                  load_training_state, restore_rng_state, save_checkpoint)
from lora_phi3.finetune.cli import main
from lora_phi3.config import LoraConfig
from lora_phi3.finetune.packing import collate
from lora_phi3.finetune.distributed import DistState
from lora_phi3.inject.injector import inject_lora
from lora_phi3.finetune.models import build_tiny_phi3
from lora_phi3.finetune.recipe import TrainingConfig
from lora_phi3.finetune.train import (CausalLMLoss, enable_gradient_checkpointing, global_batch_indices, local_micro_batches, lr_factor,
                             make_scheduler, plan_steps, train_step)

REPO = Path(__file__).resolve().parents[1]
# Small runs of the real CLI path; dropout 0 so that different batch splits are comparable.
# Two steps, checkpoint after the first. Adapters are compared after step 1 (atol 1e-6) and the
# pre-optimizer quantities of both steps (global loss, gradient norm) to rel 1e-6. The adapter after
# step 2 is not compared at 1e-6: B starts at 0, so many gradient elements are ~1e-9, the size of
# Adam's eps, where the update lr * g / (sqrt(v) + eps) passes float-summation noise of g (which
# differs between one and two processes) through almost undamped; step 1's tiny lr keeps that
# below 1e-6, and any real difference in the update direction would show as ~lr = 1e-4.
RUN = ["--max-steps", "2", "--max-seq-length", "128", "--eval-steps", "0", "--save-steps", "1",
       "--lora-dropout", "0", "--learning-rate", "1e-4", "--logging-steps", "1", "--no-progress",
       "--log-level", "WARNING", "--device", "cpu"]
ASSETS = REPO / "lora_phi3" / "finetune" / "assets"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """The first 96 bundled training and 16 held-out conversations (keeps the runs quick)."""
    d = tmp_path_factory.mktemp("data")
    for src, dst, n in (("chat_train.jsonl", "train.jsonl", 96), ("chat_eval.jsonl", "eval.jsonl", 16)):
        lines = (ASSETS / src).read_text().splitlines()[:n]
        (d / dst).write_text("\n".join(lines) + "\n")
    return str(d)


def _train_records(out: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if r["type"] == "train"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return read_adapter(path)[1]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"
    # the runs did train: B moved away from its zero init
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


# -- the loss and one optimizer step against a plain reference -------------------------------------
def _model_with_lora(seed: int = 0):
    torch.manual_seed(seed)
    model = build_tiny_phi3(64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():  # non-zero B so that every LoRA parameter gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model


def _rows(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + 3 * i  # different lengths and label counts per row
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2:]  # a masked "prompt"
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _sgd_step(model, micro_rows):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = [collate(r, 0, packing=False) for r in micro_rows]
    out = train_step(CausalLMLoss(model), batches, opt, sched, params, dist=DistState())
    return out


def test_train_step_gradient_is_mean_over_all_label_tokens_of_global_batch():
    rows = _rows(4)
    ref = _model_with_lora()
    full = collate(rows, 0, packing=False)
    logits = ref(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    # plain reference: mean over every label token of the 4 rows (HF shift), one backward
    ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               full["labels"][:, 1:].reshape(-1), ignore_index=-100)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}

    model = _model_with_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = _sgd_step(model, [rows[:2], rows[2:]])  # 2 micro-batches of 2, unequal token counts
    assert out["loss"] == pytest.approx(ref_loss.item(), abs=1e-6)
    assert out["label_tokens"] == int((full["labels"][:, 1:] != -100).sum())
    for n, p in model.named_parameters():
        if p.requires_grad:  # SGD lr 1: before - after == gradient
            torch.testing.assert_close(before[n] - p.detach(), ref_grads[n], atol=1e-6, rtol=1e-5)


def test_accumulation_2x2_equals_batch_4_with_adamw():
    rows = _rows(4)
    results = []
    for split in ([rows], [rows[:2], rows[2:]]):
        model = _model_with_lora()
        params = [p for p in model.parameters() if p.requires_grad]
        cfg = TrainingConfig(learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant",
                             bf16=False, gradient_checkpointing=False)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
        sched = make_scheduler(opt, cfg, total_steps=3)
        for _ in range(3):
            train_step(CausalLMLoss(model), [collate(r, 0, packing=False) for r in split],
                       opt, sched, params, dist=DistState(), max_grad_norm=1.0)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    _assert_same(results[0], results[1], atol=1e-6)


def test_gradient_checkpointing_gives_the_same_update():
    rows = _rows(4)
    plain, ckpt = _model_with_lora(), _model_with_lora()
    enable_gradient_checkpointing(ckpt)
    assert ckpt.model.gradient_checkpointing
    a, b = _sgd_step(plain, [rows]), _sgd_step(ckpt, [rows])
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_bf16_base_keeps_fp32_adapters_and_tracks_the_fp32_loss():
    rows = _rows(4)
    ref = _model_with_lora()
    torch.manual_seed(0)
    model = build_tiny_phi3(64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, dtype=torch.bfloat16)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if "lora_" in name:
                p.copy_(q)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = train_step(CausalLMLoss(model), [collate(rows, 0, packing=False)], opt, sched, params,
                     dist=DistState(), bf16=True)
    want = _sgd_step(ref, [rows])["loss"]
    assert out["loss"] == pytest.approx(want, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


# -- schedule and data order -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_factor_against_formula(kind):
    total, warm = 10, 3
    for s in range(total):
        if s < warm:
            want = (s + 1) / warm
        elif kind == "constant":
            want = 1.0
        elif kind == "linear":
            want = 1 - (s - warm) / (total - warm)
        else:
            want = 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert lr_factor(s, total, warm, kind) == pytest.approx(want)


def test_scheduler_steps_follow_lr_factor():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainingConfig(learning_rate=0.1, warmup_ratio=0.2, lr_scheduler="cosine")
    opt = torch.optim.AdamW([p], lr=cfg.learning_rate)
    sched = make_scheduler(opt, cfg, total_steps=10)  # warmup = ceil(0.2 * 10) = 2
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(s, 10, 2, "cosine") for s in range(10)])
    assert seen[0] > 0  # the first step already trains


@pytest.mark.parametrize("world,accum,batch", [(1, 1, 8), (1, 2, 4), (2, 1, 4), (4, 2, 1)])
def test_data_order_depends_only_on_seed_and_global_batch(world, accum, batch):
    cfg = TrainingConfig(batch_size=batch, gradient_accumulation_steps=accum, max_steps=7)
    plan = plan_steps(50, cfg, world)
    assert plan.global_batch_size == 8 and plan.steps_per_epoch == 6
    ref = TrainingConfig(batch_size=8, max_steps=7)
    ref_plan = plan_steps(50, ref, 1)
    for step in range(7):  # crosses an epoch boundary (6 steps per epoch)
        want = global_batch_indices(step, ref_plan, seed=3)
        got = []
        for rank in range(world):
            for mb in local_micro_batches(global_batch_indices(step, plan, seed=3), rank, batch, accum):
                assert len(mb) == batch
                got += mb
        assert got == want
    assert global_batch_indices(0, plan, seed=3) != global_batch_indices(0, plan, seed=4)
    assert global_batch_indices(0, plan, seed=3) != global_batch_indices(6, plan, seed=3)


def test_plan_steps_rejects_global_batch_larger_than_data():
    with pytest.raises(ValueError, match=r"global batch .* = 16 rows\) is larger than the 10"):
        plan_steps(10, TrainingConfig(batch_size=8, gradient_accumulation_steps=2), 1)
    plan = plan_steps(100, TrainingConfig(batch_size=4, epochs=2.5, max_steps=None), 1)
    assert plan.total_steps == math.ceil(2.5 * 25)


# -- TrainingConfig validation ---------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", 0, r"training.learning_rate \(--learning-rate\) must be a number > 0, got 0"),
    ("batch_size", 0, r"--batch-size\) must be an integer >= 1, got 0"),
    ("batch_size", 2.5, r"--batch-size\) must be an integer >= 1, got 2.5"),
    ("warmup_ratio", 1.0, r"--warmup-ratio\) must be a number >= 0 and < 1, got 1.0"),
    ("lr_scheduler", "step", r"--lr-scheduler\) must be one of \['cosine', 'linear', 'constant'\]"),
    ("on_bad_row", "ignore", r"--on-bad-row\) must be one of \['skip', 'error'\], got 'ignore'"),
    ("max_steps", 0, r"--max-steps\) must be an integer >= 1, got 0"),
    ("packing", "yes", r"--packing\) must be true or false, got 'yes'"),
    ("max_grad_norm", float("nan"), r"--max-grad-norm\) must be a number >= 0"),
])
def test_training_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig(**{field: value})


def test_training_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr'\]; allowed: .*learning_rate"):
        TrainingConfig.from_dict({"lr": 1e-4})
    assert TrainingConfig.from_dict({"batch_size": 2}).batch_size == 2


# -- checkpoints -----------------------------------------------------------------------------------
def test_rng_state_round_trip_through_weights_only_files(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_checkpoints_are_atomic_rotated_and_marked(tmp_path):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p.grad = torch.ones(2)
    opt.step()

    def write(d: Path) -> None:
        (d / "adapter.bin").write_bytes(b"x")

    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, write_adapter=write, optimizer=opt, scheduler=sched,
                        rng_states=[capture_rng_state()], trainer_state={"step": step},
                        save_total_limit=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    # a half-written checkpoint (no marker) and a killed temp dir are never picked
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / ".tmp-checkpoint-10-abc").mkdir()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-6"
    st = load_training_state(tmp_path / "checkpoint-6")
    assert st["trainer_state"] == {"step": 6}
    assert st["optimizer"]["state"][0]["exp_avg"].shape == (2,)

    def boom(d: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 12, write_adapter=boom, optimizer=opt, scheduler=sched,
                        rng_states=[capture_rng_state()], trainer_state={})
    assert not (tmp_path / "checkpoint-12").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_training_state(tmp_path / "checkpoint-8")


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
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
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
                           str(killed), *args], env=_env(), stdout=subprocess.DEVNULL,
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
