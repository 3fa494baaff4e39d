"""``lora_bias`` adapters both ways with the installed HF PEFT: PEFT's ``lora_B.bias`` per module,
exported from and imported onto our per-slice Phi-3 layers, and the files PEFT cannot hold."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lora_phi3 import Linear, LoraConfig, inject_lora, lora_modules
from lora_phi3.adapters import export_peft, import_peft
from tiny import adapted, logits, tiny_phi3

peft = pytest.importorskip("peft")

KEY = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.bias"


def test_per_slice_lora_bias_exports_with_zeros_on_unadapted_rows_and_loads_in_peft(tmp_path):
    ours = adapted(["q_proj", "v_proj", "down_proj"], lora_bias=True)
    qkv = lora_modules(ours)["model.layers.0.self_attn.qkv_proj"]
    assert qkv.lora_bias.shape == (80,) and qkv.lora_bias.any()  # q (64) and v (16) rows
    export_peft(ours, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and cfg["use_dora"] is False
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    bias = st[KEY]
    assert bias.shape == (96,) and not bias[64:80].any()  # the k rows: no lora bias
    assert torch.equal(bias[:64], qkv.lora_bias[:64]) and torch.equal(bias[80:], qkv.lora_bias[64:])
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    back = import_peft(tiny_phi3(), tmp_path / "p")  # and back, onto the same slices
    qkv_back = lora_modules(back)["model.layers.0.self_attn.qkv_proj"]
    assert qkv_back.enable_lora == [True, False, True]
    assert torch.equal(qkv_back.lora_bias, qkv.lora_bias)
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=0)


def test_a_peft_lora_bias_adapter_imports_with_peft_logits(tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_phi3(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"], lora_bias=True,
        init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = import_peft(tiny_phi3(), tmp_path / "p")
    assert all(layer.lora_bias.any() for layer in lora_modules(ours).values())
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)


def test_the_scaling_ratio_is_folded_into_the_bias(tmp_path):
    """One lora_alpha per file: a layer with another scaling has B and its bias rescaled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model[0] = Linear.from_linear(model[0], r=2, lora_alpha=2, lora_bias=True, init_lora_weights=False)
    model[2] = Linear.from_linear(model[2], r=2, lora_alpha=8, lora_bias=True, init_lora_weights=False)
    export_peft(model, tmp_path / "p")
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    torch.testing.assert_close(st["base_model.model.2.lora_B.bias"], model[2].lora_bias * 4)
    x = torch.randn(4, 6)
    theirs = peft.PeftModel.from_pretrained(
        nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).requires_grad_(False), tmp_path / "p")
    with torch.no_grad():  # the base weights are shared: copy them in
        for i in (0, 2):
            theirs.base_model.model[i].base_layer.weight.copy_(model[i].weight)
            theirs.base_model.model[i].base_layer.bias.copy_(model[i].bias)
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=0)


def test_export_refuses_lora_bias_beside_an_embedding_adapter(tmp_path):
    model = tiny_phi3()
    inject_lora(model, LoraConfig(r=2, target_modules=["embed_tokens"]))
    other = Linear(4, 4, r=2, lora_bias=True)
    model.add_module("extra", other)
    with pytest.raises(ValueError, match=r"one lora_bias for a whole adapter and refuses it on "
                                         r"embeddings, but extra has a lora bias and "
                                         r"model.embed_tokens is an Embedding adapter"):
        export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def _edit(path, config=None, tensors=None):
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(config)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        st = load_file(str(path / "adapter_model.safetensors"))
        save_file(tensors(st), str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("edit, into_injected, message", [
    (lambda p: _edit(p, config={"lora_bias": False}), False,
     r"lora_B.bias is a lora_B bias but the config has lora_bias false"),
    (lambda p: _edit(p, config={"use_dora": True}), False,
     r"lora_bias=true with use_dora=true, a pair PEFT itself refuses"),
    (lambda p: _edit(p, config={"lora_bias": "yes"}), False, r"lora_bias must be a bool, got 'yes'"),
    (lambda p: _edit(p, tensors=lambda st: {**st, KEY: torch.ones(95)}), False,
     r"lora_B.bias \(95,\) does not fit lora_B \(96, 8\): needs \(96,\)"),
    (lambda p: _edit(p, tensors=lambda st: {k: v for k, v in st.items() if k != KEY}), False,
     r"lora_bias is true but module model.layers.0.self_attn.qkv_proj has no lora_B.bias"),
    (lambda p: _edit(p, tensors=lambda st: {**st, KEY: torch.ones(96)}), True,
     r"qkv_proj: the file's lora_B.bias is non-zero on output rows the model's MergedLinear does "
     r"not adapt"),
])
def test_refused_lora_bias_files_leave_the_model_unchanged(tmp_path, edit, into_injected, message):
    ours = adapted(["q_proj", "v_proj", "down_proj"], lora_bias=True)
    export_peft(ours, tmp_path / "p")
    edit(tmp_path / "p")
    model = adapted(["q_proj", "v_proj", "down_proj"], lora_bias=True, seed=5) if into_injected \
        else tiny_phi3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        import_peft(model, tmp_path / "p")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_file_and_a_model_disagreeing_on_lora_bias_are_refused(tmp_path):
    export_peft(adapted(["down_proj"], lora_bias=True), tmp_path / "biased")
    export_peft(adapted(["down_proj"]), tmp_path / "plain")
    plain = adapted(["down_proj"])
    with pytest.raises(ValueError, match=r"down_proj: the file has lora_B.bias \(lora_bias true\) "
                                         r"but the model's Linear has no lora_bias"):
        import_peft(plain, tmp_path / "biased")
    biased = adapted(["down_proj"], lora_bias=True)
    with pytest.raises(ValueError, match=r"down_proj: the model's layer has a lora_bias but the file "
                                         r"has no lora_B.bias"):
        import_peft(biased, tmp_path / "plain")


def test_a_peft_lora_bias_adapter_on_attention_is_refused_by_name(tmp_path):
    """PEFT saves an in-projection lora_B.bias for nn.MultiheadAttention that its forward never
    uses; our attention layer has no lora_bias, so the file is refused, naming the module."""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.mha = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    theirs = peft.get_peft_model(Attention(), peft.LoraConfig(
        target_modules=["mha"], lora_bias=True, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "p")
    model = Attention()
    with pytest.raises(ValueError, match=r"does not fit the model \(nothing was changed\): mha: "
                                         r"lora_bias=True is not supported by MultiheadAttention"):
        import_peft(model, tmp_path / "p")
    assert type(model.mha) is nn.MultiheadAttention
