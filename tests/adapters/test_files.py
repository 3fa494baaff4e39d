"""Adapter files: round trip, contents, integrity checks and refused loads that change nothing."""

import hashlib
import json
import logging
import os
import shutil

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as st_save
from transformers import Phi3Config, Phi3ForCausalLM

from lora_phi3 import atomic
from lora_phi3.adapters import adapter_state_dict, load_adapter, save_adapter
from lora_phi3.config import VARIANT_DEFAULTS, LoraConfig
from lora_phi3.inject import get_lora_config, inject_lora, lora_modules, merge_lora, unmerge_lora
from tiny import adapted, dense_reference, logits, randomize, tiny_phi3


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.merged for m in lora_modules(model).values()])


def assert_unchanged(model, snap):
    state, merged = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [m.merged for m in lora_modules(model).values()] == merged


def rewrite(path, tensors, **doc_updates):
    """Replace the tensor file and keep the json's checksum, tensor list and modules (those with
    both tensors left) consistent with it."""
    blob = st_save(tensors)
    (path / "adapter.safetensors").write_bytes(blob)
    doc = json.loads((path / "adapter_config.json").read_text())
    modules = {n: m for n, m in doc["modules"].items()
               if f"{n}.lora_A" in tensors and f"{n}.lora_B" in tensors}
    doc.update(sha256=hashlib.sha256(blob).hexdigest(), num_bytes=len(blob), modules=modules,
               tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype)[6:]}
                        for k, v in tensors.items()}, **doc_updates)
    (path / "adapter_config.json").write_text(json.dumps(doc))


# -- round trips -----------------------------------------------------------------------------------
def test_round_trip_gives_identical_outputs_equal_to_dense_reference(tmp_path):
    source = adapted()
    save_adapter(source, tmp_path / "a")
    target = adapted(seed=7)
    assert not torch.allclose(logits(target), logits(source))
    load_adapter(target, tmp_path / "a")
    assert torch.equal(logits(target), logits(source))
    torch.testing.assert_close(logits(source), logits(dense_reference(source)), atol=1e-5, rtol=0)


def test_load_into_bare_model_injects_the_saved_config(tmp_path):
    source = adapted(targets=None)  # Phi-3 default: all four fused projections
    save_adapter(source, tmp_path / "a")
    bare = tiny_phi3()
    load_adapter(bare, tmp_path / "a")
    assert get_lora_config(bare) == get_lora_config(source)
    assert torch.equal(logits(bare), logits(source))


def test_file_holds_only_lora_tensors_as_safetensors(tmp_path):
    model = adapted()
    path = save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(path)) == ["adapter.safetensors", "adapter_config.json"]
    names = lora_modules(model)
    data = (path / "adapter.safetensors").read_bytes()
    # safetensors layout: u64 header length, JSON header, raw data. Not a pickle, not a zip.
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert data[:1] != b"\x80" and data[:2] != b"PK"
    expected = sorted(f"{m}.{p}" for m in names for p in ("lora_A", "lora_B"))
    assert sorted(k for k in header if k != "__metadata__") == expected
    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        assert sorted(f.keys()) == expected
        for key in expected:
            assert torch.equal(f.get_tensor(key), adapter_state_dict(model)[key])
    doc = json.loads((path / "adapter_config.json").read_text())
    assert doc["format"] == "lora_phi3.adapter" and doc["format_version"] == 1
    assert doc["sha256"] == hashlib.sha256(data).hexdigest() and doc["num_bytes"] == len(data)
    assert doc["lora_config"] == get_lora_config(model).to_file_dict()
    # plain LoRA files are as before the variants: their switches are left out at the defaults
    assert not set(VARIANT_DEFAULTS) & set(doc["lora_config"])
    assert {"use_rslora", "init_lora_weights", "use_dora"} <= set(VARIANT_DEFAULTS)
    assert {**doc["lora_config"], **VARIANT_DEFAULTS} == \
        get_lora_config(model).to_dict()
    qkv = doc["modules"]["model.layers.0.self_attn.qkv_proj"]
    assert qkv["type"] == "MergedLinear" and qkv["split_sizes"] == [64, 16, 16]
    assert qkv["enable_lora"] == [True, False, True] and qkv["r"] == 4 and qkv["scaling"] == 2.0
    assert doc["tensors"]["model.layers.0.self_attn.qkv_proj.lora_B"] == {"shape": [80, 4],
                                                                          "dtype": "float32"}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2, self.head = (nn.Embedding(10, 8), nn.Linear(8, 8),
                                                   nn.Linear(8, 8), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.emb(x))))))


