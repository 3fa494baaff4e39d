"""Model loading: the embedded tiny Phi-3 and the ``from_pretrained`` path (offline, local dir)."""

from __future__ import annotations

import pytest
import torch
from transformers import Phi3ForCausalLM

from lora_phi3.finetune.models import (TINY_PHI3, build_tiny_phi3, count_parameters, load_model,
                                       resolve_dtype, tiny_phi3_config)


def test_tiny_model_is_the_real_phi3_class_sized_by_the_tokenizer(tok):
    model = load_model(None, tokenizer=tok)
    assert type(model) is Phi3ForCausalLM
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    for key, value in TINY_PHI3.items():
        assert getattr(cfg, key) == value, key
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention exercised
    assert model.get_decoder().layers[0].self_attn.qkv_proj.out_features == \
        (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * (cfg.hidden_size // cfg.num_attention_heads)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert cfg._attn_implementation == "sdpa"


def test_tiny_model_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_tiny_phi3(97, num_hidden_layers=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_tiny_phi3(97, num_hidden_layers=1)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    c = build_tiny_phi3(97, num_hidden_layers=1, seed=7)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_from_pretrained_path_loads_a_local_directory(tmp_path, tok):
    src = build_tiny_phi3(len(tok), num_hidden_layers=1, hidden_size=64, intermediate_size=96)
    src.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded) is Phi3ForCausalLM and not loaded.training
    ids = torch.tensor([tok("What is 2 plus 3?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, src(ids).logits, rtol=0, atol=0)
    half = load_model(str(tmp_path), dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_model_errors(tok):
    with pytest.raises(ValueError, match=r"load_model\(None\) .* needs tokenizer= or vocab_size="):
        load_model(None)
    with pytest.raises(TypeError, match="model name_or_path must be None or a non-empty string, got 3"):
        load_model(3)
    with pytest.raises(ValueError, match=r"tiny-model overrides \['hidden_size'\] only apply"):
        load_model("some/dir", hidden_size=8)
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype or one of .*'bf16'.*got 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        tiny_phi3_config(0)
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is None


def test_count_parameters_counts_shared_weights_once():
    lin = torch.nn.Linear(3, 4)
    seq = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    assert count_parameters(seq) == 3 * 4 + 4
    lin.bias.requires_grad_(False)
    assert count_parameters(seq, trainable_only=True) == 12
