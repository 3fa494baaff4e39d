"""The factory: which LoRA layer replaces a module (dense, fp32 adapters over a 16-bit base, or a
4-bit base dispatched by ``quantize_base``) and which plain module a LoRA layer stands for."""

import pytest
import torch
import torch.nn as nn

import lora_phi3.inject.factory as factory_mod
from lora_phi3 import layers as L
from lora_phi3.config import LoraConfig
from lora_phi3.inject.injector import inject_lora, merge_and_unload
from tiny import TinyNet, randomize_lora


def test_fp32_adapters_on_bf16_base():
    torch.manual_seed(0)
    model = TinyNet().to(torch.bfloat16)
    inject_lora(model, LoraConfig(r=4, target_modules=["fc1"]))
    randomize_lora(model)
    fc1 = model.layers[1].fc1
    assert fc1.weight.dtype == torch.bfloat16 and fc1.lora_A.dtype == torch.float32
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = fc1(x)
    assert y.dtype == torch.bfloat16
    W = fc1.weight.float() + fc1.scaling * fc1.lora_B @ fc1.lora_A
    torch.testing.assert_close(y.float(), x.float() @ W.T + fc1.bias.float(), atol=0.05, rtol=0.02)


def test_quantize_base_dispatches_to_the_nf4_builder(monkeypatch):
    from types import SimpleNamespace

    from lora_phi3.quant import Linear4bit, qlora

    config = LoraConfig(target_modules=["layers.0.fc1"], quantize_base="nf4")
    assert factory_mod.quantized_factory(config) is qlora.build_nf4_layer
    check = factory_mod.quantized_check(config)  # the builder's own check, told the layout
    with pytest.raises(ValueError, match=r"cannot quantize 'odd' \(weight \(4, 30\)\): its row length "
                                         r"in_features=30 is not a multiple of the block size 64"):
        check(nn.Linear(30, 4), "odd")
    check(nn.Linear(64, 4), "fine")
    assert factory_mod.quantized_check(LoraConfig(target_modules=["fc1"])) is None
    calls = []
    real = qlora.build_nf4_layer

    def spy(module, name, **kwargs):
        calls.append((name, kwargs.get("enable_lora"), kwargs["fan_in_fan_out"]))
        return real(module, name, **kwargs)

    monkeypatch.setattr(qlora, "build_nf4_layer", spy)
    model = inject_lora(TinyNet(dim=64), config)
    assert calls == [("layers.0.fc1", None, False)]
    assert isinstance(model.layers[0].fc1, Linear4bit) and model.layers[0].fc1.weight is None
    with pytest.raises(NotImplementedError, match=r"quantize_base='int8': no quantized LoRA layer for "
                                                  r"it; allowed: 'nf4'"):
        factory_mod.quantized_factory(SimpleNamespace(quantize_base="int8"))


def test_merge_and_unload_of_hand_built_layers():
    torch.manual_seed(0)
    model = nn.Sequential(L.Linear(5, 6, r=2, lora_alpha=4), L.Linear(6, 3, r=2, fan_in_fan_out=True),
                          L.Embedding(7, 4, r=2), L.Conv2d(2, 3, 3, r=1, padding=1))
    randomize_lora(model)
    x = torch.randn(2, 5)
    y = model[1](model[0](x))
    tok = torch.tensor([1, 6])
    e = model[2](tok)
    xc = torch.randn(1, 2, 4, 4)
    c = model[3](xc)
    ptr0 = model[0].weight.data_ptr()
    plain = merge_and_unload(model)
    assert [type(m) for m in plain] == [nn.Linear, nn.Linear, nn.Embedding, nn.Conv2d]
    assert plain[0].weight.data_ptr() == ptr0  # storage reused
    torch.testing.assert_close(plain[1](plain[0](x)), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain[2](tok), e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain[3](xc), c, atol=1e-5, rtol=1e-5)
    root = L.Linear(3, 3, r=1)
    assert type(merge_and_unload(root)) is nn.Linear