@pytest.mark.parametrize("bias, keys", [
    ("all", ["fc1.bias", "fc1.lora_A", "fc1.lora_B", "fc2.bias", "head.bias", "head.weight"]),
    ("lora_only", ["fc1.bias", "fc1.lora_A", "fc1.lora_B", "head.bias", "head.weight"]),
    ("none", ["fc1.lora_A", "fc1.lora_B", "head.bias", "head.weight"]),
])
def test_biases_and_modules_to_save_are_saved_and_restored(tmp_path, bias, keys):
    def make(seed):
        torch.manual_seed(0)
        model = inject_lora(Tiny(), LoraConfig(r=2, target_modules=["fc1"], bias=bias,
                                               modules_to_save=["head"]))
        return randomize(model, seed)
    source, target = make(1), make(2)
    assert sorted(adapter_state_dict(source)) == keys
    save_adapter(source, tmp_path / "a")
    load_adapter(target, tmp_path / "a")
    x = torch.arange(10)
    assert torch.equal(target(x), source(x))


def test_load_into_merged_model_then_unmerge_restores_base_bits(tmp_path):
    source = adapted()
    save_adapter(source, tmp_path / "a")
    target = adapted(seed=3)
    base = {k: v.clone() for k, v in tiny_phi3().state_dict().items()}
    merge_lora(target)
    assert all(m.merged for m in lora_modules(target).values())
    load_adapter(target, tmp_path / "a")  # unmerge old delta -> load -> merge new delta
    assert all(m.merged for m in lora_modules(target).values())
    torch.testing.assert_close(logits(target), logits(dense_reference(source)), atol=1e-5, rtol=0)
    unmerge_lora(target)
    state = target.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items() if k in state)
    assert torch.equal(logits(target), logits(source))


def test_load_in_train_mode(tmp_path):
    source = adapted()
    save_adapter(source, tmp_path / "a")
    target = adapted(seed=3).train()
    load_adapter(target, tmp_path / "a")
    assert torch.equal(logits(target.eval()), logits(source))


def test_float_dtypes_are_cast_and_reported(tmp_path, caplog):
    source = adapted()
    for m in lora_modules(source).values():
        m.lora_A.data, m.lora_B.data = m.lora_A.data.bfloat16(), m.lora_B.data.bfloat16()
    save_adapter(source, tmp_path / "a")
    target = adapted(seed=2)
    with caplog.at_level(logging.WARNING, logger="lora_phi3.adapters.validate"):
        load_adapter(target, tmp_path / "a")
    assert "casting 16 tensor(s) to the model's dtype" in caplog.text
    for name, m in lora_modules(target).items():
        assert m.lora_A.dtype == torch.float32
        assert torch.equal(m.lora_A, lora_modules(source)[name].lora_A.float())


def test_strict_false_allows_missing_keys(tmp_path):
    source = adapted()
    path = save_adapter(source, tmp_path / "a")
    tensors = {k: v for k, v in adapter_state_dict(source).items()
               if not k.startswith("model.layers.1.mlp.down_proj")}
    rewrite(path, {k: v.clone() for k, v in tensors.items()})
    target = adapted(seed=2)
    kept = lora_modules(target)["model.layers.1.mlp.down_proj"].lora_B.clone()
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.down_proj.lora_A', "
                                         r"'model.layers.1.mlp.down_proj.lora_B'\]"):
        load_adapter(target, path)
    load_adapter(target, path, strict=False)
    assert torch.equal(lora_modules(target)["model.layers.1.mlp.down_proj"].lora_B, kept)
    assert torch.equal(lora_modules(target)["model.layers.0.mlp.down_proj"].lora_B,
                       lora_modules(source)["model.layers.0.mlp.down_proj"].lora_B)


# -- refused loads leave the model bit-identical ---------------------------------------------------
def _shape(path, tmp_path):
    save_adapter(adapted(r=8, lora_alpha=16), path)


def _missing(path, tmp_path):
    t = adapter_state_dict(adapted())
    rewrite(path, {k: v.clone() for k, v in t.items() if not k.startswith("model.layers.1.mlp.down_proj")})


def _unexpected(path, tmp_path):
    t = {k: v.clone() for k, v in adapter_state_dict(adapted()).items()}
    rewrite(path, {**t, "model.layers.0.mlp.extra.lora_A": torch.ones(4, 8)})


def _unexpected_module(path, tmp_path):
    t = {k: v.clone() for k, v in adapter_state_dict(adapted()).items()}
    rewrite(path, {**t, "model.norm.weight": torch.ones(64)})


def _truncated(path, tmp_path):
    f = path / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _bit_flip(path, tmp_path):
    f = path / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))


