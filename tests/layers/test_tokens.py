"""TrainableTokens against a dense reference (the table with the selected rows replaced), against
HF PEFT's TrainableTokensLayer, and through ``LoraConfig.trainable_token_indices`` and the injector."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from lora_phi3.config import LoraConfig
from lora_phi3.inject.injector import (disable_lora, inject_lora, lora_modules, merge_and_unload,
                                       merge_lora, unmerge_lora)
from lora_phi3.layers import TrainableTokens
from lora_phi3.utils import mark_only_lora_as_trainable
from tiny import tiny_gpt2, tiny_phi3

IDS = [3, 0, 7]


def layer_with_values(seed: int = 0, **kwargs) -> TrainableTokens:
    torch.manual_seed(seed)
    layer = TrainableTokens.from_embedding(nn.Embedding(10, 4, **kwargs), IDS, merge_weights=False)
    with torch.no_grad():
        layer.token_values.normal_()
    return layer


def test_matches_the_table_with_rows_replaced():
    layer = layer_with_values()
    table = layer.weight.index_copy(0, torch.tensor(IDS), layer.token_values)
    x = torch.tensor([[0, 1, 3, 7, 9, 3]])
    torch.testing.assert_close(layer(x), table[x], atol=0, rtol=0)
    assert layer.r == 3 and layer.scaling == 1.0 and dict(layer.adapter_params()).keys() == {"token_values"}
    assert set(layer.state_dict()) == {"weight", "token_values"}  # the slot map is not saved


def test_init_true_is_a_no_op_and_false_is_random():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    layer = TrainableTokens.from_embedding(emb, IDS)
    x = torch.arange(10)
    torch.testing.assert_close(layer(x), emb(x), atol=0, rtol=0)
    noisy = TrainableTokens.from_embedding(emb, IDS, init_lora_weights=False)
    assert not torch.equal(noisy.token_values, emb.weight[IDS])


def test_merge_writes_the_rows_and_unmerge_restores_them_bit_for_bit():
    layer = layer_with_values()
    original, x = layer.weight.clone(), torch.arange(10)
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        layer.merge()  # idempotent
        assert torch.equal(layer.weight[IDS], layer.token_values)
        torch.testing.assert_close(layer(x), want, atol=0, rtol=0)
        layer.unmerge()
    assert torch.equal(layer.weight, original)
    torch.testing.assert_close(layer.delta_weight()[IDS], (layer.token_values - original[IDS]).float())


def test_gradients_reach_only_the_selected_rows_values():
    layer = layer_with_values()
    layer(torch.tensor([[3, 1, 3]])).sum().backward()
    assert layer.weight.grad is None
    assert torch.equal(layer.token_values.grad[:, 0], torch.tensor([2.0, 0.0, 0.0]))  # token 3 twice


@pytest.mark.parametrize("ids, match", [
    ([], "must be a non-empty list of token ids"),
    ([1, 1], "lists a token id twice"),
    ([2, 10], r"token ids \[10\] are outside the embedding's \[0, 10\)"),
    ([True], "must be a non-empty list of token ids"),
])
def test_bad_token_ids_are_refused(ids, match):
    with pytest.raises(ValueError, match=match):
        TrainableTokens.from_embedding(nn.Embedding(10, 4), ids)


# -- the config field ---------------------------------------------------------------------------
def test_config_field_validates_and_plain_files_stay_unchanged():
    assert LoraConfig(trainable_token_indices={"emb": (1, 2)}).trainable_token_indices == {"emb": [1, 2]}
    assert "trainable_token_indices" not in LoraConfig(target_modules=["x"]).to_file_dict()
    cfg = LoraConfig(target_modules=["x"], trainable_token_indices=[4])
    assert LoraConfig.from_json(cfg.to_json()) == cfg
    for bad in ([], [1, 1], [-1], {"emb": []}, {"": [1]}, "emb", [1.0]):
        with pytest.raises(ValueError, match=r"LoraConfig.trainable_token_indices must be None"):
            LoraConfig(trainable_token_indices=bad)


# -- through the injector -----------------------------------------------------------------------
def test_a_list_selects_the_input_embeddings_and_unloads_to_the_table():
    model = tiny_phi3()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=2, target_modules=["o_proj"], trainable_token_indices=[5, 9]))
    layer = model.model.embed_tokens
    assert isinstance(layer, TrainableTokens) and layer.token_indices == [5, 9]
    assert "model.embed_tokens" in lora_modules(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.token_values" in trainable and "model.embed_tokens.weight" not in trainable
    mark_only_lora_as_trainable(model)
    assert model.model.embed_tokens.token_values.requires_grad
    with torch.no_grad():
        layer.token_values.normal_()
    x = torch.tensor([[1, 5, 2, 9]])
    with torch.no_grad():
        want = model(x).logits
        with disable_lora(model):
            assert (model(x).logits - want).abs().max() > 1e-3
        merge_lora(model)
        torch.testing.assert_close(model(x).logits, want)
        unmerge_lora(model)
        torch.testing.assert_close(model.model.embed_tokens.weight, base.model.embed_tokens.weight,
                                   atol=0, rtol=0)
        plain = merge_and_unload(model)
        assert type(plain.model.embed_tokens) is nn.Embedding
        torch.testing.assert_close(plain(x).logits, want)


@pytest.mark.parametrize("make, config, match", [
    (tiny_phi3, {"trainable_token_indices": {"nope": [1]}}, r"\['nope'\] matched no module"),
    (tiny_phi3, {"trainable_token_indices": {"o_proj": [1]}}, r"trainable tokens need an nn.Embedding"),
    (tiny_phi3, {"trainable_token_indices": {"embed_tokens": [1]}, "target_modules": ["embed_tokens"]},
     r"is also a LoRA target"),
    (tiny_phi3, {"trainable_token_indices": {"embed_tokens": [10_000]}}, r"outside the embedding"),
    (tiny_gpt2, {"trainable_token_indices": {"wte": [1]}, "target_modules": ["c_attn"]},
     r"the table of 'transformer.wte' is tied to \['lm_head'\]"),
    (lambda: nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 2)),
     {"trainable_token_indices": [1], "target_modules": ["1"]}, r"has no get_input_embeddings"),
])
def test_injection_refusals_name_the_entry_and_change_nothing(make, config, match):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        inject_lora(model, LoraConfig(**{"target_modules": ["o_proj"], **config}))
    assert not lora_modules(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# -- against HF PEFT ----------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def test_same_values_as_peft_give_peft_s_outputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(10, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(self.emb(x))

    torch.manual_seed(0)
    net = Net()
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(
        target_modules=["lin"], trainable_token_indices={"emb": IDS}, init_lora_weights=False))
    ours = inject_lora(copy.deepcopy(net), LoraConfig(r=8, lora_alpha=8, target_modules=["lin"],
                                                      trainable_token_indices={"emb": IDS}))
    adapter = theirs.base_model.model.emb.token_adapter
    with torch.no_grad():
        adapter.trainable_tokens_delta["default"].normal_()
        ours.emb.token_values.copy_(adapter.trainable_tokens_delta["default"])
        ours.lin.lora_A.copy_(theirs.base_model.model.lin.lora_A["default"].weight)
        ours.lin.lora_B.copy_(theirs.base_model.model.lin.lora_B["default"].weight)
        x = torch.tensor([[3, 1, 0, 7, 2]])
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    assert json.loads(json.dumps(ours._lora_phi3_config.trainable_token_indices)) == {"emb": IDS}
