"""Files written before the package's redesign (commit a51e600) load, compute and save back as
they did: the adapter and PEFT formats stayed compatible.

``fixtures/v1_ours`` and ``fixtures/v1_peft`` were written by that commit's ``save_adapter`` and
``export_peft`` from ``tiny_phi3()`` injected with ``PER_SLICE`` targets (r=4, alpha=8) and
``randomize_lora(model, seed=3)``.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_phi3 import export_peft, import_peft, load_adapter, save_adapter
from tiny import dense_reference, logits, tiny_phi3

FIXTURES = Path(__file__).parent / "fixtures"


def _json_without_checksum(path: Path) -> dict:
    # sha256/num_bytes cover the safetensors bytes, whose metadata order safetensors does not fix
    doc = json.loads(path.read_text())
    doc.pop("sha256", None)
    doc.pop("num_bytes", None)
    return doc


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def test_our_v1_file_loads_into_a_bare_model_and_saves_back_identically(tmp_path):
    model = load_adapter(tiny_phi3(), FIXTURES / "v1_ours")
    torch.testing.assert_close(logits(model), logits(dense_reference(model)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model), logits(tiny_phi3()), atol=1e-3)  # B is not zero
    save_adapter(model, tmp_path / "again")
    assert _json_without_checksum(tmp_path / "again" / "adapter_config.json") == \
        _json_without_checksum(FIXTURES / "v1_ours" / "adapter_config.json")
    _same_tensors(tmp_path / "again" / "adapter.safetensors",
                  FIXTURES / "v1_ours" / "adapter.safetensors")


def test_a_v1_peft_export_imports_to_the_same_model_and_exports_back_identically(tmp_path):
    ours = load_adapter(tiny_phi3(), FIXTURES / "v1_ours")
    model = import_peft(tiny_phi3(), FIXTURES / "v1_peft")
    torch.testing.assert_close(logits(model), logits(ours), atol=1e-5, rtol=1e-5)
    export_peft(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == \
        json.loads((FIXTURES / "v1_peft" / "adapter_config.json").read_text())
    _same_tensors(tmp_path / "again" / "adapter_model.safetensors",
                  FIXTURES / "v1_peft" / "adapter_model.safetensors")
