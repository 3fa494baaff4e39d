"""PEFT import, checked against the installed HF PEFT: PEFT-trained adapters import into our model
with the same logits (and a dense reference's), exports come back exactly, refusals change nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Phi3ForCausalLM

from lora_phi3.adapters import export_peft, import_peft
from lora_phi3.config import LoraConfig
from lora_phi3.inject import get_lora_config, inject_lora, lora_modules, merge_lora
from tiny import X, adapted, logits, randomize, tiny_gpt2, tiny_phi3

peft = pytest.importorskip("peft")

FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def dense_from_peft(peft_model, scalings) -> Phi3ForCausalLM:
    """Plain Phi-3 with ``W += scaling * B @ A`` from a PeftModel's own tensors."""
    ref = tiny_phi3()
    with torch.no_grad():
        for name, m in peft_model.base_model.model.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                ref.get_submodule(name).weight += scalings(name, A.shape[0]) * B @ A
    return ref


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
    assert get_lora_config(ours).use_rslora  # the variant is kept, not folded away

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
    def gpt2():
        torch.manual_seed(0)
        return tiny_gpt2()
    ours = inject_lora(gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"],
                                          bias="all"))
    randomize(ours, 1)
    x = X % 100  # tiny_gpt2's vocabulary
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
    (lambda p: _edit_config(p, lora_bias=True), True,
     r"lora_bias is true but module .* has no lora_B.bias"),
    (lambda p: _edit_config(p, use_dora=True), True,
     r"use_dora is true but module .* has no lora_magnitude_vector"),
    (lambda p: _edit_config(p, use_dora="yes"), True, r"use_dora must be a bool, got 'yes'"),
    (lambda p: _edit_config(p, peft_type="IA3"), True, r"peft_type is 'IA3'; only 'LORA'"),
    (lambda p: _edit_config(p, alpha_pattern=[1]), True,
     r"alpha_pattern must be an object \{module regex: positive number\} or null, got \[1\]"),
    (lambda p: _edit_config(p, rank_pattern={"down_proj": 0}), False,
     r"rank_pattern must be an object \{module regex: positive int\} or null"),
    (lambda p: _edit_config(p, use_rslora="yes"), True, r"use_rslora must be a bool, got 'yes'"),
    (lambda p: _edit_config(p, r=8), True,  # PEFT itself fails on this file (size mismatch)
     r"disagrees with itself: model.layers.0.mlp.down_proj: lora_A has rank 4, the config says 8"),
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
