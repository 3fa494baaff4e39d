"""LoRA+ in the job (``training.loraplus_lr_ratio``, ``--loraplus-lr-ratio``): ``lora_B`` trains at
ratio x lr through the schedule, and a checkpoint resumes the run exactly."""

from __future__ import annotations

import pytest
import torch

from lora_phi3 import read_adapter
from lora_phi3.finetune import finetune
from lora_phi3.finetune.checkpoint import load_training_state
from lora_phi3.finetune.cli import main
from lora_phi3.finetune.job import FinetuneJob
from lora_phi3.finetune.recipe import TrainingConfig
from lora_phi3.finetune.train import make_optimizer
from lora_phi3.inject import lora_modules
from runs import bundled_subset, small_recipe

LR, RATIO = 1e-3, 16.0
# two steps, a checkpoint after each; dropout on, so the restored RNG state matters
RUN = dict(max_steps=2, save_steps=1, max_seq_length=64, batch_size=2, learning_rate=LR,
           loraplus_lr_ratio=RATIO)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    return bundled_subset(tmp_path_factory.mktemp("data"), 8, 4)


def _recipe(data, out):
    recipe = small_recipe(data, out, **RUN)
    recipe.lora.lora_dropout = 0.1
    return recipe


def test_b_trains_at_ratio_times_lr_after_setup(small_data, tmp_path):
    job = FinetuneJob(_recipe(small_data, tmp_path), progress=False, device="cpu")
    try:
        job.setup()
        groups = {g["name"]: g for g in job.optimizer.param_groups}
        assert list(groups) == ["groupA", "groupB"]
        layers = lora_modules(job.model).values()
        assert {id(p) for p in groups["groupB"]["params"]} == {id(m.lora_B) for m in layers}
        assert {id(p) for p in groups["groupA"]["params"]} == {id(m.lora_A) for m in layers}
        assert groups["groupA"]["initial_lr"] == LR and groups["groupB"]["initial_lr"] == RATIO * LR
        # the warm-up factor scales both groups alike
        assert groups["groupB"]["lr"] == pytest.approx(RATIO * groups["groupA"]["lr"])
    finally:
        job.cleanup()


def test_resume_from_step_1_reproduces_the_uninterrupted_run(small_data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    finetune(_recipe(small_data, straight), progress=False, device="cpu")

    # the same run, stopped as step 2 starts (checkpoint-1 written), then resumed
    import lora_phi3.finetune.job as job_module

    real_step, calls = job_module.train_step, [0]

    def step_or_die(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(job_module, "train_step", step_or_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(_recipe(small_data, stopped), progress=False, device="cpu")
    monkeypatch.setattr(job_module, "train_step", real_step)
    assert (stopped / "checkpoint-1").is_dir() and not (stopped / "checkpoint-2").exists()
    saved = load_training_state(stopped / "checkpoint-1")["optimizer"]["param_groups"]
    assert [(g["name"], g["initial_lr"]) for g in saved] == [("groupA", LR), ("groupB", RATIO * LR)]

    finetune(_recipe(small_data, stopped), resume=True, progress=False, device="cpu")
    metrics = (stopped / "metrics.jsonl").read_text()
    assert '"type": "resume"' in metrics and '"checkpoint": "checkpoint-1"' in metrics
    a, b = read_adapter(stopped / "adapter")[1], read_adapter(straight / "adapter")[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_the_ratio_changes_the_run(small_data, tmp_path):
    # guards the test above: without LoRA+ the same run ends elsewhere
    finetune(_recipe(small_data, tmp_path / "plus"), progress=False, device="cpu")
    plain = _recipe(small_data, tmp_path / "plain")
    plain.training.loraplus_lr_ratio = None
    finetune(plain, progress=False, device="cpu")
    a, b = read_adapter(tmp_path / "plus" / "adapter")[1], read_adapter(tmp_path / "plain" / "adapter")[1]
    assert any(not torch.allclose(a[k], b[k], atol=1e-6) for k in a if "lora_B" in k)


def test_resuming_with_loraplus_switched_off_is_refused_by_name(small_data, tmp_path):
    finetune(_recipe(small_data, tmp_path), progress=False, device="cpu")  # checkpoints 1, 2
    plain = _recipe(small_data, tmp_path)
    plain.training.loraplus_lr_ratio = None  # one parameter group instead of two
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[\d+, \d+\], this run has "
                                         r"\[\d+\]; .*--loraplus-lr-ratio"):
        finetune(plain, resume=str(tmp_path / "checkpoint-1"), progress=False, device="cpu")


def test_the_field_and_the_flag_are_validated():
    assert TrainingConfig().loraplus_lr_ratio is None
    assert TrainingConfig(loraplus_lr_ratio=16).loraplus_lr_ratio == 16.0
    for bad in (0, -1.0, float("inf"), "16", True):
        with pytest.raises(ValueError, match=r"training.loraplus_lr_ratio \(--loraplus-lr-ratio\) "
                                             r"must be a number > 0, got"):
            TrainingConfig(loraplus_lr_ratio=bad)
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--loraplus-lr-ratio", "0", "--max-steps", "1"])
    assert e.value.code == 2


def test_make_optimizer_needs_the_model_for_loraplus():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio \(--loraplus-lr-ratio\) needs the model"):
        make_optimizer([p], TrainingConfig(loraplus_lr_ratio=RATIO))
