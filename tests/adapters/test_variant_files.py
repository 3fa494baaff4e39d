"""Our own adapter files and ``merge_and_unload`` with the newer variants: ``lora_bias`` and DoRA on
embeddings and convolutions (the PEFT format is ``test_peft_lora_bias.py``/``test_peft_dora.py``)."""

import pytest
import torch
import torch.nn as nn

import lora_phi3 as lora
from lora_phi3.adapters import load_adapter, save_adapter


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Conv1d(4, 4, 1))


def run(m: nn.Module) -> torch.Tensor:
    ids = torch.arange(6).view(2, 3)
    with torch.no_grad():
        h = m[1](m[0](ids))  # (2, 3, 4)
        return m[2](h.transpose(1, 2))


@pytest.mark.parametrize("variant, targets", [({"lora_bias": True}, ["1", "2"]),
                                              ({"use_dora": True}, ["0", "1", "2"])])
def test_files_round_trip_and_a_model_without_the_variant_refuses_them(tmp_path, variant, targets):
    ours = model()
    lora.inject_lora(ours, lora.LoraConfig(r=2, target_modules=targets, init_lora_weights=False,
                                           **variant))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(ours, tmp_path / "a")
    back = load_adapter(model(), tmp_path / "a")
    assert set(back.state_dict()) == set(ours.state_dict())
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    torch.testing.assert_close(run(back), run(ours), atol=0, rtol=0)
    plain = model()
    lora.inject_lora(plain, lora.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    name = next(iter(variant))
    with pytest.raises(ValueError, match=rf"unexpected keys .*; LoraConfig differs .*'{name}'"):
        load_adapter(plain, tmp_path / "a")


def test_merge_and_unload_keeps_the_lora_bias_function():
    ours = model()
    lora.inject_lora(ours, lora.LoraConfig(r=2, target_modules=["1", "2"], lora_bias=True,
                                           init_lora_weights=False))
    with torch.no_grad():
        for layer in lora.lora_modules(ours).values():
            layer.lora_bias.normal_()
    want = run(ours)
    plain = lora.merge_and_unload(ours)
    assert type(plain[1]) is nn.Linear and type(plain[2]) is nn.Conv1d
    assert set(plain.state_dict()) == set(model().state_dict())
    torch.testing.assert_close(run(plain), want, atol=1e-6, rtol=1e-6)
