"""DoRA adapters both ways with the installed HF PEFT: our export loads in ``PeftModel`` with our
logits, PEFT's DoRA adapters import with PEFT's logits, and merging matches PEFT's merge."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from lora_phi3 import Linear, LoraConfig, inject_lora, lora_modules, merge_and_unload
from lora_phi3.adapters import export_peft, import_peft, load_adapter, save_adapter
from tiny import X, adapted, logits, tiny_phi3

peft = pytest.importorskip("peft")


def _dora(targets, seed=1, **kw):
    return adapted(targets, seed=seed, use_dora=True, **kw)


@pytest.mark.parametrize("targets, kw", [
    (["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {}),
    (["q_proj", "v_proj", "o_proj"], {}),        # per-slice: k rows keep gain 1
    (["gate_proj", "down_proj"], {"use_rslora": True}),
])
def test_dora_export_loads_in_peft_with_the_same_logits(tmp_path, targets, kw):
    ours = _dora(targets, **kw)
    export_peft(ours, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=0)


def test_dora_export_layout_per_slice(tmp_path):
    ours = _dora(["q_proj", "v_proj"])
    export_peft(ours, tmp_path / "p")
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    qkv = lora_modules(ours)["model.layers.0.self_attn.qkv_proj"]
    M = st["base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector"]
    assert M.shape == (96,)
    assert torch.equal(M[:64], qkv.lora_magnitude[:64]) and torch.equal(M[80:], qkv.lora_magnitude[64:])
    torch.testing.assert_close(M[64:80], qkv.weight[64:80].norm(dim=1))  # k rows: gain 1 in PEFT


def _peft_dora(targets, seed=3, **kw):
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_phi3(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking magnitudes: away from ||W + sBA||
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("targets", [["qkv_proj", "down_proj"], ["o_proj", "gate_up_proj"]])
def test_a_peft_dora_adapter_imports_with_peft_logits(tmp_path, targets):
    theirs = _peft_dora(targets)
    theirs.save_pretrained(tmp_path / "p")
    ours = import_peft(tiny_phi3(), tmp_path / "p")
    layers = lora_modules(ours)
    assert layers and all(layer.use_dora for layer in layers.values())
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-4, rtol=0)
    export_peft(ours, tmp_path / "back")  # and back again
    again = peft.PeftModel.from_pretrained(tiny_phi3(), tmp_path / "back").eval()
    torch.testing.assert_close(logits(again), logits(theirs), atol=1e-4, rtol=0)


def test_our_per_slice_export_imports_back_as_slices(tmp_path):
    ours = _dora(["q_proj", "v_proj", "down_proj"])
    export_peft(ours, tmp_path / "p")
    back = import_peft(tiny_phi3(), tmp_path / "p")
    qkv = lora_modules(back)["model.layers.0.self_attn.qkv_proj"]
    assert qkv.enable_lora == [True, False, True] and qkv.use_dora
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=0)


def test_dora_merge_matches_peft_merge(tmp_path):
    theirs = _peft_dora(["qkv_proj", "down_proj"])
    want = logits(theirs)
    theirs.save_pretrained(tmp_path / "p")
    ours = import_peft(tiny_phi3(), tmp_path / "p")
    merged_peft = theirs.merge_and_unload()
    merged_ours = merge_and_unload(ours)
    for name in ["model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"]:
        torch.testing.assert_close(merged_ours.get_submodule(name).weight,
                                   merged_peft.get_submodule(name).weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(merged_ours), want, atol=1e-4, rtol=0)


def test_dora_file_round_trip_and_mismatch_refused(tmp_path):
    ours = _dora(["q_proj", "down_proj"])
    save_adapter(ours, tmp_path / "a.safetensors")
    back = load_adapter(tiny_phi3(), tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(back), logits(ours), atol=0, rtol=0)
    plain = tiny_phi3()
    inject_lora(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(plain, tmp_path / "a.safetensors")
    export_peft(ours, tmp_path / "p")
    with pytest.raises(ValueError, match="is DoRA but the model's layer has use_dora=False"):
        import_peft(plain, tmp_path / "p")
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def test_peft_dora_file_without_magnitudes_is_refused(tmp_path):
    ours = _dora(["down_proj"])
    export_peft(ours, tmp_path / "p")
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    from safetensors.torch import save_file
    save_file({k: v for k, v in st.items() if "magnitude" not in k},
              str(tmp_path / "p" / "adapter_model.safetensors"))
    model = tiny_phi3()
    with pytest.raises(ValueError, match="use_dora is true but module .* has no lora_magnitude_vector"):
        import_peft(model, tmp_path / "p")
    assert not lora_modules(model)


def test_mixed_dora_and_plain_layers_refuse_to_export(tmp_path):
    model = nn.Sequential(Linear(6, 6, r=2, use_dora=True), Linear(6, 6, r=2))
    with pytest.raises(ValueError, match="one use_dora for a whole adapter"):
        export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


# -- DoRA on embeddings and convolutions ---------------------------------------------------------
class EmbConv(nn.Module):
    """An embedding, a Conv1d over its output and a linear head: every DoRA layer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv, self.head = nn.Embedding(20, 6), nn.Conv1d(6, 4, 3), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (N, L) -> (N, L - 2, 3)
        return self.head(torch.relu(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2))


