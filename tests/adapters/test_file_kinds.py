"""Adapter files for every layer kind: trainable tokens and PEFT-layout convs save, load and are
checked by what each kind holds; a file from another conv layout is refused by name."""

import json

import pytest
import torch
import torch.nn as nn

import lora_phi3 as lora


def _tokens_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8))


def test_trainable_tokens_round_trip_through_a_file(tmp_path):
    model = _tokens_model()
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["1"],
                                            trainable_token_indices={"0": [3, 5]}))
    with torch.no_grad():
        model[0].token_values.add_(1.0)
        model[1].lora_B.normal_()
    x = torch.tensor([[3, 4, 5]])
    want = model(x)
    lora.save_adapter(model, tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert doc["modules"]["0"]["token_indices"] == [3, 5]
    back = lora.load_adapter(_tokens_model(), tmp_path / "a")
    assert isinstance(back[0], lora.TrainableTokens)
    torch.testing.assert_close(back(x), want, atol=0, rtol=0)


def test_a_file_whose_conv_layout_differs_is_refused_by_name(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["0"]))
    lora.save_adapter(model, tmp_path / "a")
    doc_path = tmp_path / "a" / "adapter_config.json"
    doc = json.loads(doc_path.read_text())
    assert doc["modules"]["0"]["lora_layout"] == "peft"
    target = nn.Sequential(nn.Conv2d(3, 4, 3))
    lora.inject_lora(target, lora.LoraConfig(r=2, target_modules=["0"]))
    doc["modules"]["0"]["lora_layout"] = "loralib"  # as an older save of the other layout says
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"module 0 differs \(file, model\): \{'lora_layout': "
                                         r"\('loralib', 'peft'\)\}"):
        lora.load_adapter(target, tmp_path / "a")


def test_merge_lora_that_cannot_finish_leaves_every_weight_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["0", "1"]))
    for layer in lora.lora_modules(model).values():
        with torch.no_grad():
            layer.lora_B.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        lora.merge_lora(model, safe_merge=False)  # the grouped conv cannot merge in PEFT's layout
    assert not any(m.merged for m in lora.lora_modules(model).values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
