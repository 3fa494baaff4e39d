"""The training loop: global-batch loss against a plain reference, accumulation, gradient
checkpointing, bf16, the divergence stop, learning-rate schedules and data order (whole runs:
test_job.py; diverging runs: test_divergence.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lora_phi3 import LoraConfig, TrainingDiverged, inject_lora
from lora_phi3.finetune.distributed import DistState
from lora_phi3.finetune.models import build_tiny_phi3
from lora_phi3.finetune.packing import collate
from lora_phi3.finetune.recipe import TrainingConfig
from lora_phi3.finetune.train import (CausalLMLoss, enable_gradient_checkpointing,
                                      global_batch_indices, local_micro_batches, lr_factor,
                                      make_scheduler, plan_steps, train_step)

# The job's own embedded model (what these steps train), narrowed, with a 64-token vocabulary (the
# rows below draw ids 1..63). Not tests/tiny.py's: the 1e-6 tolerances below were measured on it.
# initializer_range 0.1 (TINY_PHI3 has 0.02 since the embedded model is pretrained): weights that
# large keep every gradient well above Adam's eps, where the AdamW comparisons below are exact.
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"
    # the runs did train: B moved away from its zero init
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


# -- the loss and one optimizer step against a plain reference -------------------------------------
def _model_with_lora(seed: int = 0):
    torch.manual_seed(seed)
    model = build_tiny_phi3(**SMALL)
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
    model = build_tiny_phi3(**SMALL, dtype=torch.bfloat16)
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


# -- divergence: a non-finite loss or gradient norm stops the step before the update --------------
@pytest.mark.parametrize("poison", ["gradient", "loss"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_non_finite_step_raises_before_the_update(poison, max_grad_norm):
    rows = _rows(4)
    model = _model_with_lora()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = [collate(rows, 0, packing=False)]
    train_step(CausalLMLoss(model), batch, opt, sched, params, dist=DistState())  # a good step
    if poison == "gradient":  # a finite loss whose gradient overflows
        params[0].register_hook(lambda g: g * float("inf"))
    else:  # the embedding of one input token: the forward itself gives NaN
        with torch.no_grad():
            model.get_input_embeddings().weight[rows[0]["input_ids"][0]] = float("nan")
    before = [p.detach().clone() for p in params]
    adam_state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 2: loss "
                       + (r"\d\S*, gradient norm (nan|inf)" if poison == "gradient" else r"nan, ")
                       + r".*; lower the learning rate$") as e:
        train_step(CausalLMLoss(model), batch, opt, sched, params, dist=DistState(),
                   max_grad_norm=max_grad_norm)  # step 2: the scheduler's count + 1
    assert e.value.step == 2
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # nothing applied
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in adam_state.items())
    assert all(p.grad is None for p in params) and sched.last_epoch == 1
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 12: "):
        train_step(CausalLMLoss(model), batch, opt, sched, params, dist=DistState(), step=12)


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
