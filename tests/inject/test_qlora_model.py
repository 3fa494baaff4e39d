"""Whole QLoRA models: streaming load from a dense checkpoint, and merging back to a dense model."""

import weakref

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from lora_phi3 import LoraConfig, inject_lora, merge_and_unload
from lora_phi3.adapters import adapter_state_dict
from lora_phi3.layers import LoRALayer
from lora_phi3.inject import dequantize_and_merge, load_quantized_model
from lora_phi3.inject.qlora_model import quantized_lora_layers
from tiny import NF4_SIZES, X, randomize_lora, tiny_phi3


# -- merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("unload", ["merge_and_unload", "dequantize_and_merge"])
def test_merge_and_unload_gives_a_plain_dense_model_with_the_same_logits(unload):
    model = tiny_phi3(attn="sdpa", **NF4_SIZES)
    inject_lora(model, LoraConfig(r=4, quantize_base="nf4"))
    randomize_lora(model, 1, 0.2)
    x = X
    expected = model(x).logits
    layers = quantized_lora_layers(model)
    merged_ref = {n: m.quantized_weight.dequantize() + m.delta_weight() for n, m in layers.items()}
    plain = merge_and_unload(model) if unload == "merge_and_unload" else dequantize_and_merge(model)
    assert not any(isinstance(m, LoRALayer) for m in plain.modules())
    assert not any("quantized_weight" in n or "lora" in n for n in plain.state_dict())
    for name, weight in merged_ref.items():
        module = plain.get_submodule(name)
        assert type(module) is nn.Linear and isinstance(module.weight, nn.Parameter)
        torch.testing.assert_close(module.weight, weight)
    torch.testing.assert_close(plain(x).logits, expected, rtol=1e-4, atol=1e-4)
    assert set(plain.state_dict()) == set(tiny_phi3(attn="sdpa", **NF4_SIZES).state_dict())


def test_dequantize_and_merge_frees_each_4bit_copy_and_checks_first(monkeypatch):
    model = tiny_phi3(attn="sdpa", **NF4_SIZES)
    inject_lora(model, LoraConfig(r=2, quantize_base="nf4"))
    layers = quantized_lora_layers(model)
    with torch.no_grad():
        layers["model.layers.1.mlp.down_proj"].lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"safe_merge refused: .*\['model.layers.1.mlp.down_proj'\]; "
                                         r"no weight was changed"):
        dequantize_and_merge(model)
    assert not any(m.merged for m in layers.values())  # all still on their 4-bit bases
    with torch.no_grad():
        layers["model.layers.1.mlp.down_proj"].lora_B.zero_()
    both = []  # before each merge: layers holding a dense merged weight and their 4-bit storage
    real_merge = LoRALayer.merge

    def spy(layer, *args, **kwargs):
        both.append(sum(m.weight is not None and m.quantized_weight is not None
                        for m in layers.values()))
        return real_merge(layer, *args, **kwargs)

    monkeypatch.setattr(LoRALayer, "merge", spy)
    refs = [weakref.ref(m.quantized_weight.codes) for m in layers.values()]
    plain = dequantize_and_merge(model)
    assert both == [0] * len(layers)  # each layer's 4-bit copy was freed before the next merge
    del layers
    assert all(r() is None for r in refs)
    assert not quantized_lora_layers(plain)


# -- loading a quantized base from a dense checkpoint ---------------------------------------------
def _track_reads(monkeypatch):
    """Wrap safetensors.safe_open so every tensor read is tracked while it is alive."""
    import safetensors

    live, stats = {}, {"peak": 0, "reads": 0}
    real_open = safetensors.safe_open

    class Tracked:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            live[id(t)] = (key, t.nbytes)
            weakref.finalize(t, live.pop, id(t), None)
            stats["reads"] += 1
            stats["peak"] = max(stats["peak"], sum(n for k, n in live.values() if k.endswith("proj.weight")))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Tracked)
    return stats


@pytest.mark.parametrize("shard", [False, True])
def test_load_quantized_model_streams_and_equals_inject_on_from_pretrained(tmp_path, monkeypatch, shard):
    # fp32 checkpoint, loaded as bf16; the unsharded one also ties lm_head to the embeddings
    source = tiny_phi3(attn="sdpa", **NF4_SIZES, num_hidden_layers=3, tie_word_embeddings=not shard)
    source.save_pretrained(tmp_path, max_shard_size="200KB" if shard else "1GB")
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == shard
    config = LoraConfig(r=4, quantize_base="nf4")
    stats = _track_reads(monkeypatch)
    model = load_quantized_model(tmp_path, config, dtype=torch.bfloat16)
    monkeypatch.undo()
    dense_projections = [t.nbytes for n, t in source.state_dict().items() if n.endswith("proj.weight")]
    assert stats["reads"] == len(source.state_dict()) - (not shard)  # a tied lm_head is not stored
    # At most one dense projection from the checkpoint is alive at any time (here: fp32 ones),
    # far below all of them at once (what from_pretrained followed by inject_lora holds).
    assert stats["peak"] <= max(dense_projections) < sum(dense_projections) / 4

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    inject_lora(reference, config)
    for name, layer in quantized_lora_layers(reference).items():  # the very same 4-bit codes and scales
        for (key, a), (_, b) in zip(layer.named_buffers(), model.get_submodule(name).named_buffers()):
            assert torch.equal(a, b), (name, key)
    randomize_lora(reference, 1, 0.2)
    model.load_state_dict(adapter_state_dict(reference), strict=False)
    x = X
    assert torch.equal(model(x).logits, reference(x).logits)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (not shard)


def test_load_quantized_model_errors(tmp_path):
    with pytest.raises(ValueError, match=r"quantize_base='nf4', got None"):
        load_quantized_model(tmp_path, LoraConfig(r=2))
    tiny_phi3(attn="sdpa", **NF4_SIZES).config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds no \*\.safetensors checkpoint"):
        load_quantized_model(tmp_path, LoraConfig(r=2, quantize_base="nf4"))
    with pytest.raises(ValueError, match=r"dtype must be one of .* got torch.int8"):
        load_quantized_model(tmp_path, LoraConfig(r=2, quantize_base="nf4"), dtype=torch.int8)


# -- bad input -------------------------------------------------------------------------------------
