"""Recipes: TrainingConfig validation, the built-in recipes, recipe files and the precedence
defaults < file < overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_phi3.finetune.recipe import (DEMO_LORA, DEMO_TRAINING, PHI3_MINI_TRAINING, Recipe,
                                       TrainingConfig, flag_name, load_recipe, read_recipe_file)

REPO = Path(__file__).resolve().parents[2]


# -- TrainingConfig validation ---------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", 0, r"training.learning_rate \(--learning-rate\) must be a number > 0, got 0"),
    ("batch_size", 0, r"--batch-size\) must be an integer >= 1, got 0"),
    ("batch_size", 2.5, r"--batch-size\) must be an integer >= 1, got 2.5"),
    ("warmup_ratio", 1.0, r"--warmup-ratio\) must be a number >= 0 and < 1, got 1.0"),
    ("lr_scheduler", "step", r"--lr-scheduler\) must be one of \['cosine', 'linear', 'constant'\]"),
    ("on_bad_row", "ignore", r"--on-bad-row\) must be one of \['skip', 'error'\], got 'ignore'"),
    ("max_steps", 0, r"--max-steps\) must be an integer >= 1, got 0"),
    ("packing", "yes", r"--packing\) must be true or false, got 'yes'"),
    ("max_grad_norm", float("nan"), r"--max-grad-norm\) must be a number >= 0"),
])
def test_training_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig(**{field: value})


def test_training_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr'\]; allowed: .*learning_rate"):
        TrainingConfig.from_dict({"lr": 1e-4})
    assert TrainingConfig.from_dict({"batch_size": 2}).batch_size == 2


# -- built-in recipes, files and overrides --------------------------------------------------------
def test_phi3_mini_recipe_is_the_model_card_recipe_with_a_lora_learning_rate():
    r = load_recipe(REPO / "recipes" / "phi3-mini.yaml")
    t, lo = r.training, r.lora
    assert r.model == "microsoft/Phi-3-mini-4k-instruct" and not r.is_demo
    assert (lo.r, lo.lora_alpha, lo.lora_dropout) == (16, 32, 0.05)
    assert lo.target_modules == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert (t.bf16, t.gradient_checkpointing, t.lr_scheduler, t.warmup_ratio) == (True, True, "cosine", 0.2)
    assert (t.batch_size, t.max_seq_length, t.packing, t.epochs, t.max_steps) == (4, 2048, True, 1.0, None)
    assert t.learning_rate == 2e-4
    # the built-in defaults for a real model are the same recipe
    builtin = load_recipe(overrides={"model": "microsoft/Phi-3-mini-4k-instruct"})
    assert builtin.training == t and builtin.lora == lo


def test_flags_override_the_file_and_epochs_clears_max_steps(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("training:\n  batch_size: 3\n  max_steps: 50\nlora:\n  r: 4\n")
    r = load_recipe(cfg, overrides={"training": {"learning_rate": 1e-3}, "lora": {"lora_alpha": 8}})
    assert r.is_demo and r.training.batch_size == 3 and r.training.max_steps == 50
    assert r.training.learning_rate == 1e-3 and (r.lora.r, r.lora.lora_alpha) == (4, 8)
    assert r.training.max_seq_length == DEMO_TRAINING["max_seq_length"]  # demo defaults underneath
    r2 = load_recipe(cfg, overrides={"training": {"epochs": 2.0}})
    assert r2.training.max_steps is None and r2.training.epochs == 2.0


def test_a_written_recipe_loads_back_as_the_same_recipe(tmp_path):
    """``recipe.json`` of a run (``Recipe.to_dict``) is a valid recipe file giving the same run."""
    r = load_recipe(overrides={"data": "chats.jsonl", "output_dir": str(tmp_path / "o"),
                               "training": {"batch_size": 2, "seed": 7},
                               "lora": {"r": 4, "target_modules": ["o_proj"]}})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(r.to_dict()))
    again = load_recipe(path)
    assert again == r
    assert again.to_dict() == r.to_dict()


def test_demo_and_model_defaults_differ_only_where_the_demo_needs_it():
    demo = load_recipe()
    assert demo.is_demo and demo.model is None and demo.data is None
    assert demo.output_dir == "lora-phi3-output"
    assert demo.training == TrainingConfig(**DEMO_TRAINING)
    assert (demo.lora.r, demo.lora.lora_dropout) == (DEMO_LORA["r"], DEMO_LORA["lora_dropout"])
    real = load_recipe(overrides={"model": "some/model"})
    assert not real.is_demo and real.training == TrainingConfig(**PHI3_MINI_TRAINING)
    # a top-level None override is "not given"
    assert load_recipe(overrides={"model": None, "data": None, "output_dir": None}) == demo


def test_default_recipe_object_equals_the_built_in_real_recipe():
    assert Recipe().training == load_recipe(overrides={"model": "m"}).training


@pytest.mark.parametrize("text,match", [
    ("training: [1, 2]\n", r"the 'training' section must be a mapping, got \[1, 2\]"),
    ("lora: 3\n", r"the 'lora' section must be a mapping, got 3"),
    ("- a\n- b\n", r"must hold a mapping with 'training' and 'lora' sections, got list"),
    ("training: {batch_size: 2\n", r"is not valid YAML"),
    ("lora:\n  r: 0\n", r"lora section / LoRA flags \(--r, --lora-alpha, ...\): .*r must be a positive int, got 0"),
])
def test_bad_recipe_files_are_refused_with_the_reason(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_recipe(path)


def test_empty_recipe_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert read_recipe_file(path) == {}
    assert load_recipe(path) == load_recipe()


def test_flag_names_match_the_fields():
    assert flag_name("gradient_accumulation_steps") == "--gradient-accumulation-steps"
    with pytest.raises(ValueError, match=r"training.save_total_limit \(--save-total-limit\)"):
        TrainingConfig(save_total_limit=-1)
