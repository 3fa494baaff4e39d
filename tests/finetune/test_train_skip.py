"""CausalLMLoss's ``skip_unlabeled``: the last decoder layer's o_proj / MLP on labeled positions
only gives the same loss and gradients as the full pass (padded and packed batches, fp32)."""

from __future__ import annotations

import pytest
import torch

from lora_phi3 import LoraConfig, inject_lora
from lora_phi3.finetune.models import build_tiny_phi3
from lora_phi3.finetune.packing import collate, pack_examples
from lora_phi3.finetune.train import CausalLMLoss, enable_gradient_checkpointing

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def _model():
    torch.manual_seed(0)
    model = build_tiny_phi3(**SMALL)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj",
                                                                     "gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def _rows(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 7 + 4 * i
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        cut = (2 * length) // 3
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def _loss_and_grads(model, batch, skip):
    loss_module = CausalLMLoss(model, skip_unlabeled=skip)
    assert (loss_module._last is not None) == skip
    model.zero_grad(set_to_none=True)
    loss, n = loss_module(**batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    if loss_module._last is not None:
        loss_module._last.remove()
    return loss.detach(), int(n), grads


@pytest.mark.parametrize("packing", [False, True])
def test_skip_unlabeled_is_exact(packing):
    model = _model()
    rows = _rows()
    if packing:
        rows = pack_examples(rows, 32)
    batch = collate(rows, 0, packing=packing)
    ref_loss, ref_n, ref = _loss_and_grads(model, batch, skip=False)
    loss, n, got = _loss_and_grads(model, batch, skip=True)
    assert n == ref_n > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # every LoRA parameter of the last layer still learns
    assert all(got[k].abs().max() > 0 for k in got if "layers.1." in k)


def test_skip_unlabeled_hooks_are_idle_outside_the_loss():
    model = _model()
    loss_module = CausalLMLoss(model)
    assert loss_module._last is not None
    batch = collate(_rows(), 0, packing=False)
    loss_module(**batch)
    assert loss_module._last.rows is None  # cleared after the forward
    assert CausalLMLoss(model)._last is loss_module._last  # hooks are added once per model
    n_hooks = len(model.model.layers[-1].mlp._forward_hooks)
    CausalLMLoss(model)
    assert len(model.model.layers[-1].mlp._forward_hooks) == n_hooks
    with torch.no_grad():  # a plain model call afterwards sees the full last layer
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_module._last.remove()
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain, ref)


def test_skip_unlabeled_off_under_gradient_checkpointing():
    model = _model()
    enable_gradient_checkpointing(model)
    batch = collate(_rows(), 0, packing=False)
    loss_module = CausalLMLoss(model)
    loss, _ = loss_module(**batch)
    loss.backward()  # a replay that saw the selection would fail or differ here
    ref_model = _model()
    ref, _ = CausalLMLoss(ref_model, skip_unlabeled=False)(**batch)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