def _emb_conv(seed=0):
    torch.manual_seed(seed)
    return EmbConv().eval()


IDS = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))


def test_embedding_and_conv_dora_export_in_peft_shapes_and_merge_like_peft(tmp_path):
    ours = _emb_conv()
    inject_lora(ours, LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv", "head"],
                                 use_dora=True, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(ours).values():
            layer.lora_magnitude.mul_(0.5 + torch.rand(layer.lora_magnitude.shape, generator=g))
    export_peft(ours, tmp_path / "p")
    st = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    M = "base_model.model.{}.lora_magnitude_vector"
    assert st[M.format("emb")].shape == (6,) and st[M.format("conv")].shape == (1, 4, 1)
    assert torch.equal(st[M.format("conv")].flatten(), ours.conv.lora_magnitude)
    with torch.no_grad():
        want = ours(IDS)
    theirs = peft.PeftModel.from_pretrained(_emb_conv(), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS), want, atol=1e-5, rtol=0)
    merged_peft = theirs.merge_and_unload()
    merged_ours = merge_and_unload(ours)
    for name in ("emb", "conv", "head"):
        assert type(merged_ours.get_submodule(name)) is type(merged_peft.get_submodule(name))
        torch.testing.assert_close(merged_ours.get_submodule(name).weight,
                                   merged_peft.get_submodule(name).weight, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(IDS), want, atol=1e-5, rtol=0)


def test_a_peft_conv_dora_adapter_loads_into_an_injected_model_of_higher_rank(tmp_path):
    torch.manual_seed(2)
    theirs = peft.get_peft_model(_emb_conv(), peft.LoraConfig(
        r=2, lora_alpha=2, target_modules=["emb", "conv"], use_dora=True,
        init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "p")
    ours = inject_lora(_emb_conv(), LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "conv"],
                                               use_dora=True))
    import_peft(ours, tmp_path / "p")
    assert ours.conv.lora_A.shape == (4, 6, 3) and not ours.conv.lora_A[2:].any()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), theirs(IDS), atol=1e-5, rtol=0)


def test_a_conv_magnitude_of_the_wrong_shape_is_refused(tmp_path):
    ours = inject_lora(_emb_conv(), LoraConfig(r=2, target_modules=["conv"], use_dora=True))
    export_peft(ours, tmp_path / "p")
    path = tmp_path / "p" / "adapter_model.safetensors"
    st = load_file(str(path))
    from safetensors.torch import save_file
    save_file({k: v.flatten() if "magnitude" in k else v for k, v in st.items()}, str(path))
    model = _emb_conv()
    with pytest.raises(ValueError, match=r"shape mismatch for conv.lora_magnitude_vector: file "
                                         r"\(4,\), model needs \(1, 4, 1\)"):
        import_peft(model, path.parent)
    assert not lora_modules(model)
