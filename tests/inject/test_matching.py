"""Which modules a config matches: suffixes, regexes, modules_to_save, and modules never swapped."""

import logging
import re

import pytest
import torch
import torch.nn as nn
from transformers import PhimoeConfig, PhimoeForCausalLM
from transformers.pytorch_utils import Conv1D

from lora_phi3 import layers as L
from lora_phi3.config import LoraConfig
from lora_phi3.inject import disable_lora, inject_lora, lora_modules, merge_and_unload
from lora_phi3.inject.matching import matched_entries, matches, overridden_forward, under_any
from tiny import ConvNet, TinyNet, randomize_lora, tiny_gpt2

NAMES = ["", "fc1", "layers.0.fc1", "layers.0.fc10", "model.lm_head", "lm_head.proj", "model.lm_headx",
         "a.b.c", "x.a.b", "a.bx", "b.a.b"]


# -- the rules ------------------------------------------------------------------------------------
def test_a_list_matches_whole_dotted_suffixes():
    assert matched_entries("layers.0.fc1", ["fc1", "0.fc1", "c1", "layers"]) == ["fc1", "0.fc1"]
    assert matches("fc1", ["fc1"]) and not matches("layers.0.fc10", ["fc1"])
    assert not matches("layers.0.fc1", []) and not matches("layers.0.fc1", None)


def test_a_string_is_a_regex_fullmatched_against_the_path():
    assert matched_entries("layers.0.fc1", r"layers\.\d+\.fc1") == [r"layers\.\d+\.fc1"]
    assert not matches("layers.0.fc1", r"fc1")  # fullmatch, not search
    assert matches("layers.0.fc1", r".*fc1")


@pytest.mark.parametrize("patterns", [["lm_head"], ["a.b"], ["b"], ["fc1", "x"], [], None])
def test_under_any_is_the_modules_to_save_rule_peft_uses(patterns):
    # PEFT: a module equal to, or inside, a modules_to_save entry (entries matched at dotted
    # component boundaries anywhere in the path), written out as its regex.
    def peft_rule(name):
        return bool(patterns) and any(re.match(rf"(^|.*\.){re.escape(p)}($|\..*)", name)
                                      for p in patterns)
    for name in NAMES:
        assert under_any(name, patterns) == peft_rule(name), name
    if patterns == ["lm_head"]:
        assert under_any("model.lm_head", patterns) and under_any("lm_head.proj", patterns)
        assert not under_any("model.lm_headx", patterns)


# -- the rules on generic models ------------------------------------------------------------------
def sorted_lora(model):
    return sorted(lora_modules(model))


def test_suffix_matching_is_by_dotted_component():
    model = inject_lora(TinyNet(), LoraConfig(target_modules=["fc1", "layers.2.fc2"]))
    assert sorted_lora(model) == ["layers.0.fc1", "layers.1.fc1", "layers.2.fc1", "layers.2.fc2"]
    # "c1" is a substring of "fc1" but not a dotted suffix of any name
    with pytest.raises(ValueError, match=r"target_modules entry \['c1'\] matched no module"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["c1"]))


def test_regex_all_linear_exclude_and_layers():
    model = inject_lora(TinyNet(), LoraConfig(target_modules=r"layers\.[02]\.fc2"))
    assert sorted_lora(model) == ["layers.0.fc2", "layers.2.fc2"]
    model = inject_lora(TinyNet(), LoraConfig(target_modules="all-linear"))
    assert sorted_lora(model) == [f"layers.{i}.{n}" for i in range(3) for n in ("fc1", "fc2")]  # no lm_head
    model = inject_lora(TinyNet(), LoraConfig(target_modules="all-linear", exclude_modules=["layers.1.fc1"]))
    assert "layers.1.fc1" not in sorted_lora(model) and len(sorted_lora(model)) == 5
    model = inject_lora(TinyNet(), LoraConfig(target_modules="all-linear", exclude_modules=r".*fc2"))
    assert sorted_lora(model) == ["layers.0.fc1", "layers.1.fc1", "layers.2.fc1"]
    model = inject_lora(TinyNet(), LoraConfig(target_modules=["fc1", "lm_head"], layers_to_transform=[1]))
    assert sorted_lora(model) == ["layers.1.fc1"]  # lm_head has no layer index, so it is dropped
    gpt = inject_lora(tiny_gpt2(), LoraConfig(target_modules="all-linear", layers_to_transform=[1]))
    assert sorted_lora(gpt) == [f"transformer.h.1.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert all(isinstance(m, L.Linear) and m.fan_in_fan_out for m in lora_modules(gpt).values())


def test_unused_exclude_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_phi3.inject.matching"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["fc1"], exclude_modules=["fc9"]))
    assert "exclude_modules entry 'fc9' matched no module" in caplog.text


def test_unmatched_target_lists_what_exists():
    with pytest.raises(ValueError, match=r"target_modules entry \['q_proj'\] matched no module in TinyNet\. "
                                         r"Modules that can be adapted here: embed, fc1, fc2, lm_head$"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["fc1", "q_proj"]))
    with pytest.raises(ValueError, match=r"regex 'attn\\\\.q_proj' fullmatched no module path in "
                                         r"GPT2LMHeadModel\. Modules that can be adapted here: "
                                         r"wte, wpe, c_attn, c_proj, c_fc, lm_head"):
        inject_lora(tiny_gpt2(), LoraConfig(target_modules=r"attn\.q_proj"))
    with pytest.raises(ValueError, match=r"target_modules='all-linear' found no nn.Linear or Conv1D "
                                         r"\(LM head aside\) in ConvNet\. .*conv1, conv2, conv2g, conv3"):
        inject_lora(ConvNet(), LoraConfig(target_modules="all-linear"))


