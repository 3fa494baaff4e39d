"""Hot swap (``load_adapter(model, path, adapter_name=existing)``): new weights into an existing named
adapter in place, with no recompilation, smaller ranks padded, and refusals that change nothing."""

import pytest
import torch

import lora_phi3 as lora
from lora_phi3 import LoraConfig
from lora_phi3.inject import lora_modules
from tiny import (NAMED_CFG_A as CFG_A, NAMED_CFG_B as CFG_B, X, adapted, alone as _alone, logits,
                  randomize_lora, tiny_phi3, two_adapters as _two)


def test_hot_swap_replaces_weights_in_place_without_recompiling(tmp_path):
    torch._dynamo.reset()
    model = _two()
    lora.set_adapter(model, "b")
    donor = tiny_phi3()  # the same modules as b, at a smaller rank and another alpha
    lora.inject_lora(donor, LoraConfig(r=1, lora_alpha=5, target_modules=CFG_B.target_modules))
    randomize_lora(donor, seed=11)
    lora.save_adapter(donor, tmp_path / "small")
    params = {id(p) for p in model.parameters()}
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(X)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 1  # it compiled (changing a layer's float scaling would add a graph)
    lora.load_adapter(model, tmp_path / "small", adapter_name="b")
    assert {id(p) for p in model.parameters()} == params  # the same tensors, in place
    with torch.no_grad():
        got = compiled(X).logits
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompilation
    torch.testing.assert_close(got, logits(donor), atol=1e-5, rtol=0)
    lora.set_adapter(model, "default")
    torch.testing.assert_close(logits(model), logits(_alone(model, "default", CFG_A)), atol=0, rtol=0)


def test_hot_swap_refuses_a_file_for_other_modules(tmp_path):
    model = _two()
    donor = adapted(["o_proj"])
    lora.save_adapter(donor, tmp_path / "o")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="hot swap of adapter 'b' .* refused"):
        lora.load_adapter(model, tmp_path / "o", adapter_name="b")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hot_swap_carries_lora_bias(tmp_path):
    model = tiny_phi3()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], lora_bias=True)
    lora.inject_lora(model, cfg, adapter_name="x")
    donor = tiny_phi3()
    lora.inject_lora(donor, LoraConfig(r=1, lora_alpha=3, target_modules=["o_proj"], lora_bias=True))
    randomize_lora(donor, seed=4)
    with torch.no_grad():
        for layer in lora_modules(donor).values():
            layer.lora_bias.normal_()
    lora.save_adapter(donor, tmp_path / "d")
    lora.load_adapter(model, tmp_path / "d", adapter_name="x")
    torch.testing.assert_close(logits(model), logits(donor), atol=1e-5, rtol=0)
