"""PEFT export, checked against the installed HF PEFT: our exports load in ``PeftModel`` with the
same logits as our model and as a dense reference, in the layout the format documents."""

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_phi3.adapters import export_peft, import_peft, peft_state_dict
from lora_phi3.config import LoraConfig
from lora_phi3.inject import get_lora_config, inject_lora, lora_modules
from tiny import adapted, dense_reference, logits, tiny_phi3

peft = pytest.importorskip("peft")

FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
COOKBOOK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("targets, kw", [
    (FUSED, {}),                                     # per-slice adapters on every slice
    (["q_proj", "v_proj", "o_proj"], {}),            # q and v slices only (k rows zero in B)
    ("all-linear", {"lora_dropout": 0.05}),          # the cookbook's peft_config
    (COOKBOOK, {}),                                  # the Llama-style list, mapped to slices
    (["o_proj", "embed_tokens"], {}),                # embedding adapter: lora_embedding_A/B
    (["qkv_proj", "down_proj"], {"modules_to_save": ["lm_head"]}),
    (["q_proj"], {"layers_to_transform": [1]}),      # targets written as full paths
])
def test_export_loads_in_peft_with_the_same_logits(tmp_path, targets, kw):
    ours = adapted(targets, **kw)
    export_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(ours), logits(dense_reference(ours)), atol=1e-4, rtol=0)


def test_export_format_block_diagonal_b_and_rank_padding(tmp_path):
    ours = adapted(["q_proj", "v_proj", "o_proj"])
    path = export_peft(ours, tmp_path / "p")
    cfg = json.loads((path / "adapter_config.json").read_text())
    st = load_file(str(path / "adapter_model.safetensors"))
    qkv = lora_modules(ours)["model.layers.0.self_attn.qkv_proj"]
    r, s = 4, qkv.scaling
    A = st["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]
    B = st["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert A.shape == (2 * r, 64) and B.shape == (96, 2 * r)
    assert torch.equal(A, qkv.lora_A)  # A_q stacked on A_v
    assert torch.equal(B[:64, :r], qkv.lora_B[:64]) and torch.equal(B[80:, r:], qkv.lora_B[64:])
    assert not B[:64, r:].any() and not B[64:80].any() and not B[80:, :r].any()
    o = lora_modules(ours)["model.layers.0.self_attn.o_proj"]
    oA = st["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"]
    oB = st["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"]
    assert torch.equal(oA[:r], o.lora_A) and not oA[r:].any()  # padded to rank 2r with zeros
    assert torch.equal(oB[:, :r], o.lora_B) and not oB[:, r:].any()
    assert cfg["r"] == 2 * r and cfg["lora_alpha"] / cfg["r"] == s  # same scaling
    assert cfg["target_modules"] == ["o_proj", "qkv_proj"] and cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["rank_pattern"] == {} and not cfg["use_rslora"]
    # Every field the installed PEFT's LoraConfig writes, except the version it fills in itself.
    assert set(cfg) == set(peft.LoraConfig(target_modules=["x"]).to_dict()) - {"peft_version"}
    assert len(st) == 2 * len(lora_modules(ours))


def test_export_refuses_conv_layers_in_loralib_layout(tmp_path):
    # inject_lora builds convolutions in PEFT's layout (they export: tests/adapters/test_peft_zoo.py);
    # a hand-built conv in loralib's layout has no exact PEFT form.
    from lora_phi3.layers import Conv2d
    model = nn.Sequential(Conv2d.from_conv(nn.Conv2d(3, 4, 3), r=2))
    with pytest.raises(ValueError, match=r"0 is a LoRA Conv2d in lora_layout='loralib'; PEFT "
                                         r"factorises convolutions differently"):
        export_peft(model, tmp_path / "p")


def test_peft_state_dict_matches_export(tmp_path):
    ours = adapted(FUSED)
    tensors, cfg = peft_state_dict(ours)
    export_peft(ours, tmp_path / "p")
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert st.keys() == tensors.keys() and all(torch.equal(st[k], tensors[k]) for k in st)
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text()) == cfg


def test_rank_pattern_export_is_exact_in_peft_and_smaller(tmp_path):
    ours = adapted(["q_proj", "v_proj", "o_proj", "gate_up_proj"])
    padded = export_peft(ours, tmp_path / "padded")
    compact = export_peft(ours, tmp_path / "compact", pad_to_max_rank=False)
    cfg = json.loads((compact / "adapter_config.json").read_text())
    # qkv: q and v slices -> rank 8; gate_up: 2 slices -> rank 8; o_proj keeps rank 4.
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["rank_pattern"] == {"o_proj": 4} and cfg["alpha_pattern"] == {"o_proj": 8}
    assert (compact / "adapter_model.safetensors").stat().st_size < \
        (padded / "adapter_model.safetensors").stat().st_size
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), compact).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=0)
    back = import_peft(tiny_phi3(), compact)
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-4, rtol=0)


def test_rslora_export_carries_use_rslora_and_loads_in_peft_with_the_same_logits(tmp_path):
    ours = adapted(FUSED, use_rslora=True)
    assert all(m.scaling == 8 / 2 for m in lora_modules(ours).values())  # 8 / sqrt(4)
    export_peft(ours, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    # per-slice adapters export as one block-diagonal rank-12 adapter (3 slices of qkv_proj x 4):
    # alpha / sqrt(12) must still be our 8 / sqrt(4)
    assert cfg["use_rslora"] is True and cfg["r"] == 12
    assert cfg["lora_alpha"] == pytest.approx(4 * math.sqrt(12), rel=1e-12)
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(ours), logits(dense_reference(ours)), atol=1e-4, rtol=0)
    # and back: the import keeps the variant, so a re-export is rsLoRA again
    back = import_peft(tiny_phi3(), tmp_path / "p")
    assert get_lora_config(back).use_rslora
    assert all(m.scaling == pytest.approx(4.0) for m in lora_modules(back).values())
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["gaussian", False])
def test_export_of_other_inits_loads_in_peft(tmp_path, init):
    ours = adapted(FUSED, init_lora_weights=init)
    export_peft(ours, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == init
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=0)
