"""PiSSA and OLoRA: the residual base, the init against PEFT, merging, QPiSSA and refusals (the
saves for the ORIGINAL base weights are in test_conversion.py)."""

import pytest
import torch
import torch.nn as nn

import lora_phi3 as lora
from lora_phi3 import LoraConfig, inject_lora, lora_modules, merge_and_unload
from tiny import logits, randomize_lora, tiny_phi3

peft = pytest.importorskip("peft")

SLICES = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _pissa(init="pissa", targets=SLICES, seed=0, **kw):
    model = tiny_phi3()
    before = logits(model)
    torch.manual_seed(seed)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw))
    return model, before


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_init_keeps_the_function_and_the_base_holds_the_residual(init):
    model, before = _pissa(init)
    torch.testing.assert_close(logits(model), before, atol=1e-4, rtol=0)
    original = tiny_phi3()
    qkv = lora_modules(model)["model.layers.0.self_attn.qkv_proj"]
    W = original.get_submodule("model.layers.0.self_attn.qkv_proj").weight
    s = qkv.scaling
    assert not torch.equal(qkv.weight[:64], W[:64])  # q rows: the residual
    torch.testing.assert_close(qkv.weight[:64] + s * qkv.lora_B[:64] @ qkv.lora_A[:4], W[:64],
                               atol=1e-5, rtol=0)
    assert torch.equal(qkv.weight[64:80], W[64:80])  # k is not adapted: untouched


def test_linear_pissa_equals_peft_pissa():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40))
    w0 = base[0].weight.detach().clone()
    ref = nn.Sequential(nn.Linear(24, 40))
    with torch.no_grad():
        ref[0].weight.copy_(w0)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"],
                                                  init_lora_weights="pissa"))
    ours = lora.Linear.from_linear(base[0], r=4, lora_alpha=6, init_lora_weights="pissa")
    layer = pm.base_model.model[0]
    assert torch.equal(ours.lora_A, layer.lora_A["default"].weight)
    assert torch.equal(ours.lora_B, layer.lora_B["default"].weight)
    assert torch.equal(ours.weight, layer.base_layer.weight)


def test_merging_a_pissa_adapter_gives_the_tuned_weight():
    model, _ = _pissa()
    randomize_lora(model, seed=3, scale=0.2)
    want = logits(model)
    qkv = lora_modules(model)["model.layers.0.self_attn.qkv_proj"]
    tuned = qkv.weight[:64] + qkv.scaling * qkv.lora_B[:64] @ qkv.lora_A[:4]
    plain = merge_and_unload(model)
    torch.testing.assert_close(plain.get_submodule("model.layers.0.self_attn.qkv_proj").weight[:64],
                               tuned, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(plain), want, atol=1e-4, rtol=0)


def test_nf4_pissa_quantizes_the_residual_and_loses_less_than_plain_nf4():
    # QPiSSA (section 4.3 of the paper): the principal part stays exact in the adapter, only the
    # residual is quantised, so W is reproduced better than by quantising W itself.
    name = "model.layers.0.self_attn.o_proj"
    W = tiny_phi3().get_submodule(name).weight.detach()
    errors = {}
    for init in ["pissa", True]:
        model = tiny_phi3()
        inject_lora(model, LoraConfig(r=8, lora_alpha=8, target_modules=["o_proj"],
                                      init_lora_weights=init, quantize_base="nf4"))
        layer = lora_modules(model)[name]
        rebuilt = layer.quantized_weight.dequantize() + layer.scaling * layer.lora_B @ layer.lora_A
        errors[init] = (rebuilt - W).norm().item()
    assert errors["pissa"] < 0.9 * errors[True]


@pytest.mark.parametrize("config, message", [
    (dict(init_lora_weights="loftq"), r"init_lora_weights must be one of .* got 'loftq'"),
    (dict(init_lora_weights="pissa_niter_0"), r"got 'pissa_niter_0'"),
    (dict(init_lora_weights="pissa", r=40), r"LoraConfig.r=40 is larger than .*needs r <= "),
    (dict(init_lora_weights="olora", target_modules=["embed_tokens"]),
     r"implemented for linear layers; model.embed_tokens is Embedding"),
])
def test_bad_data_init_is_refused_and_the_model_is_unchanged(config, message):
    model = tiny_phi3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        inject_lora(model, LoraConfig(**{"r": 4, "target_modules": ["qkv_proj"], **config}))
    assert not lora_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pissa_on_an_embedding_layer_is_refused():
    with pytest.raises(ValueError, match="not supported by Embedding"):
        lora.Embedding(10, 4, r=2, init_lora_weights="pissa")