def test_nothing_left_after_exclude_or_layers():
    with pytest.raises(ValueError, match=r"exclude_modules=\['fc1'\] and layers_to_transform=None left none"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["fc1"], exclude_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\] left none to adapt"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["fc1"], layers_to_transform=[7]))


def test_unsupported_types_are_named():
    with pytest.raises(ValueError, match=r"matched 'layers\.0\.norm' \(LayerNorm\), which cannot take an "
                                         r"adapter: its type LayerNorm is not supported; supported: nn\.Linear"):
        inject_lora(TinyNet(), LoraConfig(target_modules=r"layers\.0\.norm"))
    with pytest.raises(ValueError, match=r"matched 'layers\.1' \(Block\)"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["layers.1"]))
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"'0\.out_proj' .*MultiheadAttention uses its out_proj weight"):
        inject_lora(mha, LoraConfig(target_modules=["out_proj"]))


# -- modules with a forward of their own are never swapped ----------------------------------------
class ScaledEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


class PlainSubclass(nn.Linear):
    """Keeps nn.Linear's forward: a LoRA layer may replace it."""


def test_overridden_forward_names_the_base_class():
    torch.manual_seed(0)
    router = PhimoeForCausalLM(tiny_phimoe_config()).model.layers[0].mlp.router
    assert overridden_forward(router) is nn.Linear
    assert overridden_forward(ScaledEmbedding(4, 2)) is nn.Embedding
    for fine in (nn.Linear(2, 2), PlainSubclass(2, 2), nn.Embedding(3, 2), nn.Conv2d(1, 1, 1),
                 Conv1D(4, 2), nn.LayerNorm(2), nn.MultiheadAttention(4, 2).out_proj):
        assert overridden_forward(fine) is None, type(fine).__name__


def test_subclasses_that_keep_the_forward_are_adapted():
    model = nn.Sequential(PlainSubclass(4, 4))
    inject_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(model[0], L.Linear)
    gpt = inject_lora(tiny_gpt2(), LoraConfig(r=2, target_modules="all-linear"))  # Conv1D
    assert {n.rpartition(".")[2] for n in lora_modules(gpt)} == {"c_attn", "c_fc", "c_proj"}


def test_explicit_target_with_its_own_forward_is_refused():
    model = nn.Sequential(ScaledEmbedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"matched '0' \(ScaledEmbedding\), which cannot take an adapter: "
                                         r"ScaledEmbedding subclasses Embedding but defines its own "
                                         r"forward\(\), which a LoRA layer would replace and drop"):
        inject_lora(model, LoraConfig(target_modules=["0"]))
    assert type(model[0]) is ScaledEmbedding  # nothing was swapped


# -- Phi-3.5-MoE: the router is an nn.Linear subclass returning routing weights -------------------
def tiny_phimoe_config():
    return PhimoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)


def tiny_phimoe(seed=0):
    torch.manual_seed(seed)
    return PhimoeForCausalLM(tiny_phimoe_config()).eval()


IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))
ATTN = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]


def moe_logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_all_linear_on_phimoe_leaves_the_router_and_matches_a_dense_reference():
    model = tiny_phimoe()
    base = moe_logits(model)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert sorted(lora_modules(model)) == sorted(ATTN)  # no router, no lm_head
    assert type(model.model.layers[0].mlp.router).__name__ == "PhimoeTopKRouter"
    assert torch.equal(moe_logits(model), base)  # B = 0: the base model's outputs
    randomize_lora(model, seed=1)
    adapted = moe_logits(model)
    assert (adapted - base).abs().max() > 1e-2
    ref = tiny_phimoe()
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            W = ref.get_submodule(name).weight
            W += m.scaling * m.lora_B @ m.lora_A  # x @ (W + s * B @ A).T
    torch.testing.assert_close(adapted, moe_logits(ref), atol=1e-5, rtol=1e-5)
    with disable_lora(model):
        assert torch.equal(moe_logits(model), base)
    merge_and_unload(model)
    torch.testing.assert_close(moe_logits(model), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["router"], ["q_proj", "mlp.router"], r"model\.layers\.1\.mlp\.router"])
def test_targeting_the_phimoe_router_is_refused_by_name(targets):
    model = tiny_phimoe()
    with pytest.raises(ValueError, match=r"matched 'model\.layers\.\d\.mlp\.router' \(PhimoeTopKRouter\), "
                                         r"which cannot take an adapter: PhimoeTopKRouter subclasses "
                                         r"Linear but defines its own forward\(\)"):
        inject_lora(model, LoraConfig(target_modules=targets))
    assert not lora_modules(model)


def test_phimoe_router_is_not_listed_as_adaptable():
    with pytest.raises(ValueError, match=r"matched no module in PhimoeForCausalLM\. Modules that can be "
                                         r"adapted here: embed_tokens, q_proj, k_proj, v_proj, o_proj, "
                                         r"lm_head$"):
        inject_lora(tiny_phimoe(), LoraConfig(target_modules=["nope"]))
