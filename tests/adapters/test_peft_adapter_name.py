"""``adapter_name`` in the PEFT export and import: one named adapter of several goes out as PEFT's
only adapter, and a PEFT file comes in as a named adapter (into a bare model, or beside others)."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_phi3 import (LoraConfig, active_adapter, add_adapter, adapter_names, inject_lora,
                       set_adapter)
from lora_phi3.adapters import export_peft, import_peft, peft_state_dict

peft = pytest.importorskip("peft")

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def two_adapters() -> nn.Module:
    """``default`` on layer 0 (r=2), ``other`` on layer 2 (r=3, DoRA); ``default`` active."""
    model = mlp()
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    add_adapter(model, LoraConfig(r=3, lora_alpha=3, target_modules=["2"], use_dora=True,
                                  init_lora_weights=False), "other")
    return model


def out(model):
    with torch.no_grad():
        return model(X)


def test_export_of_a_named_adapter_is_that_adapter_and_restores_the_active_one(tmp_path):
    model = two_adapters()
    export_peft(model, tmp_path / "other", adapter_name="other")
    assert active_adapter(model) == "default" and model[0].r == 2
    cfg = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["use_dora"] is True and cfg["target_modules"] == ["2"]
    st = load_file(str(tmp_path / "other" / "adapter_model.safetensors"))
    assert sorted(st) == ["base_model.model.2.lora_A.weight", "base_model.model.2.lora_B.weight",
                          "base_model.model.2.lora_magnitude_vector"]
    set_adapter(model, "other")
    want = out(model)
    tensors, _ = peft_state_dict(model)  # the same as exporting it while active
    assert all(torch.equal(tensors[k], st[k]) for k in st)
    theirs = peft.PeftModel.from_pretrained(mlp(), tmp_path / "other").eval()
    torch.testing.assert_close(out(theirs), want, atol=1e-5, rtol=0)


def test_export_of_an_unknown_adapter_names_the_model_s(tmp_path):
    with pytest.raises(ValueError, match=r"export_peft: unknown adapter_name 'nope'; the model's "
                                         r"adapters are \['default', 'other'\]"):
        export_peft(two_adapters(), tmp_path / "p", adapter_name="nope")
    assert not (tmp_path / "p").exists()


def _peft_file(tmp_path, **config):
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    return theirs, tmp_path / "peft"


def test_import_into_a_bare_model_injects_under_the_name(tmp_path):
    theirs, path = _peft_file(tmp_path, r=2, lora_alpha=4, target_modules=["0"])
    model = import_peft(mlp(), path, adapter_name="imported")
    assert adapter_names(model) == ["imported"] and active_adapter(model) == "imported"
    torch.testing.assert_close(out(model), out(theirs), atol=1e-5, rtol=0)


def test_import_beside_other_adapters_adds_an_inactive_one(tmp_path):
    theirs, path = _peft_file(tmp_path, r=4, lora_alpha=8, target_modules=["0", "2"],
                              lora_bias=True)
    model = two_adapters()
    before = out(model)
    import_peft(model, path, adapter_name="peft")
    assert adapter_names(model) == ["default", "other", "peft"] and active_adapter(model) == "default"
    torch.testing.assert_close(out(model), before, atol=0, rtol=0)  # the active one is unchanged
    set_adapter(model, "peft")
    assert model[0].lora_bias.shape == (8,) and model[0].lora_bias.any()
    torch.testing.assert_close(out(model), out(theirs), atol=1e-5, rtol=0)


def test_a_refused_import_beside_other_adapters_leaves_the_model_as_it_was(tmp_path):
    _, path = _peft_file(tmp_path, r=2, target_modules=["0"], modules_to_save=["2"])
    model = two_adapters()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="modules_to_save"):
        import_peft(model, path, adapter_name="peft")
    assert adapter_names(model) == ["default", "other"] and active_adapter(model) == "default"
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())


def test_a_load_refused_after_adding_deletes_the_adapter_again(tmp_path, monkeypatch):
    """The checks against the added adapter's layers come after add_adapter; a refusal there
    deletes it again."""
    import lora_phi3.adapters.peft_import as peft_import
    _, path = _peft_file(tmp_path, r=2, target_modules=["0"])
    model = two_adapters()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real = peft_import._checked_tensors

    def refuse(*args, **kwargs):
        real(*args, **kwargs)
        raise ValueError("refused for the test")
    monkeypatch.setattr(peft_import, "_checked_tensors", refuse)
    with pytest.raises(ValueError, match="refused for the test"):
        import_peft(model, path, adapter_name="peft")
    assert adapter_names(model) == ["default", "other"] and active_adapter(model) == "default"
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("name, message", [
    ("other", r"import_peft: the model already has an adapter 'other' \(adapters: \['default', "
              r"'other'\]\); import under a new name, or delete_adapter it first "
              r"\(load_adapter\(model, path, adapter_name=...\) hot-swaps"),
    ("a.b", r"adapter_name must be a non-empty string without '\.', got 'a.b'"),
])
def test_an_existing_or_malformed_name_is_refused(tmp_path, name, message):
    _, path = _peft_file(tmp_path, r=2, target_modules=["0"])
    model = two_adapters()
    with pytest.raises(ValueError, match=message):
        import_peft(model, path, adapter_name=name)
    assert adapter_names(model) == ["default", "other"]
