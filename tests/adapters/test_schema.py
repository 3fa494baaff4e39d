"""The adapter_config.json schema: every field's type is checked before anything reads it, with one
ValueError naming the field path, the value and what is allowed, for every reader of our files."""

import json

import pytest
import torch

from lora_phi3.adapters import load_adapter, read_adapter, save_adapter
from lora_phi3.adapters.schema import check_adapter_json
from lora_phi3.finetune.cli import main
from lora_phi3.inject import get_lora_config, lora_modules
from tiny import adapted, tiny_phi3

QKV = "model.layers.0.self_attn.qkv_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = save_adapter(adapted(), tmp_path_factory.mktemp("schema") / "a")
    return path, json.loads((path / "adapter_config.json").read_text())


def edit(doc, path, value=KeyError):
    """``doc`` with the field at ``path`` (a tuple of keys) set to ``value``, or dropped."""
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if value is KeyError:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


CASES = [  # (field path, new value or KeyError to drop it, the message)
    (("modules", QKV), 0,
     rf"modules\['{QKV}'\] must be an object of per-module facts, got 0"),
    (("lora_config",), 2.5,
     r"lora_config must be an object \(LoraConfig fields\) or null, got 2.5"),
    (("modules", QKV, "r"), "x", rf"modules\['{QKV}'\]\.r must be an int >= 1, got 'x'"),
    (("modules", QKV, "lora_alpha"), None,
     rf"modules\['{QKV}'\]\.lora_alpha must be a finite number, got None"),
    (("modules", QKV, "enable_lora"), [1, 0, 1],
     rf"modules\['{QKV}'\]\.enable_lora must be a non-empty list of bools, got \[1, 0, 1\]"),
    (("modules", QKV, "split_sizes"), {"a": 1},
     rf"modules\['{QKV}'\]\.split_sizes must be a non-empty list of ints >= 1, got \{{'a': 1\}}"),
    (("modules", QKV, "scaling"), float("nan"),
     rf"modules\['{QKV}'\]\.scaling must be a finite number, got nan"),
    (("modules", QKV, "r"), KeyError, rf"modules\['{QKV}'\] lacks field 'r'"),
    (("modules", QKV, "dropout"), 0.1, rf"modules\['{QKV}'\] has unknown field\(s\) \['dropout'\]"),
    (("modules",), [], r"modules must be an object \{module path: facts\}, got \[\]"),
    (("lora_config", "r"), 0, r"lora_config: LoraConfig.r must be a positive int, got 0"),
    (("lora_config", "target_modules"), 5,
     r"lora_config: LoraConfig.target_modules must be a list of module names or one regex string, "
     r"got 5"),
    (("lora_config", "rank"), 4, r"lora_config: LoraConfig got unknown field\(s\) \['rank'\]"),
    (("tensors",), 1, r"tensors must be an object \{key: \{shape, dtype\}\}, got 1"),
    (("tensors", f"{QKV}.lora_A"), "x",
     rf"tensors\['{QKV}.lora_A'\] must be an object \{{shape, dtype\}}, got 'x'"),
    (("tensors", f"{QKV}.lora_A", "shape"), [8, "64"],
     rf"tensors\['{QKV}.lora_A'\]\.shape must be a list of ints >= 0, got \[8, '64'\]"),
    (("tensors", f"{QKV}.lora_A", "dtype"), "F32",
     rf"tensors\['{QKV}.lora_A'\]\.dtype must be one of"),
    (("num_bytes",), "27792", r"num_bytes must be an int >= 0, got '27792'"),
    (("sha256",), 5, r"sha256 must be 64 lowercase hex digits, got 5"),
    (("base_model",), 3, r"base_model must be an object, got 3"),
    (("base_model", "name_or_path"), ["x"],
     r"base_model.name_or_path must be a string or null, got \['x'\]"),
    (("tensor_file",), "other.safetensors",
     r"tensor_file must be 'adapter.safetensors', got 'other.safetensors'"),
    (("modules",), KeyError, r"missing field 'modules'"),
    (("extra",), 1, r"unknown field\(s\) \['extra'\] for format_version 1"),
    (("format_version",), True,
     r"format_version True is not supported; this library reads versions 1..1"),
]


@pytest.mark.parametrize("field, value, message", CASES,
                         ids=[f"{'.'.join(c[0])}={c[1]!r}" for c in CASES])
def test_a_bad_field_is_one_value_error_naming_it_and_changes_nothing(saved, tmp_path, field, value,
                                                                      message):
    src, doc = saved
    path = tmp_path / "a"
    path.mkdir()
    (path / "adapter.safetensors").write_bytes((src / "adapter.safetensors").read_bytes())
    (path / "adapter_config.json").write_text(json.dumps(edit(doc, field, value)))
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {message}"):
        read_adapter(path)
    for model in (tiny_phi3(), adapted(seed=2)):  # a bare model and an injected one
        before = {k: v.clone() for k, v in model.state_dict().items()}
        config, layers = get_lora_config(model), list(lora_modules(model))
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
        assert get_lora_config(model) == config and list(lora_modules(model)) == layers
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_cli_reads_through_the_same_validator(saved, tmp_path, capsys):
    # Without --model, `lora-phi3 export-peft` reads the base model's name from the file first.
    src, doc = saved
    path = tmp_path / "a"
    path.mkdir()
    (path / "adapter.safetensors").write_bytes((src / "adapter.safetensors").read_bytes())
    (path / "adapter_config.json").write_text(json.dumps(edit(doc, ("base_model",), 3)))
    with pytest.raises(SystemExit) as exit_info:
        main(["export-peft", "--adapter", str(path), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "adapter_config.json: base_model must be an object, got 3" in capsys.readouterr().err


def test_the_saved_document_passes_and_yields_its_config(saved):
    _, doc = saved
    assert check_adapter_json(doc, "x").to_file_dict() == doc["lora_config"]
    assert check_adapter_json(edit(doc, ("lora_config",), None), "x") is None
