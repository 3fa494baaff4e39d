"""Embedded tokenizer, Phi-3 chat template, AutoTokenizer fallback, asset reproducibility."""

import importlib.util
import json
from pathlib import Path

import pytest

from tiny import CONV
from lora_phi3.finetune.tokenizer import PHI3_CHAT_TEMPLATE, PHI3_SPECIAL_TOKENS, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "lora_phi3" / "finetune" / "assets"

def test_embedded_tokenizer_is_fast_with_phi3_special_tokens(tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast) and tok.is_fast
    assert 300 <= len(tok) <= 1100
    for t in PHI3_SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
        assert tok.convert_ids_to_tokens(ids) == [t]
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.chat_template == PHI3_CHAT_TEMPLATE
    # special tokens are recognised inside text, not split into characters
    ids = tok.encode("hi<|end|>\n<|assistant|>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[1:] == ["<|end|>", "Ċ", "<|assistant|>"]


def test_chat_template_renders_phi3_format(tok):
    expected = (
        "<|system|>\nAnswer with the result only.<|end|>\n"
        "<|user|>\nSort: c a b<|end|>\n"
        "<|assistant|>\na b c<|end|>\n"
        "<|user|>\nAdd 2 to that.<|end|>\n"
        "<|assistant|>\n5<|end|>\n"
        "<|endoftext|>"
    )
    assert tok.apply_chat_template(CONV, tokenize=False) == expected
    gen = tok.apply_chat_template(CONV[:4], tokenize=False, add_generation_prompt=True)
    assert gen == (
        "<|system|>\nAnswer with the result only.<|end|>\n"
        "<|user|>\nSort: c a b<|end|>\n"
        "<|assistant|>\na b c<|end|>\n"
        "<|user|>\nAdd 2 to that.<|end|>\n"
        "<|assistant|>\n"
    )


def test_byte_level_roundtrip_including_unicode(tok):
    text = "Reverse: q w e 12 + 7 = 19, héllo 日本 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # digits are split individually (helps the arithmetic tasks)
    assert tok.convert_ids_to_tokens(tok.encode("123", add_special_tokens=False)) == ["1", "2", "3"]


def test_load_tokenizer_rejects_bad_argument():
    with pytest.raises(TypeError, match="name_or_path must be None or a non-empty string, got 5"):
        load_tokenizer(5)
    with pytest.raises(TypeError, match="name_or_path"):
        load_tokenizer("")


def test_autotokenizer_path_sets_phi3_template_and_pad(tok, tmp_path):
    """A local tokenizer without chat template / pad gets Phi-3's template and pad = eos."""
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == PHI3_CHAT_TEMPLATE
    assert loaded.pad_token == "<|endoftext|>"
    assert loaded.apply_chat_template(CONV, tokenize=False) == tok.apply_chat_template(CONV, tokenize=False)


def test_shipped_assets_match_generator(tmp_path):
    """scripts/make_assets.py regenerates the shipped assets byte for byte."""
    spec = importlib.util.spec_from_file_location("make_assets", REPO / "scripts" / "make_assets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path), "--skip-base"])  # the base: test_models.py
    for name in ("tokenizer.json", "chat_train.jsonl", "chat_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
    total = sum((ASSETS / n).stat().st_size for n in ("tokenizer.json", "chat_train.jsonl", "chat_eval.jsonl"))
    assert total < 1_000_000
