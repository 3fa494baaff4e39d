"""PEFT interop, checked against the installed HF PEFT: our exports load in ``PeftModel`` with the
same logits, PEFT-trained adapters import into our model with the same logits, both ways exact."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, Phi3ForCausalLM

from lora_phi3.config import LoraConfig
from tiny import X, adapted, dense_reference, logits, randomize, tiny_phi3
from lora_phi3.inject.injector import get_lora_config, inject_lora, lora_modules, merge_lora
from lora_phi3.adapters.peft_format import export_peft, import_peft, peft_state_dict

peft = pytest.importorskip("peft")

FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
COOKBOOK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dense_from_peft(peft_model, scalings) -> Phi3ForCausalLM:
    """Plain Phi-3 with ``W += scaling * B @ A`` from a PeftModel's own tensors."""
    ref = tiny_phi3()
    with torch.no_grad():
        for name, m in peft_model.base_model.model.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                ref.get_submodule(name).weight += scalings(name, A.shape[0]) * B @ A
    return ref


# -- export: our adapter -> PeftModel --------------------------------------------------------------
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


def test_export_refuses_conv_layers(tmp_path):
    model = inject_lora(nn.Sequential(nn.Conv2d(3, 4, 3)), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"0 is a LoRA Conv2d; PEFT factorises convolutions"):
        export_peft(model, tmp_path / "p")


# -- import: PEFT-trained adapter -> our model -----------------------------------------------------
def peft_trained(tmp_path, seed=3, **kw):
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": FUSED,
                             "task_type": "CAUSAL_LM", **kw})
    model = peft.get_peft_model(tiny_phi3(), cfg)
    randomize(model, seed)  # non-zero lora_B (and modules_to_save)
    model.save_pretrained(tmp_path / "peft")
    return model.eval(), tmp_path / "peft"


def test_peft_trained_adapter_imports_into_bare_model(tmp_path):
    theirs, path = peft_trained(tmp_path)
    ours = import_peft(tiny_phi3(), path)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-4, rtol=0)
    ref = dense_from_peft(theirs, lambda name, r: 8 / 4)
    torch.testing.assert_close(logits(ours), logits(ref), atol=1e-4, rtol=0)
    cfg = get_lora_config(ours)
    assert cfg.target_modules == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert cfg.r == 4 and cfg.lora_alpha == 8


def test_peft_adapter_imports_into_per_slice_model_exactly(tmp_path):
    theirs, path = peft_trained(tmp_path)
    ours = adapted(FUSED, seed=9)  # our layout: one rank-4 adapter per slice
    merge_lora(ours)  # and merged: unmerge -> load -> merge
    import_peft(ours, path)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-4, rtol=0)


def test_peft_scaling_variants_rslora_rank_and_alpha_patterns(tmp_path):
    theirs, path = peft_trained(tmp_path, use_rslora=True, rank_pattern={"o_proj": 2},
                                alpha_pattern={"down_proj": 3})
    ours = import_peft(tiny_phi3(), path)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-4, rtol=0)

    def scaling(name, r):  # written out from PEFT's documented rules
        alpha = 3 if name.endswith("down_proj") else 8
        return alpha / r ** 0.5
    torch.testing.assert_close(logits(ours), logits(dense_from_peft(theirs, scaling)), atol=1e-4,
                               rtol=0)


def test_peft_modules_to_save_and_adapter_name_in_keys(tmp_path):
    theirs, path = peft_trained(tmp_path, modules_to_save=["lm_head"])
    f = path / "adapter_model.safetensors"
    st = load_file(str(f))
    assert "base_model.model.lm_head.weight" in st
    # Keys as other PEFT versions write them: with the adapter name, lm_head inside its wrapper.
    save_file({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
               .replace("lm_head.weight", "lm_head.modules_to_save.default.weight"): v
               for k, v in st.items()}, str(f))
    ours = import_peft(tiny_phi3(), path)
    assert get_lora_config(ours).modules_to_save == ["lm_head"]
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-4, rtol=0)


def test_export_then_import_restores_the_same_adapter(tmp_path):
    ours = adapted(["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    export_peft(ours, tmp_path / "p")
    back = import_peft(tiny_phi3(), tmp_path / "p")
    assert get_lora_config(back).target_modules == ["down_proj", "gate_proj", "o_proj", "q_proj",
                                                    "v_proj"]
    assert get_lora_config(back).r == 4 and get_lora_config(back).lora_alpha == 8
    for name, m in lora_modules(ours).items():  # the per-slice factors come back bit for bit
        assert torch.equal(lora_modules(back)[name].lora_A, m.lora_A)
        assert torch.equal(lora_modules(back)[name].lora_B, m.lora_B)
    again = adapted(["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], seed=4)
    import_peft(again, tmp_path / "p")  # into an already-injected model: also exact
    assert torch.equal(logits(again), logits(ours))


def test_gpt2_fan_in_fan_out_and_biases_round_trip_through_peft(tmp_path):
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg).eval()
    ours = inject_lora(gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                          bias="all"))
    randomize(ours, 1)
    x = X % 64
    export_peft(ours, tmp_path / "p")
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in st
    assert "base_model.model.transformer.h.0.ln_1.bias" in st
    theirs = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "p").eval()
    with torch.no_grad():
        want = ours(x).logits
        torch.testing.assert_close(theirs(x).logits, want, atol=1e-4, rtol=0)
        back = import_peft(gpt2(), tmp_path / "p")
        torch.testing.assert_close(back(x).logits, want, atol=1e-4, rtol=0)


# -- refusals leave the model unchanged ------------------------------------------------------------
def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, bare, message", [
    (lambda p: _edit_config(p, use_dora=True), True, r"use_dora=True is a LoRA variant"),
    (lambda p: _edit_config(p, peft_type="IA3"), True, r"peft_type is 'IA3'; only 'LORA'"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x05\x00\x00"), True,
     r"not a safetensors file"),
    (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"), True,
     r"adapter_model.bin, a pickle"),
    (lambda p: save_file({k: v[..., :-1].contiguous() if "down_proj.lora_A" in k else v
                          for k, v in load_file(str(p / "adapter_model.safetensors")).items()},
                         str(p / "adapter_model.safetensors")), True,
     r"shape mismatch for model.layers.0.mlp.down_proj: file lora_A \(4, 95\)"),
    (lambda p: save_file({**load_file(str(p / "adapter_model.safetensors")),
                          "base_model.model.model.layers.0.mlp.nope.lora_A.weight": torch.ones(4, 4),
                          "base_model.model.model.layers.0.mlp.nope.lora_B.weight": torch.ones(4, 4)},
                         str(p / "adapter_model.safetensors")), True,
     r"module model.layers.0.mlp.nope does not exist"),
    (lambda p: None, False, r"model.layers.0.self_attn.qkv_proj: the file updates output rows the "
                            r"model's MergedLinear does not adapt"),
])
def test_refused_imports_leave_the_model_unchanged(tmp_path, edit, bare, message):
    _, path = peft_trained(tmp_path)
    edit(path)
    model = tiny_phi3() if bare else adapted(["q_proj", "v_proj", "o_proj", "gate_up_proj",
                                              "down_proj"])
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        import_peft(model, path)
    assert_unchanged(model, snap)
    if bare:
        assert not lora_modules(model) and get_lora_config(model) is None


def test_import_into_model_with_too_small_rank_is_refused(tmp_path):
    _, path = peft_trained(tmp_path)
    model = adapted(FUSED, r=2, lora_alpha=4)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"rows \[0, 64\) need rank 4 but the model's layer has r=2"):
        import_peft(model, path)
    assert_unchanged(model, snap)


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
