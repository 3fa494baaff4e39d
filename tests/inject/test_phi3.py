"""The Phi-3 map: fused-slice targets, and LoRA inside a real transformers Phi-3 (tiny, GQA)."""

import copy
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Phi3ForCausalLM

from lora_phi3 import layers as L
from lora_phi3.config import LoraConfig
from lora_phi3.inject import phi3
from lora_phi3.inject.injector import (disable_lora, get_lora_config, inject_lora, lora_modules,
                                       merge_and_unload, merge_lora, unmerge_lora)
from tiny import TINY, logits, randomize_lora, tiny_phi3

VOCAB, HIDDEN, INTER = TINY["vocab_size"], TINY["hidden_size"], TINY["intermediate_size"]
HEAD_DIM = HIDDEN // TINY["num_attention_heads"]  # 8: q 64 rows, k 16, v 16
Q, KV = TINY["num_attention_heads"] * HEAD_DIM, TINY["num_key_value_heads"] * HEAD_DIM


IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
QKV = "model.layers.{}.self_attn.qkv_proj"
GATE_UP = "model.layers.{}.mlp.gate_up_proj"


def enabled(model):
    """qualified name -> enable_lora (fused) or True (plain), for every adapted module."""
    return {n: (m.enable_lora if isinstance(m, L.MergedLinear) else True)
            for n, m in lora_modules(model).items()}


# -- the map --------------------------------------------------------------------------------------
def test_slice_map_sizes_follow_the_config():
    model = tiny_phi3()
    assert phi3.is_phi3(model) and phi3.is_phi3(model.model)
    smap = phi3.phi3_slice_map(model)
    assert set(smap) == {QKV.format(i) for i in range(2)} | {GATE_UP.format(i) for i in range(2)}
    assert smap[QKV.format(0)] == ([Q, KV, KV], ("q_proj", "k_proj", "v_proj"))
    assert smap[GATE_UP.format(1)] == ([INTER, INTER], ("gate_proj", "up_proj"))
    assert [Q, KV, KV] == [64, 16, 16]
    # an explicit head_dim wins over hidden_size // num_attention_heads
    wide = tiny_phi3(head_dim=16)
    assert phi3.phi3_slice_map(wide)[QKV.format(0)].split_sizes == [128, 32, 32]
    # the map also reads an injected model
    inject_lora(model, LoraConfig(target_modules=["q_proj"]))
    assert phi3.phi3_slice_map(model) == smap


def test_slice_map_errors():
    with pytest.raises(ValueError, match=r"phi3_slice_map needs a Phi-3 model .* got model_type=None"):
        phi3.phi3_slice_map(nn.Linear(2, 2))
    model = tiny_phi3()
    model.config.num_key_value_heads = 4  # disagrees with the built weights
    with pytest.raises(ValueError, match=r"self_attn\.qkv_proj has 96 output rows but the Phi-3 config "
                                         r"gives slices \{'q_proj': 64, 'k_proj': 32, 'v_proj': 32\}"):
        phi3.phi3_slice_map(model)


def test_default_targets_adapt_all_four_projections():
    model = inject_lora(tiny_phi3(), LoraConfig(r=4))
    assert get_lora_config(model).target_modules == phi3.DEFAULT_TARGETS
    expected = {}
    for i in range(2):
        expected[QKV.format(i)] = [True, True, True]
        expected[f"model.layers.{i}.self_attn.o_proj"] = True
        expected[GATE_UP.format(i)] = [True, True]
        expected[f"model.layers.{i}.mlp.down_proj"] = True
    assert enabled(model) == expected
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, L.MergedLinear) and qkv.split_sizes == [Q, KV, KV]
    assert qkv.lora_A.shape == (3 * 4, HIDDEN) and qkv.lora_B.shape == (Q + 2 * KV, 4)