def _truncated_resummed(path, tmp_path):  # checksum matches, so the header check must catch it
    f = path / "adapter.safetensors"
    data = f.read_bytes()[:-100]
    f.write_bytes(data)
    doc = json.loads((path / "adapter_config.json").read_text())
    doc.update(sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data))
    (path / "adapter_config.json").write_text(json.dumps(doc))


def _bad_header(path, tmp_path):
    data = (100).to_bytes(8, "little") + b"{not json" + b" " * 200
    (path / "adapter.safetensors").write_bytes(data)
    doc = json.loads((path / "adapter_config.json").read_text())
    doc.update(sha256=hashlib.sha256(data).hexdigest(), num_bytes=len(data))
    (path / "adapter_config.json").write_text(json.dumps(doc))


def _int_dtype(path, tmp_path):
    t = {k: v.clone() for k, v in adapter_state_dict(adapted()).items()}
    t["model.layers.0.mlp.down_proj.lora_A"] = t["model.layers.0.mlp.down_proj.lora_A"].to(torch.int32)
    rewrite(path, t)


def _other_alpha(path, tmp_path):
    save_adapter(adapted(lora_alpha=16), path)


def _json_disagrees(path, tmp_path):
    doc = json.loads((path / "adapter_config.json").read_text())
    doc["tensors"]["model.layers.0.mlp.down_proj.lora_A"]["shape"] = [4, 95]
    (path / "adapter_config.json").write_text(json.dumps(doc))


def _no_json(path, tmp_path):
    (path / "adapter_config.json").unlink()


def _no_tensors(path, tmp_path):
    (path / "adapter.safetensors").unlink()


def _future_version(path, tmp_path):
    doc = json.loads((path / "adapter_config.json").read_text())
    doc["format_version"] = 99
    (path / "adapter_config.json").write_text(json.dumps(doc))


def _from_other_save(path, tmp_path):  # a tensor file and a json from two different saves
    save_adapter(adapted(seed=9), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "adapter.safetensors", path / "adapter.safetensors")


@pytest.mark.parametrize("corrupt, message", [
    (_shape, r"shape mismatch for model.layers.0.mlp.down_proj.lora_A: file \(8, 96\), "
             r"model \(4, 96\)"),
    (_missing, r"missing keys \['model.layers.1.mlp.down_proj.lora_A', "
               r"'model.layers.1.mlp.down_proj.lora_B'\]"),
    (_unexpected_module, r"unexpected keys \['model.norm.weight'\]"),
    (_unexpected, r"tensor model.layers.0.mlp.extra.lora_A belongs to no entry of modules"),
    (_truncated, r"checksum mismatch"),
    (_bit_flip, r"checksum mismatch"),
    (_from_other_save, r"checksum mismatch"),
    (_truncated_resummed, r"truncated or corrupt|points past the end"),
    (_bad_header, r"safetensors header is not valid JSON"),
    (_int_dtype, r"model.layers.0.mlp.down_proj.lora_A: dtype int32 is not a floating dtype"),
    (_other_alpha, r"module model.layers.0.mlp.down_proj differs \(file, model\): "
                   r"\{'lora_alpha': \(16, 8\), 'scaling': \(4.0, 2.0\)\}"),
    (_json_disagrees, r"json says float32 \[4, 95\]"),
    (_no_json, r"lacks 'adapter_config.json'"),
    (_no_tensors, r"lacks 'adapter.safetensors'"),
    (_future_version, r"format_version 99 is not supported"),
])
def test_refused_loads_leave_the_model_bit_identical(tmp_path, corrupt, message):
    path = save_adapter(adapted(), tmp_path / "a")
    corrupt(path, tmp_path)
    merged = adapted(seed=3)
    merge_lora(merged)
    for model in (adapted(seed=2), merged):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
        assert_unchanged(model, snap)


def test_refused_load_into_bare_model_leaves_it_untouched(tmp_path):
    path = save_adapter(adapted(), tmp_path / "a")
    other = tiny_phi3(intermediate_size=48)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"module model.layers.0.mlp.down_proj: in_features is 48 "
                                         r"in the model, 96 in the file"):
        load_adapter(other, path)
    assert_unchanged(other, snap)
    assert not lora_modules(other) and get_lora_config(other) is None


