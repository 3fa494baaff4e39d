"""PiSSA/OLoRA adapters saved for the ORIGINAL base weights (``adapters/conversion.py``): the
rank-2r conversion on save and PEFT export, the record in the file, and a resumed run splitting its
own save back (or refusing a file from another initialisation) without changing anything."""

import json

import pytest
import torch

from lora_phi3 import lora_modules
from lora_phi3.adapters import export_peft, load_adapter, save_adapter
from test_pissa import _pissa, peft
from tiny import logits, randomize_lora, tiny_phi3


@pytest.mark.parametrize("init, kw", [("pissa", {}), ("olora", {"use_rslora": True}),
                                      ("pissa", {"use_dora": True})])
def test_saved_adapter_applies_to_the_original_base(tmp_path, init, kw):
    model, _ = _pissa(init, **kw)
    randomize_lora(model, seed=3, scale=0.2)  # "trained"
    want = logits(model)
    save_adapter(model, tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert doc["init_conversion"] == {"init_lora_weights": init, "r": 4, "lora_alpha": 8}
    assert doc["lora_config"]["r"] == 8 and "init_lora_weights" not in doc["lora_config"]
    fresh = load_adapter(tiny_phi3(), tmp_path / "a")  # the ORIGINAL base, no second step
    torch.testing.assert_close(logits(fresh), want, atol=1e-4, rtol=0)
    export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    # rank 2r per slice; q and v stacked block-diagonally in qkv_proj: 2 * 8
    assert cfg["r"] == 16 and cfg["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), want, atol=1e-4, rtol=0)


def test_a_resumed_pissa_run_reads_its_own_save_back(tmp_path):
    model, _ = _pissa()
    randomize_lora(model, seed=3, scale=0.2)
    save_adapter(model, tmp_path / "a")
    resumed, _ = _pissa()  # the same init again: same residual, same A0/B0
    load_adapter(resumed, tmp_path / "a")
    for name, layer in lora_modules(model).items():
        assert torch.equal(lora_modules(resumed)[name].lora_A, layer.lora_A)
        assert torch.equal(lora_modules(resumed)[name].lora_B, layer.lora_B)
    torch.testing.assert_close(logits(resumed), logits(model), atol=0, rtol=0)


def test_a_save_from_another_init_is_refused_by_a_pissa_model(tmp_path):
    model, _ = _pissa()
    randomize_lora(model, seed=3, scale=0.2)
    save_adapter(model, tmp_path / "a")
    other, _ = _pissa("olora")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="converted from a 'pissa' initialisation other than"):
        load_adapter(other, tmp_path / "a")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