@pytest.mark.parametrize("targets, qkv, gate_up, others", [
    (["q_proj", "v_proj"], [True, False, True], None, []),
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # Phi-3 Cookbook
     [True, True, True], [True, True], ["self_attn.o_proj", "mlp.down_proj"]),
    (["qkv_proj", "gate_proj"], [True, True, True], [True, False], []),
    (["self_attn.k_proj", "up_proj"], [False, True, False], [False, True], []),
    (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", [True, False, True], None, []),
    ("all-linear", [True, True, True], [True, True],
     ["self_attn.o_proj", "mlp.down_proj"]),  # lm_head is not adapted
])
def test_llama_names_select_slices(targets, qkv, gate_up, others):
    model = inject_lora(tiny_phi3(), LoraConfig(r=2, target_modules=targets))
    expected = {}
    for i in range(2):
        expected[QKV.format(i)] = qkv
        if gate_up:
            expected[GATE_UP.format(i)] = gate_up
        for other in others:
            expected[f"model.layers.{i}.{other}"] = True
    assert enabled(model) == expected


def test_exclude_and_layers_work_on_slices():
    model = inject_lora(tiny_phi3(), LoraConfig(target_modules=["qkv_proj"], exclude_modules=["k_proj"],
                                                layers_to_transform=[1]))
    assert enabled(model) == {QKV.format(1): [True, False, True]}
    model = inject_lora(tiny_phi3(), LoraConfig(target_modules=["q_proj", "o_proj"],
                                                exclude_modules=r".*layers\.0\.self_attn\.qkv_proj"))
    assert enabled(model) == {QKV.format(1): [True, False, False], "model.layers.0.self_attn.o_proj": True,
                              "model.layers.1.self_attn.o_proj": True}


def test_unmatched_target_on_phi3_lists_slice_names():
    with pytest.raises(ValueError, match=r"entry \['query'\] matched no module in Phi3ForCausalLM\. Modules "
                                         r"that can be adapted here: embed_tokens, o_proj, qkv_proj, q_proj, "
                                         r"k_proj, v_proj, gate_up_proj, gate_proj, up_proj, down_proj, lm_head"):
        inject_lora(tiny_phi3(), LoraConfig(target_modules=["q_proj", "query"]))


# -- numerics -------------------------------------------------------------------------------------
def test_qkv_slices_against_dense_reference():
    """q and v adapted, k rows untouched bit for bit when merged; forward == x @ (W + delta).T."""
    model = inject_lora(tiny_phi3(), LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    qkv = model.model.layers[0].self_attn.qkv_proj
    W0 = qkv.weight.detach().clone()
    A, B, s, r = qkv.lora_A.detach(), qkv.lora_B.detach(), 6 / 3, 3
    A_q, A_v = A[:r], A[r:]  # one (r, in) block per enabled slice, in slice order
    B_q, B_v = B[:Q], B[Q:]  # rows of each enabled slice, in slice order
    dense = W0.clone()
    dense[:Q] += s * B_q @ A_q
    dense[Q + KV:] += s * B_v @ A_v
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), x @ dense.T, atol=1e-5, rtol=1e-5)
    merge_lora(model)
    assert torch.equal(qkv.weight[Q:Q + KV], W0[Q:Q + KV])  # k rows unchanged, bit for bit
    assert not torch.equal(qkv.weight[:Q], W0[:Q]) and not torch.equal(qkv.weight[Q + KV:], W0[Q + KV:])
    torch.testing.assert_close(qkv.weight.detach(), dense, atol=1e-6, rtol=1e-6)
    unmerge_lora(model)
    assert torch.equal(qkv.weight, W0)


