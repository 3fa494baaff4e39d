"""The recipe's ``model_kwargs`` (how the model is loaded): validation, the file section and its
flags, each setting reaching the loaded model's config, flash_attention_2 refused with the package
named, and packed rows leak-free under every attention implementation available here."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import transformers
import transformers.dynamic_module_utils

from lora_phi3.finetune import model_kwargs as mk
from lora_phi3.finetune.cli import _overrides, build_parser, main
from lora_phi3.finetune.conversations import load_conversations
from lora_phi3.finetune.data import tokenize_dataset
from lora_phi3.finetune.generate import generate_answer
from lora_phi3.finetune.model_kwargs import ATTN_IMPLEMENTATIONS, ModelKwargs
from lora_phi3.finetune.models import build_tiny_phi3, load_model, load_training_model
from lora_phi3.finetune.packing import collate, pack_examples
from lora_phi3.finetune.recipe import load_recipe
from lora_phi3.finetune.train import CausalLMLoss
from runs import REPO

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2)
HAVE_FLASH = mk.attn_implementation_available("flash_attention_2")


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    """A local HF checkpoint (tiny Phi-3 + the embedded tokenizer), as a hub model would be."""
    path = tmp_path_factory.mktemp("ckpt")
    build_tiny_phi3(len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    **TINY).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def no_flash_attn(monkeypatch):
    """This machine without the flash-attn package, whatever is installed."""
    real = mk.importlib.util.find_spec
    monkeypatch.setattr(mk.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))


# -- the dataclass -------------------------------------------------------------------------------
def test_defaults_are_sdpa_dtype_from_bf16_no_cache_no_remote_code():
    kw = ModelKwargs()
    assert (kw.attn_implementation, kw.torch_dtype, kw.use_cache, kw.trust_remote_code) == \
        ("sdpa", None, False, False)
    assert kw.dtype(use_bf16=True) is torch.bfloat16 and kw.dtype(use_bf16=False) is torch.float32
    assert ModelKwargs(torch_dtype="bf16").torch_dtype == "bfloat16"  # aliases are normalised
    assert ModelKwargs(torch_dtype=torch.float16).dtype(use_bf16=True) is torch.float16
    assert ModelKwargs(torch_dtype="auto").dtype(use_bf16=True) == "auto"


@pytest.mark.parametrize("field,value,match", [
    ("attn_implementation", "flash", r"model_kwargs.attn_implementation \(--attn-implementation\) "
                                     r"must be one of \['sdpa', 'eager', 'flash_attention_2'\], got 'flash'"),
    ("torch_dtype", "int8", r"model_kwargs.torch_dtype \(--torch-dtype\) must be null \(follow "
                            r"training.bf16\) or one of \['auto', 'bfloat16', 'float16', 'float32'\], "
                            r"got 'int8'"),
    ("use_cache", "no", r"model_kwargs.use_cache \(--use-cache\) must be true or false, got 'no'"),
    ("trust_remote_code", 1, r"model_kwargs.trust_remote_code \(--trust-remote-code\) must be true "
                             r"or false, got 1"),
])
def test_bad_values_name_the_field_the_flag_and_the_value(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelKwargs(**{field: value})


# -- the recipe section and the flags ---------------------------------------------------------------
def test_the_section_loads_from_a_file_and_flags_override_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: some/model\nmodel_kwargs:\n  attn_implementation: eager\n"
                    "  torch_dtype: float32\n  trust_remote_code: true\n")
    r = load_recipe(path)
    assert r.model_kwargs == ModelKwargs("eager", "float32", False, True)
    args = build_parser().parse_args(["finetune", "--config", str(path), "--attn-implementation",
                                      "sdpa", "--torch-dtype", "bfloat16", "--use-cache",
                                      "--no-trust-remote-code"])
    r2 = load_recipe(args.config, overrides=_overrides(args))
    assert r2.model_kwargs == ModelKwargs("sdpa", "bfloat16", True, False)
    # a run's recipe.json carries the section and loads back as the same recipe
    (tmp_path / "recipe.json").write_text(json.dumps(r2.to_dict()))
    assert load_recipe(tmp_path / "recipe.json") == r2
    # without the section (every recipe written before it): the defaults
    assert load_recipe(overrides={"model": "m"}).model_kwargs == ModelKwargs()


@pytest.mark.parametrize("text,match", [
    ("model_kwargs: [1]\n", r"the 'model_kwargs' section must be a mapping, got \[1\]"),
    ("model_kwargs: {attn: eager}\n", r"model_kwargs: unknown field\(s\) \['attn'\]; allowed: "
                                      r"\['attn_implementation', 'torch_dtype', 'use_cache', "
                                      r"'trust_remote_code'\]"),
    ("model: {name_or_path: m, attn_implementation: eager}\n",
     r"model must be a hub id or a local directory \(a string\), got \{.*\}; loading settings go "
     r"in the 'model_kwargs' section"),
    ("model_kwargs: {attn_implementation: flash_attention_2}\n",
     r"'flash_attention_2' cannot keep packed examples apart .* use --no-packing with it, or 'sdpa'"),
])
def test_bad_sections_are_refused_with_the_reason(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_recipe(path)


def test_flash_attention_2_without_its_package_is_refused_naming_it(no_flash_attn, tok, tmp_path,
                                                                    capsys):
    with pytest.raises(ValueError, match=r"'flash_attention_2' needs the flash-attn package "
                                         r"\(import flash_attn\), which is not installed"):
        mk.check_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        load_model(None, tokenizer=tok, attn_implementation="flash_attention_2")
    # the command stops before reading any data, with the message and exit status 2
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--attn-implementation", "flash_attention_2", "--no-packing",
              "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert e.value.code == 2
    assert "needs the flash-attn package (import flash_attn)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_a_qlora_base_needs_a_named_dtype(checkpoint, tok):
    recipe = load_recipe(overrides={"model": checkpoint, "lora": {"quantize_base": "nf4"},
                                    "model_kwargs": {"torch_dtype": "auto"}})
    with pytest.raises(ValueError, match=r"model_kwargs.torch_dtype 'auto' cannot be used with "
                                         r"quantize_base: name the compute dtype"):
        load_training_model(recipe, tok, use_bf16=True, device="cpu")


def test_flash_attention_2_passes_the_check_when_its_package_is_there(monkeypatch):
    real = mk.importlib.util.find_spec
    monkeypatch.setattr(mk.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    mk.check_attn_implementation("flash_attention_2")
    ModelKwargs("flash_attention_2").check_available()
    ModelKwargs("flash_attention_2").check_packing(False)


# -- each setting reaches the loaded model's config ----------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("torch_dtype,bf16,want", [
    (None, True, torch.bfloat16), (None, False, torch.float32), ("float32", True, torch.float32),
    ("bfloat16", False, torch.bfloat16), ("auto", True, torch.float32),  # the checkpoint's: fp32
])
@pytest.mark.parametrize("use_cache", [False, True])
def test_each_setting_reaches_the_config_of_the_model_the_job_trains(checkpoint, tok, attn,
                                                                     torch_dtype, bf16, want,
                                                                     use_cache):
    for model in (checkpoint, None):  # a local checkpoint and the embedded demo model
        recipe = load_recipe(overrides={"model": model, "training": {"bf16": bf16},
                                        "model_kwargs": {"attn_implementation": attn,
                                                         "torch_dtype": torch_dtype,
                                                         "use_cache": use_cache}})
        loaded = load_training_model(recipe, tok, use_bf16=bf16, device="cpu")
        cfg = loaded.config
        assert cfg._attn_implementation == attn
        assert cfg.use_cache is use_cache
        assert cfg.dtype == want and loaded.model.embed_tokens.weight.dtype == want
        assert loaded.training


def test_trust_remote_code_is_off_by_default_and_reaches_model_and_tokenizer(checkpoint, tok,
                                                                             tmp_path, monkeypatch):
    """A checkpoint with its own modelling code loads only with trust_remote_code, and the job
    passes the setting to both from_pretrained calls."""
    remote = tmp_path / "remote"
    build_tiny_phi3(len(tok), **TINY).save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="remote_phi3", architectures=["RemotePhi3ForCausalLM"],
                  auto_map={"AutoConfig": "modeling_remote.RemotePhi3Config",
                            "AutoModelForCausalLM": "modeling_remote.RemotePhi3ForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_remote.py").write_text(
        "from transformers import Phi3Config, Phi3ForCausalLM\n\n\n"
        "class RemotePhi3Config(Phi3Config):\n    model_type = 'remote_phi3'\n\n\n"
        "class RemotePhi3ForCausalLM(Phi3ForCausalLM):\n    config_class = RemotePhi3Config\n")
    # transformers copies remote code into its modules cache and puts that on sys.path: keep both
    # inside this test
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "mods"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(remote))
    assert type(load_model(str(remote), trust_remote_code=True)).__name__ == "RemotePhi3ForCausalLM"

    seen = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("trust_remote_code")) or real(*a, **k))
    from lora_phi3.finetune.tokenizer import load_tokenizer
    load_tokenizer(checkpoint)
    load_tokenizer(checkpoint, trust_remote_code=True)
    assert seen == [False, True]


def test_generation_keeps_its_cache_when_training_turned_it_off(tok):
    model = load_model(None, tokenizer=tok, use_cache=False)
    assert model.config.use_cache is False
    lengths = []
    forward = model.forward
    model.forward = types.MethodType(
        lambda self, *a, **k: lengths.append(k["input_ids"].shape[1]) or forward(*a, **k), model)
    generate_answer(model, tok, [{"role": "user", "content": "Sort: c a b"}], max_new_tokens=4)
    assert len(lengths) > 1 and set(lengths[1:]) == {1}  # one new token per step: the KV cache


# -- packed rows stay apart under every attention implementation -----------------------------------
@pytest.fixture(scope="module")
def packed_rows(tok):
    train, _, _ = load_conversations(None)
    rows = pack_examples(tokenize_dataset(tok, train[:12], 128, train_on_prompt=True), 96)
    assert all(len(r["seq_lens"]) >= 2 for r in rows[:3])
    return rows[:3]


@pytest.mark.parametrize("attn", [
    pytest.param(name, marks=pytest.mark.skipif(
        not mk.attn_implementation_available(name) or name == "flash_attention_2",
        reason="flash_attention_2 needs flash-attn and CUDA, and the recipe refuses it with packing"))
    for name in ATTN_IMPLEMENTATIONS])
def test_packed_rows_stay_leak_free_under_each_attention_implementation(checkpoint, tok,
                                                                        packed_rows, attn):
    """The model as the job loads it (the recipe's attention implementation, LoRA injected with a
    non-zero B): the packed batch's logits and loss sum equal each example run alone."""
    recipe = load_recipe(overrides={"model": checkpoint, "training": {"bf16": False},
                                    "model_kwargs": {"attn_implementation": attn}})
    model = load_training_model(recipe, tok, use_bf16=False, device="cpu").eval()
    assert model.config._attn_implementation == attn
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(0, 0.05)
        batch = collate(packed_rows, tok.pad_token_id, packing=True)
        packed = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        loss_sum, n_labels = CausalLMLoss(model)(**batch)
        want_sum, want_n = 0.0, 0
        for b, row in enumerate(packed_rows):
            off = 0
            for n in row["seq_lens"]:
                ids = torch.tensor([row["input_ids"][off:off + n]])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(packed[b, off:off + n], alone, atol=1e-5, rtol=0)
                labels = torch.tensor(row["labels"][off:off + n])
                keep = labels[1:] != -100
                want_sum += F.cross_entropy(alone[:-1][keep], labels[1:][keep], reduction="sum")
                want_n += int(keep.sum())
                off += n
    assert int(n_labels) == want_n
    torch.testing.assert_close(loss_sum, torch.as_tensor(want_sum), atol=1e-3, rtol=1e-5)


def test_every_shipped_recipe_names_its_model_settings():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        assert r.model_kwargs.attn_implementation == "sdpa" and not r.model_kwargs.use_cache, path
        assert "model_kwargs:" in path.read_text(), path
