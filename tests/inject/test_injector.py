"""The injector: the swap, its numerics and the model-wide controls on generic models (an MLP with
embeddings, a conv net, GPT-2's Conv1D), and the lean training path it turns on for a tiny Phi-3."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lora_phi3 import layers as L
from lora_phi3.config import LoraConfig
from lora_phi3.inject.injector import (disable_lora, get_lora_config, inject_lora, lora_modules,
                                       merge_and_unload, merge_lora, unmerge_lora)
from tiny import ConvNet, TinyNet, X, randomize_lora, saved_bytes, tiny_gpt2, tiny_phi3


def conv_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 6, 5, generator=g),
            torch.randn(1, 2, 2, 5, 5, generator=g))


def outputs(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    out = out.logits if hasattr(out, "logits") else out
    return out if isinstance(out, tuple) else (out,)


def assert_close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def ids(vocab=20, shape=(2, 7)):
    return (torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(3)),)


CASES = {  # name: (model builder, config builder, inputs builder)
    "mlp": (TinyNet, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "embed"]), ids),
    # conv2g (groups=2) is left out: in PEFT's conv layout, which inject_lora uses, a grouped conv
    # cannot merge (test_grouped_conv_adapts_but_refuses_to_merge).
    "conv": (ConvNet, lambda: LoraConfig(r=2, lora_alpha=3, target_modules=["conv1", "conv2", "conv3"]),
             conv_inputs),
    "gpt2": (tiny_gpt2, lambda: LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc", "wpe"]),
             lambda: ids(100)),
}


# -- wrapping and numerics ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_weights_are_shared_not_copied(case):
    make, config, _ = CASES[case]
    torch.manual_seed(0)
    model = make()
    before = {n: (m.weight, m.weight.data_ptr()) for n, m in model.named_modules()
              if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor)}
    inject_lora(model, config())
    assert lora_modules(model)
    for name, layer in lora_modules(model).items():
        param, ptr = before[name]
        assert layer.weight is param and layer.weight.data_ptr() == ptr
    expected = {"mlp": (L.Linear, L.Embedding), "conv": (L.Conv1d, L.Conv2d, L.Conv3d),
                "gpt2": (L.Linear, L.Embedding)}[case]
    assert {type(m) for m in lora_modules(model).values()} == set(expected)


@pytest.mark.parametrize("case", list(CASES))
def test_four_way_equivalence(case):
    """Unmerged == merged == unmerged again == merge_and_unload, reloaded strictly into a vanilla model."""
    make, config, make_inputs = CASES[case]
    torch.manual_seed(0)
    model = make()
    vanilla_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, config())
    randomize_lora(model)
    inputs = make_inputs()
    with disable_lora(model):
        base_out = outputs(model, inputs)
    unmerged = outputs(model, inputs)
    assert any((u - b).abs().max() > 1e-3 for u, b in zip(unmerged, base_out))  # adapters do act
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    assert_close(outputs(model, inputs), unmerged)
    unmerge_lora(model)
    for key, value in vanilla_state.items():  # bit-identical base weights after unmerge
        assert torch.equal(model.state_dict()[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, inputs), unmerged))
    plain = merge_and_unload(model)
    assert plain is model and not lora_modules(model) and get_lora_config(model) is None
    assert not any(isinstance(m, L.LoRALayer) for m in model.modules())
    assert_close(outputs(model, inputs), unmerged)
    torch.manual_seed(123)  # a different init: only the loaded state can make it match
    fresh = make()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert set(fresh.state_dict()) == set(vanilla_state)
    assert_close(outputs(fresh, inputs), unmerged)


def test_dense_reference_for_every_layer_type():
    torch.manual_seed(0)
    net, convs, gpt = TinyNet(), ConvNet(), tiny_gpt2()
    inject_lora(net, LoraConfig(r=3, lora_alpha=6, target_modules=["layers.0.fc1", "embed"]))
    inject_lora(convs, LoraConfig(r=2, lora_alpha=5, target_modules=["conv2"]))
    inject_lora(gpt, LoraConfig(r=2, lora_alpha=7, target_modules=["h.0.attn.c_attn"]))
    for model in (net, convs, gpt):
        randomize_lora(model, seed=5)

    fc1 = net.layers[0].fc1
    W, b, A, B, s = fc1.weight, fc1.bias, fc1.lora_A, fc1.lora_B, 6 / 3
    x = torch.randn(4, 16)
    torch.testing.assert_close(fc1(x), x @ (W + s * B @ A).T + b, atol=1e-5, rtol=1e-5)

    emb = net.embed
    table = emb.weight + s * (emb.lora_B @ emb.lora_A).T  # (vocab, dim)
    tok = torch.tensor([[0, 5, 19]])
    torch.testing.assert_close(emb(tok), table[tok], atol=1e-5, rtol=1e-5)

    conv = convs.conv2  # PEFT's layout: A (r, in, *k), B (out, r, 1, 1)
    Wc = conv.weight + 2.5 * (conv.lora_B.flatten(1) @ conv.lora_A.flatten(1)).view(conv.weight.shape)
    xc = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(conv(xc), F.conv2d(xc, Wc, conv.bias, padding=1), atol=1e-5, rtol=1e-5)

    c_attn = gpt.transformer.h[0].attn.c_attn  # Conv1D: weight (in, out), y = x @ W + b
    assert isinstance(c_attn, L.Linear) and c_attn.fan_in_fan_out
    Wg = c_attn.weight + 3.5 * (c_attn.lora_B @ c_attn.lora_A).T
    xg = torch.randn(3, 32)
    torch.testing.assert_close(c_attn(xg), xg @ Wg + c_attn.bias, atol=1e-5, rtol=1e-5)
    merge_lora(gpt)
    torch.testing.assert_close(c_attn.weight, Wg.detach(), atol=1e-6, rtol=1e-6)


def test_grouped_conv_adapts_but_refuses_to_merge():
    """PEFT's layout on a grouped conv: A spans every input channel, B is a grouped 1x1 conv, so
    the update has no grouped kernel form. The forward is the two convolutions; merging is refused
    before any weight changes."""
    torch.manual_seed(0)
    convs = inject_lora(ConvNet(), LoraConfig(r=2, lora_alpha=3, target_modules=["conv2g"]))
    randomize_lora(convs, seed=5)
    conv, x = convs.conv2g, torch.randn(2, 8, 6, 5)
    assert conv.lora_A.shape == (2, 8, 3, 1) and conv.lora_B.shape == (4, 1, 1, 1)
    lora = F.conv2d(F.conv2d(x, conv.lora_A), conv.lora_B, groups=2)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, groups=2) + 1.5 * lora,
                               atol=1e-5, rtol=1e-5)
    before = conv.weight.clone()
    with pytest.raises(ValueError, match="groups=2 has no dense update"):
        merge_lora(convs)
    assert torch.equal(conv.weight, before) and not conv.merged


def test_disable_lora_gives_base_outputs_and_restores_state():
    torch.manual_seed(0)
    model = TinyNet()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    x = ids()
    adapted, expected = outputs(model, x), outputs(base, x)
    with disable_lora(model) as m:
        assert m is model
        assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), expected))
        with disable_lora(model):  # nesting is fine
            pass
        assert all(l.lora_disabled for l in lora_modules(model).values())
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), adapted))

    merge_lora(model)
    merged_weights = {n: l.weight.clone() for n, l in lora_modules(model).items()}
    with pytest.raises(RuntimeError, match="boom"):
        with disable_lora(model):
            assert not any(l.merged for l in lora_modules(model).values())
            assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), expected))
            raise RuntimeError("boom")
    for name, layer in lora_modules(model).items():
        assert layer.merged and not layer.lora_disabled
        assert torch.equal(layer.weight, merged_weights[name])


def test_disable_lora_survives_eval_and_refuses_merge():
    torch.manual_seed(0)
    model = TinyNet()
    base = copy.deepcopy(model)
    inject_lora(model, LoraConfig(r=2, target_modules=["fc1"]))
    randomize_lora(model)
    layer = model.layers[0].fc1
    layer.merge_weights = True  # a hand-set loralib-style layer would merge on eval()
    with disable_lora(model):
        model.eval()
        assert not layer.merged
        assert torch.equal(outputs(model, ids())[0], outputs(base, ids())[0])
        with pytest.raises(ValueError, match="cannot merge inside disable_lora"):
            merge_lora(model)
        with pytest.raises(ValueError, match="cannot merge_and_unload inside disable_lora"):
            merge_and_unload(model)
    assert layer.merge_weights is True and not layer.merged


def test_injected_layers_do_not_merge_on_eval():
    model = inject_lora(TinyNet(), LoraConfig(target_modules=["fc1"]))
    model.eval()
    assert not any(l.merged for l in lora_modules(model).values())
    model.train()
    assert all(l.training for l in lora_modules(model).values())


def test_safe_merge_checks_every_layer_before_touching_any():
    torch.manual_seed(0)
    model = inject_lora(TinyNet(), LoraConfig(r=2, target_modules="all-linear"))
    randomize_lora(model)
    last_name, last = list(lora_modules(model).items())[-1]
    with torch.no_grad():
        last.lora_B[0, 0] = float("inf")  # only the last layer in merge order is bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"safe_merge refused: .*{last_name}.*no weight was changed"):
        merge_lora(model, safe_merge=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(l.merged for l in lora_modules(model).values())


def test_merging_into_tied_weights_is_refused():
    gpt = tiny_gpt2()
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    inject_lora(gpt, LoraConfig(target_modules=["wte"]))
    randomize_lora(gpt)
    head = gpt.lm_head.weight.clone()
    with pytest.raises(ValueError, match=r"cannot merge LoRA into tied weights: .*transformer\.wte.*lm_head"):
        merge_lora(gpt)
    assert torch.equal(gpt.lm_head.weight, head)


# -- what inject_lora refuses ----------------------------------------------------------------------
def adapted(model):
    return sorted(lora_modules(model))


def test_target_none_needs_phi3():
    with pytest.raises(ValueError, match=r"target_modules is None, which only has a default for Phi-3; "
                                         r"TinyNet needs explicit target_modules.*fc1, fc2"):
        inject_lora(TinyNet(), LoraConfig())
    with pytest.raises(TypeError, match=r"inject_lora needs a LoraConfig, got dict"):
        inject_lora(TinyNet(), {"r": 8})


def test_injecting_twice_is_refused_until_unloaded():
    model = inject_lora(TinyNet(), LoraConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"never stacks a second adapter\. Call merge_and_unload\(model\) "
                                         r"first.*load_adapter"):
        inject_lora(model, LoraConfig(target_modules=["fc2"]))
    assert adapted(model) == ["layers.0.fc1", "layers.1.fc1", "layers.2.fc1"]
    merge_and_unload(model)
    inject_lora(model, LoraConfig(target_modules=["fc2"]))
    assert adapted(model) == ["layers.0.fc2", "layers.1.fc2", "layers.2.fc2"]


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.a, model.b = shared, shared
    inject_lora(model, LoraConfig(target_modules=["a"]))
    assert isinstance(model.a, L.Linear) and model.a is model.b


# -- training state -------------------------------------------------------------------------------
@pytest.mark.parametrize("bias, trainable_biases", [
    ("none", set()),
    ("lora_only", {"layers.0.fc1.bias", "layers.1.fc1.bias", "layers.2.fc1.bias"}),
    ("all", {f"layers.{i}.{n}.bias" for i in range(3) for n in ("fc1", "fc2", "norm")} | {"lm_head.bias"}),
])
def test_only_lora_modules_to_save_and_biases_train(bias, trainable_biases):
    torch.manual_seed(0)
    model = inject_lora(TinyNet(), LoraConfig(r=2, target_modules=["fc1"], bias=bias, modules_to_save=["lm_head"]))
    randomize_lora(model)
    lora = {f"layers.{i}.fc1.lora_{ab}" for i in range(3) for ab in "AB"}
    expected = lora | trainable_biases | {"lm_head.weight", "lm_head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(ids()[0]).flatten(0, 1), ids()[0].flatten())
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match=r"modules_to_save entry 'head' matched no module of TinyNet"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["fc1"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"modules_to_save entry 'layers\.0' \(layers\.0\) contains LoRA "
                                         r"targets \['layers\.0\.fc1'\]"):
        inject_lora(TinyNet(), LoraConfig(target_modules=["fc1"], modules_to_save=["layers.0"]))


def test_config_and_lora_modules_are_exposed():
    model = inject_lora(TinyNet(), LoraConfig(r=2, target_modules="all-linear"))
    config = get_lora_config(model)
    assert config.target_modules == "all-linear" and config.r == 2
    assert all(isinstance(m, L.LoRALayer) and m.r == 2 for m in lora_modules(model).values())
    assert get_lora_config(TinyNet()) is None and lora_modules(TinyNet()) == {}


def test_deepcopy_of_injected_model_unloads_independently():
    torch.manual_seed(0)
    model = inject_lora(TinyNet(), LoraConfig(r=2, target_modules=["fc1"]))
    randomize_lora(model)
    x = ids()
    expected = outputs(model, x)
    clone = merge_and_unload(copy.deepcopy(model))
    assert type(clone.layers[0].fc1) is nn.Linear
    assert isinstance(model.layers[0].fc1, L.Linear)
    assert clone.layers[0].fc1.weight.data_ptr() != model.layers[0].fc1.weight.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), expected))
    assert_close(outputs(clone, x), expected)


def test_gpt2_merge_and_unload_restores_conv1d():
    torch.manual_seed(0)
    gpt = tiny_gpt2()
    inject_lora(gpt, LoraConfig(target_modules="all-linear"))
    randomize_lora(gpt)
    x = ids(100)
    expected = outputs(gpt, x)
    merge_and_unload(gpt)
    assert type(gpt.transformer.h[0].attn.c_attn) is Conv1D
    assert gpt.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    assert_close(outputs(gpt, x), expected)


# -- the lean path is the default -----------------------------------------------------------------
def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def decoder_layer_saved_bytes(model, tokens=16):
    """Bytes autograd saves in one train-mode call of a tiny Phi-3's first decoder layer: each
    saved storage counted once, parameters left out (as ``benchmarks/bench_memory.py`` counts)."""
    layer = model.model.layers[0].train()
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, model.config.hidden_size, generator=g).requires_grad_(True)
    pos = torch.arange(tokens)[None]
    rope = model.model.rotary_emb(x, pos)
    torch.manual_seed(2)
    return saved_bytes(lambda: layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope),
                       params)


def lean_config():
    return LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05)  # Phi-3's four fused projections


def test_inject_lora_takes_the_lean_path_by_default():
    lean = decoder_layer_saved_bytes(inject_lora(tiny_phi3(), lean_config()))
    opted_out = inject_lora(tiny_phi3(), lean_config(), input_recompute=False)
    plain = decoder_layer_saved_bytes(opted_out)
    assert lean < plain
    L.enable_input_recompute(opted_out)  # what a caller had to know to do before
    assert decoder_layer_saved_bytes(opted_out) == lean
    with pytest.raises(TypeError, match=r"input_recompute must be a bool, got 'no'"):
        inject_lora(tiny_phi3(), lean_config(), input_recompute="no")


def test_plain_inject_lora_keeps_at_most_1_10x_the_frozen_layer():
    # Phi-3-mini's decoder layer with every size divided by 8 (as tests/test_bench_memory.py), T=32.
    mini_8 = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4,
                  num_hidden_layers=1)
    frozen = tiny_phi3(**mini_8).requires_grad_(False)
    lean = inject_lora(tiny_phi3(**mini_8), lean_config())
    opted_out = inject_lora(tiny_phi3(**mini_8), lean_config(), input_recompute=False)
    base = decoder_layer_saved_bytes(frozen, tokens=32)
    assert decoder_layer_saved_bytes(lean, tokens=32) / base <= 1.10
    assert decoder_layer_saved_bytes(opted_out, tokens=32) / base >= 1.30


def test_lean_path_changes_no_output_or_gradient():
    def grads(input_recompute):
        model = inject_lora(tiny_phi3(), lean_config(), input_recompute=input_recompute)
        randomize_lora(model, seed=4)
        model.train()
        torch.manual_seed(5)  # the same dropout masks
        out = model(X, labels=X)
        out.loss.backward()
        return out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (lean_out, lean_grads), (plain_out, plain_grads) = grads(True), grads(False)
    assert torch.equal(lean_out, plain_out)
    assert lean_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, atol=1e-6, rtol=1e-5)


def test_merge_and_unload_removes_the_hooks_inject_lora_added():
    model = tiny_phi3()
    own = model.model.norm.register_forward_hook(lambda m, i, o: None)  # a caller's hook stays
    before = hook_count(model)
    inject_lora(model, lean_config())
    assert hook_count(model) > before + 1  # input grad hook + recompute hooks
    clone = merge_and_unload(copy.deepcopy(model))  # a copy unloads on its own
    assert hook_count(clone) == before and hook_count(model) > before + 1
    merge_and_unload(model)
    assert hook_count(model) == before
    assert own.id in model.model.norm._forward_hooks


def test_recompute_enabled_before_injection_is_not_hooked_twice():
    model = tiny_phi3()
    L.enable_input_recompute(model)
    hooked = hook_count(model)
    inject_lora(model, LoraConfig(r=2, target_modules=["qkv_proj", "o_proj", "down_proj"]))
    assert hook_count(model) == hooked + 1  # only the input grad hook on the embeddings
    merge_and_unload(model)
    assert hook_count(model) == hooked  # the caller's own hooks stay


def test_enable_input_recompute_after_injection_adds_no_hooks():
    model = inject_lora(tiny_phi3(), lean_config())
    hooked = hook_count(model)
    L.enable_input_recompute(model)
    assert hook_count(model) == hooked
