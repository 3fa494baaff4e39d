"""LoraConfig: validation of every field, normalisation, JSON/YAML round trips."""

import math

import pytest

from lora_phi3.config import LoraConfig


def test_defaults_and_scaling():
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.0, "none")
    assert config.target_modules is None and config.quantize_base is None
    assert LoraConfig(r=4, lora_alpha=32).scaling == 8.0


@pytest.mark.parametrize("field, value, match", [
    ("r", 0, r"r must be a positive int, got 0"),
    ("r", -2, r"r must be a positive int, got -2"),
    ("r", 1.5, r"r must be a positive int, got 1.5"),
    ("r", True, r"r must be a positive int, got True"),
    ("lora_alpha", 0, r"lora_alpha must be a finite number > 0, got 0"),
    ("lora_alpha", -1.0, r"lora_alpha must be a finite number > 0, got -1.0"),
    ("lora_alpha", "16", r"lora_alpha must be a finite number > 0, got '16'"),
    ("lora_alpha", math.nan, r"lora_alpha must be a finite number > 0, got nan"),
    ("lora_alpha", math.inf, r"lora_alpha must be a finite number > 0, got inf"),
    ("lora_dropout", 1.0, r"lora_dropout must be a float in \[0, 1\), got 1.0"),
    ("lora_dropout", -0.1, r"lora_dropout must be a float in \[0, 1\), got -0.1"),
    ("lora_dropout", "0.1", r"lora_dropout must be a float in \[0, 1\), got '0.1'"),
    ("target_modules", [], r"target_modules must not be empty, got \[\]"),
    ("target_modules", "", r"target_modules must not be an empty string"),
    ("target_modules", ["q_proj", 3], r"target_modules must be a list of module names or one regex"),
    ("target_modules", 5, r"target_modules must be a list of module names or one regex string, got 5"),
    ("target_modules", "layers.(", r"target_modules: a single string is a regex .* 'layers.\(' is not valid"),
    ("exclude_modules", "[", r"exclude_modules: a single string is a regex .* '\[' is not valid"),
    ("exclude_modules", [""], r"exclude_modules must be a list of module names or one regex"),
    ("bias", "some", r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"),
    ("modules_to_save", [], r"modules_to_save must not be empty, got \[\]"),
    ("modules_to_save", 3, r"modules_to_save must be a list of module names or one regex string, got 3"),
    ("layers_to_transform", [], r"layers_to_transform must be a non-empty list of ints >= 0, got \[\]"),
    ("layers_to_transform", [-1], r"layers_to_transform must be a non-empty list of ints >= 0, got \[-1\]"),
    ("layers_to_transform", ["0"], r"layers_to_transform must be .* got \['0'\]"),
    ("layers_to_transform", [True], r"layers_to_transform must be .* got \[True\]"),
    ("layers_to_transform", "0", r"layers_to_transform must be .* got '0'"),
    ("fan_in_fan_out", "yes", r"fan_in_fan_out must be a bool, got 'yes'"),
    ("fan_in_fan_out", 1, r"fan_in_fan_out must be a bool, got 1"),
    ("quantize_base", "int8", r"quantize_base must be one of \(None, 'nf4'\), got 'int8'"),
])
def test_every_field_is_validated(field, value, match):
    with pytest.raises(ValueError, match=r"LoraConfig\." + match):
        LoraConfig(**{field: value})


def test_normalisation():
    config = LoraConfig(target_modules=("q_proj", "v_proj"), modules_to_save="lm_head",
                        layers_to_transform=3, exclude_modules=r".*\.0\..*")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.modules_to_save == ["lm_head"]  # a single name, not a regex
    assert config.layers_to_transform == [3]
    assert config.exclude_modules == r".*\.0\..*"
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    # modules_to_save names are suffixes: a string that is no valid regex is still a fine name
    assert LoraConfig(modules_to_save="head[").modules_to_save == ["head["]


def test_from_dict_rejects_unknown_fields_and_non_mappings():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]; allowed: .*'r'"):
        LoraConfig.from_dict({"rank": 4})
    with pytest.raises(ValueError, match=r"LoraConfig needs a mapping, got list"):
        LoraConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match=r"LoraConfig.r must be a positive int, got 0"):
        LoraConfig.from_dict({"r": 0})


CONFIGS = [
    LoraConfig(),
    LoraConfig(r=4, lora_alpha=8.5, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
               exclude_modules=["layers.0.self_attn.q_proj"], bias="lora_only",
               modules_to_save=["embed_tokens"], layers_to_transform=[0, 2], quantize_base="nf4"),
    LoraConfig(target_modules=r"model\.layers\.\d+\.mlp\.down_proj", exclude_modules=r".*\.1\..*",
               fan_in_fan_out=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_json_round_trip(config, tmp_path):
    assert LoraConfig.from_json(config.to_json()) == config
    path = tmp_path / "adapter_config.json"
    text = config.to_json(path)
    assert path.read_text() == text + "\n"
    assert LoraConfig.from_json(path) == config
    assert LoraConfig.from_json(str(path)) == config
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_config.json"]  # no temp file left


@pytest.mark.parametrize("config", CONFIGS)
def test_yaml_round_trip(config, tmp_path):
    assert LoraConfig.from_yaml(config.to_yaml()) == config
    path = tmp_path / "lora.yaml"
    config.to_yaml(path)
    assert LoraConfig.from_yaml(path) == config
    assert LoraConfig.from_yaml(str(path)) == config
    assert [p.name for p in tmp_path.iterdir()] == ["lora.yaml"]


def test_yaml_and_json_inline_text():
    assert LoraConfig.from_yaml("r: 4\ntarget_modules: [qkv_proj]\n") == \
        LoraConfig(r=4, target_modules=["qkv_proj"])
    assert LoraConfig.from_yaml("") == LoraConfig()
    assert LoraConfig.from_json('{"r": 2, "lora_alpha": 4}').scaling == 2.0


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"is neither inline config text nor an existing file"):
        LoraConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"'.*nope.yaml' is neither inline config text"):
        LoraConfig.from_yaml(str(tmp_path / "nope.yaml"))


def test_use_rslora_is_validated_and_round_trips():
    cfg = LoraConfig(use_rslora=True)
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_file_dict()["use_rslora"] is True
    assert "use_rslora" not in LoraConfig().to_file_dict()  # at its default: left out of files
    with pytest.raises(ValueError, match="LoraConfig.use_rslora must be a bool, got 1"):
        LoraConfig(use_rslora=1)