def test_four_way_equivalence_and_disable():
    model = tiny_phi3()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=phi3.DEFAULT_TARGETS + ["embed_tokens"]))
    randomize_lora(model)
    expected_base = logits(base, IDS)
    unmerged = logits(model, IDS)
    assert (unmerged - expected_base).abs().max() > 1e-2
    with disable_lora(model):
        assert torch.equal(logits(model, IDS), expected_base)
    merge_lora(model)
    torch.testing.assert_close(logits(model, IDS), unmerged, atol=1e-5, rtol=1e-5)
    with disable_lora(model):
        assert torch.equal(logits(model, IDS), expected_base)
    unmerge_lora(model)
    assert torch.equal(logits(model, IDS), unmerged)
    merge_and_unload(model)
    assert type(model.model.layers[0].self_attn.qkv_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(logits(model, IDS), unmerged, atol=1e-5, rtol=1e-5)
    fresh = tiny_phi3(seed=99)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, IDS), unmerged, atol=1e-5, rtol=1e-5)


def test_bf16_base_keeps_fp32_adapters():
    model = tiny_phi3().to(torch.bfloat16)
    inject_lora(model, LoraConfig(r=4))
    randomize_lora(model)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.bfloat16 and qkv.lora_A.dtype == qkv.lora_B.dtype == torch.float32
    out = logits(model, IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    merge_lora(model)
    torch.testing.assert_close(logits(model, IDS).float(), out.float(), atol=0.1, rtol=0.05)


# -- inside transformers --------------------------------------------------------------------------
def test_generate_after_injection():
    model = tiny_phi3()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4))
    randomize_lora(model)
    prompt = IDS[:1, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, **kwargs)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], prompt)
    # greedy decoding with the cache follows the adapted model's own argmax
    with torch.no_grad():
        full = model(out[:, :-1]).logits
    assert torch.equal(full[0, 3:].argmax(-1), out[0, 4:])
    with disable_lora(model):
        assert torch.equal(model.generate(prompt, **kwargs), base.generate(prompt, **kwargs))


def lora_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(IDS, labels=IDS)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_reaches_lora(use_reentrant):
    model = inject_lora(tiny_phi3(), LoraConfig(r=4, lora_dropout=0.0))
    randomize_lora(model)
    model.train()
    reference = lora_grads(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(reference) == trainable and all(g.abs().sum() > 0 for g in reference.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()  # as transformers < 5 did: only the injector's hook is left
    checkpointed = lora_grads(model)
    assert set(checkpointed) == trainable
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4)


def test_input_grad_hook_only_under_grad_and_removed_on_unload():
    model = inject_lora(tiny_phi3(), LoraConfig(r=2))
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model(IDS)
    with torch.no_grad():
        model(IDS)
    assert seen == [True, False]
    merge_and_unload(model)
    seen.clear()
    model(IDS)
    assert seen == [False]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def test_merged_save_pretrained_reloads_without_warnings(tmp_path):
    model = inject_lora(tiny_phi3(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    randomize_lora(model)
    expected = logits(model, IDS)
    merge_and_unload(model)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(tiny_phi3().state_dict()) and not any("lora" in k for k in keys)
    capture = _Capture()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(capture)
    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    finally:
        hf_logger.removeHandler(capture)
    assert type(loaded) is Phi3ForCausalLM
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    keyish = [m for m in capture.records if any(w in m.lower() for w in
                                                ("missing", "unexpected", "not used", "initialized", "mismatch", "load report"))]
    assert keyish == [], capture.records
    torch.testing.assert_close(logits(loaded.eval(), IDS), expected, atol=1e-5, rtol=1e-5)


def test_training_step_changes_only_adapters():
    model = inject_lora(tiny_phi3(), LoraConfig(r=4, modules_to_save=["lm_head"]))
    randomize_lora(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if "lora_" in n} | {"lm_head.weight"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert isinstance(model, Phi3ForCausalLM)  # still the transformers model class


def test_loss_matches_manual_cross_entropy():
    """The injected model is still a normal causal LM: its loss is shifted cross-entropy."""
    model = inject_lora(tiny_phi3(), LoraConfig(r=4))
    randomize_lora(model)
    with torch.no_grad():
        out = model(IDS, labels=IDS)
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), IDS[:, 1:].flatten())
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)