def test_refused_load_after_previewing_the_injection_leaves_bare_model_untouched(tmp_path):
    path = save_adapter(adapted(), tmp_path / "a")  # 2 layers
    deeper = tiny_phi3(num_hidden_layers=3)
    snap = snapshot(deeper)
    grads = {n: p.requires_grad for n, p in deeper.named_parameters()}
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.2.mlp.down_proj.lora_A'"):
        load_adapter(deeper, path)  # the saved modules exist, but injection would add layer 2
    assert_unchanged(deeper, snap)
    assert not lora_modules(deeper) and get_lora_config(deeper) is None
    assert {n: p.requires_grad for n, p in deeper.named_parameters()} == grads


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match=r"holds no LoRA layer with r > 0"):
        save_adapter(tiny_phi3(), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        save_adapter(adapted(), tmp_path / "file")


# -- atomic writes ---------------------------------------------------------------------------------
def test_crash_during_fresh_save_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args):
        raise OSError("simulated crash")
    monkeypatch.setattr(atomic.os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(adapted(), tmp_path / "a")
    assert os.listdir(tmp_path) == []


def test_crash_between_renames_leaves_a_pair_that_is_refused(tmp_path, monkeypatch):
    path = save_adapter(adapted(seed=1), tmp_path / "a")
    real_replace, calls = os.replace, []

    def crash_on_json(src, dst):
        calls.append(dst)
        if str(dst).endswith("adapter_config.json"):
            raise OSError("simulated crash")
        real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", crash_on_json)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(adapted(seed=5), path)  # new tensors land, the new json does not
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert sorted(os.listdir(path)) == ["adapter.safetensors", "adapter_config.json"]  # no temps
    model = adapted(seed=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_adapter(model, path)
    assert_unchanged(model, snap)


def test_overwrite_replaces_both_files(tmp_path):
    path = save_adapter(adapted(seed=1), tmp_path / "a")
    source = adapted(seed=5)
    save_adapter(source, path)
    target = adapted(seed=2)
    load_adapter(target, path)
    assert torch.equal(logits(target), logits(source))


# -- size ------------------------------------------------------------------------------------------
def test_phi3_mini_adapter_size_at_r16():
    """Phi-3-mini (hidden 3072, intermediate 8192, 32 layers, 32 heads, 32 kv heads), r=16 on the
    four fused projections, built on the meta device (no weights are allocated)."""
    h, i, layers, r = 3072, 8192, 32, 16
    cfg = Phi3Config(vocab_size=32064, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                     num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg)
    inject_lora(model, LoraConfig(r=r, lora_alpha=32))  # default targets, one adapter per slice
    sd = adapter_state_dict(model)
    # Per layer: qkv_proj 3 slices (A 3r x h, B 3h x r), o_proj (r x h, h x r),
    # gate_up_proj 2 slices (A 2r x h, B 2i x r), down_proj (r x i, h x r).
    per_layer = (3 * r * h + 3 * h * r) + (r * h + h * r) + (2 * r * h + 2 * i * r) + (r * i + h * r)
    assert per_layer == r * (11 * h + 3 * i) == 933_888
    assert sum(t.numel() for t in sd.values()) == layers * per_layer == 29_884_416
    assert all(k.endswith(("lora_A", "lora_B")) for k in sd) and len(sd) == 4 * 2 * layers
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    assert nbytes == 119_537_664  # fp32 adapters: 119.5 MB (bf16 would be half)


def test_saved_adapter_directory_has_normal_permissions(tmp_path):
    # Built in a temp dir (mkdtemp makes those 0700) and renamed: it must end up 0777 - umask.
    umask = os.umask(0o022)
    try:
        out = save_adapter(adapted(), tmp_path / "adapter")
    finally:
        os.umask(umask)
    assert (os.stat(out).st_mode & 0o777) == 0o755


def test_an_rslora_adapter_saves_its_switch_and_loads_onto_a_bare_model(tmp_path):

    ours = adapted(["qkv_proj", "down_proj"], use_rslora=True)
    save_adapter(ours, tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert doc["lora_config"]["use_rslora"] is True
    back = load_adapter(tiny_phi3(), tmp_path / "a")
    assert get_lora_config(back).use_rslora
    assert all(m.scaling == 8 / 2 for m in lora_modules(back).values())
    torch.testing.assert_close(logits(back), logits(ours), atol=0, rtol=0)
    plain = adapted(["qkv_proj", "down_proj"])  # same shapes, scaling alpha / r: refused
    with pytest.raises(ValueError, match="use_rslora"):
        load_adapter(plain, tmp_path / "a")


def test_a_gaussian_init_adapter_records_it_and_reloads_exactly(tmp_path):
    ours = adapted(["qkv_proj", "o_proj"], init_lora_weights="gaussian")
    save_adapter(ours, tmp_path / "g")
    doc = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert doc["lora_config"]["init_lora_weights"] == "gaussian"
    back = load_adapter(tiny_phi3(), tmp_path / "g")
    assert get_lora_config(back).init_lora_weights == "gaussian"
    torch.testing.assert_close(logits(back), logits(ours), atol=0, rtol=0)
