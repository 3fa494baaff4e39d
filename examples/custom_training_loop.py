"""Add LoRA to any PyTorch model and train it with a hand-written loop.

A small frozen "pretrained" MLP is adapted to a shifted regression task: ``inject_lora`` swaps its
``nn.Linear`` layers for LoRA layers, only the adapters train, and the adapter is saved, reloaded
and merged. Runs in a few seconds on a CPU:

    python examples/custom_training_loop.py
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn as nn

import lora_phi3 as lora
from lora_phi3 import LoraConfig, inject_lora, load_adapter, merge_and_unload, save_adapter


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    teacher = make_model()  # the "pretrained" function ...
    with torch.no_grad():
        y = teacher(x) + 0.5 * torch.tanh(x[:, :1] - x[:, 1:2])  # ... and the new task it must adapt to

    model = make_model()
    # target the three Linear layers by their names in the Sequential ("0", "2", "4")
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"]))
    lora.mark_only_lora_as_trainable(model)  # inject_lora did this already; shown for loralib users
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable: {sum(p.numel() for p in params)} of {sum(p.numel() for p in model.parameters())}")

    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(401):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lora.check_finite_step(step, loss, grad_norm)  # a NaN/inf stops here, before the update
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: train mse {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        adapted = model(x)
        print(f"full-data mse: base {nn.functional.mse_loss(teacher(x), y).item():.4f} -> "
              f"adapted {nn.functional.mse_loss(adapted, y).item():.4f}")

    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d)  # only the LoRA tensors (safetensors) + config json
        fresh = make_model()
        load_adapter(fresh, d)  # injects with the saved config, then loads
        fresh.eval()
        with torch.no_grad():
            assert torch.allclose(fresh(x), adapted, atol=1e-6)
    plain = merge_and_unload(model)  # plain nn.Linear layers again, adapters folded in
    with torch.no_grad():
        assert torch.allclose(plain(x), adapted, atol=1e-5)
    print("saved, reloaded and merged: same outputs")


if __name__ == "__main__":
    main()
