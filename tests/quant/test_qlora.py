"""QLoRA layers (Linear/MergedLinear over an NF4 base), injection and adapters, against plain dense references."""

import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_phi3 import LoraConfig, inject_lora, merge_lora, unmerge_lora, merge_and_unload
from lora_phi3.adapters import adapter_state_dict, load_adapter, save_adapter
from lora_phi3.inject import disable_lora
from lora_phi3.layers import Linear
from lora_phi3.quant import Linear4bit, MergedLinear4bit, NF4Weight, nf4_quantize
from lora_phi3.inject.qlora_model import quantized_lora_layers
from tiny import NF4_SIZES, X, randomize_lora, tiny_phi3


# -- the layers against a plain dense reference ---------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_and_grads_equal_dense_reference(double_quant):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=gen)
    q = nf4_quantize(w, block_size=64, double_quant=double_quant)
    bias = nn.Parameter(torch.randn(48, generator=gen))
    layer = Linear4bit.from_nf4(q, bias, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(48, 4, generator=gen))
    x = torch.randn(3, 5, 128, generator=gen, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (x, layer.lora_A, layer.lora_B, bias), grad_out)

    W = q.dequantize()  # the dense weight, written plainly below
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref @ (W + 2.0 * B @ A).T + b
    ref_grads = torch.autograd.grad(ref, (x_ref, A, B, b), grad_out)
    # Ours adds x @ W.T and the adapter separately; the reference rounds W + 2BA first. Both are
    # fp32 sums of 128 products of size ~1, so where an output is small (cancellation) they may
    # differ by a few fp32 ulps of the summands: compare against an fp64 evaluation of the same
    # formula, allowing 8 ulps of the sum of |terms| (an error bound, not a blanket tolerance).
    W64, A64, B64 = W.double(), A.detach().double(), B.detach().double()
    x64 = x.detach().double()
    ref64 = x64 @ (W64 + 2.0 * B64 @ A64).T + b.detach().double()
    bound = 8 * torch.finfo(torch.float32).eps * (x64.abs() @ (W64 + 2.0 * B64 @ A64).abs().T + 1)
    assert ((out.double() - ref64).abs() <= bound).all()
    grad_x64 = grad_out.double() @ (W64 + 2.0 * B64 @ A64)
    bound_x = 8 * torch.finfo(torch.float32).eps * (grad_out.double().abs() @ (W64 + 2.0 * B64 @ A64).abs() + 1)
    assert ((grads[0].double() - grad_x64).abs() <= bound_x).all()
    for got, want in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * B.detach() @ A.detach())
    # The base is no parameter at all: nothing can give it a gradient or train it.
    assert "weight" not in dict(layer.named_parameters())
    assert all(not t.requires_grad for t in layer.buffers())
    assert set(dict(layer.named_parameters())) == {"bias", "lora_A", "lora_B"}


def test_merged_linear4bit_slices_equal_dense_reference():
    gen = torch.Generator().manual_seed(1)
    split, enable = [64, 32, 32], [True, False, True]  # q, k, v of a GQA qkv_proj; adapt q and v
    w = torch.randn(128, 64, generator=gen)
    q = nf4_quantize(w, block_size=64)
    layer = MergedLinear4bit.from_nf4(q, r=2, lora_alpha=4, enable_lora=enable, split_sizes=split)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn(out.shape, generator=gen)
    gx, gA, gB = torch.autograd.grad(out, (x, layer.lora_A, layer.lora_B), grad_out)

    A = layer.lora_A.detach().clone().requires_grad_(True)  # (2 * 2, 64): A_q, A_v
    B = layer.lora_B.detach().clone().requires_grad_(True)  # (64 + 32, 2): B_q, B_v
    x_ref = x.detach().clone().requires_grad_(True)
    delta = torch.cat([B[:64] @ A[:2], torch.zeros(32, 64), B[64:] @ A[2:]]) * 2.0
    ref = x_ref @ (q.dequantize() + delta).T
    rgx, rgA, rgB = torch.autograd.grad(ref, (x_ref, A, B), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in [(gx, rgx), (gA, rgA), (gB, rgB)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta.detach())


def test_4bit_layer_runs_the_one_fused_lora_computation_and_saves_no_dense_weight():
    gen = torch.Generator().manual_seed(5)
    q = nf4_quantize(torch.randn(32, 64, generator=gen))
    layer = MergedLinear4bit.from_nf4(q, r=2, lora_alpha=4, lora_dropout=0.25, enable_lora=[True, False])
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    saved = []
    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert out.grad_fn.name() == "LoRALinearFunctionBackward"
    assert not any(t.shape == (32, 64) for t in saved)  # only x, the packed mask and (3, 2)
    grad_out = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (x, layer.lora_A, layer.lora_B), grad_out)

    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout mask: written plainly, x W^T + s * dropout(x) delta^T
    delta = torch.cat([B @ A, torch.zeros(16, 64)])
    ref = x_ref @ q.dequantize().T + 2.0 * F.dropout(x_ref, 0.25, True) @ delta.T
    want = torch.autograd.grad(ref, (x_ref, A, B), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_base_grads_equal_a_bf16_layer_holding_the_dequantised_weight():
    gen = torch.Generator().manual_seed(2)
    dense = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(64, 128, generator=gen).to(torch.bfloat16))
    layer = Linear4bit.from_linear(dense, r=4, lora_alpha=8, lora_dtype=torch.float32)
    assert layer.quantized_weight.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    reference = Linear.from_linear(nn.Linear(128, 64, bias=False), r=4, lora_alpha=8,
                                   lora_dtype=torch.float32)
    reference.weight = nn.Parameter(layer.quantized_weight.dequantize(), requires_grad=False)  # bf16
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(64, 4, generator=gen))
        reference.lora_A.copy_(layer.lora_A)
        reference.lora_B.copy_(layer.lora_B)
    x = torch.randn(6, 128, generator=gen).to(torch.bfloat16).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), reference(x_ref)
    assert out.dtype == ref.dtype == torch.bfloat16
    grad_out = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    got = torch.autograd.grad(out, (x, layer.lora_A, layer.lora_B), grad_out)
    want = torch.autograd.grad(ref, (x_ref, reference.lora_A, reference.lora_B), grad_out)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_merge_is_dense_and_unmerge_restores_the_4bit_base():
    gen = torch.Generator().manual_seed(3)
    layer = Linear4bit.from_linear(nn.Linear(64, 16), r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(16, 2, generator=gen))
    codes = layer.quantized_weight.codes.clone()
    x = torch.randn(3, 64, generator=gen)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and isinstance(layer._parameters["weight"], nn.Parameter)
    assert not layer.weight.requires_grad
    torch.testing.assert_close(layer.weight, layer.quantized_weight.dequantize() + layer.delta_weight())
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert "weight" not in dict(layer.named_parameters()) and torch.equal(layer.quantized_weight.codes, codes)
    assert torch.equal(layer(x), unmerged)

# -- injection ------------------------------------------------------------------------------------
def test_inject_quantizes_targets_within_027_of_bf16_bytes_and_keeps_no_dense_copy():
    model = tiny_phi3(torch.bfloat16, attn="sdpa", **NF4_SIZES)
    dense_bytes = {n: m.weight.nbytes for n, m in model.named_modules() if n.endswith("proj")}
    dense_refs = [weakref.ref(m.weight) for n, m in model.named_modules() if n.endswith("proj")]
    inject_lora(model, LoraConfig(r=4, quantize_base="nf4"))
    layers = quantized_lora_layers(model)
    assert set(layers) == set(dense_bytes) and len(layers) == 8
    assert sum(isinstance(m, MergedLinear4bit) for m in layers.values()) == 4  # qkv_proj, gate_up_proj
    nf4_bytes = sum(t.nbytes for m in layers.values() for t in m.buffers())
    assert nf4_bytes == sum(m.quantized_weight.nbytes for m in layers.values())
    assert nf4_bytes <= 0.27 * sum(dense_bytes.values())
    assert all(r() is None for r in dense_refs)  # the dense projections were freed
    assert not any("nf4" in k for k in adapter_state_dict(model))
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    for m in layers.values():
        assert m.quantized_weight.compute_dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
        assert m.weight is None and isinstance(m.quantized_weight, NF4Weight)


def test_qlora_model_equals_a_dense_lora_model_on_the_dequantised_weights():
    qmodel = tiny_phi3(attn="sdpa", **NF4_SIZES)
    inject_lora(qmodel, LoraConfig(r=4, quantize_base="nf4"))
    randomize_lora(qmodel, 1, 0.2)
    dense = tiny_phi3(attn="sdpa", **NF4_SIZES)
    for name, m in quantized_lora_layers(qmodel).items():  # the dense model holds deq(W) in each projection
        dense.get_submodule(name).weight.data.copy_(m.quantized_weight.dequantize())
    inject_lora(dense, LoraConfig(r=4))
    dense.load_state_dict(adapter_state_dict(qmodel), strict=False)
    x = X
    torch.testing.assert_close(qmodel(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)
    with disable_lora(qmodel), disable_lora(dense):
        torch.testing.assert_close(qmodel(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)


def test_qlora_tiny_phi3_trains_and_its_loss_falls():
    model = tiny_phi3(torch.bfloat16, attn="sdpa", **NF4_SIZES)
    inject_lora(model, LoraConfig(r=8, lora_alpha=16, quantize_base="nf4"))
    storage = {n: t.clone() for n, t in model.named_buffers() if "quantized_weight" in n}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    model.train()
    losses = []
    for _ in range(20):
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # A clear fall (4.6 -> 2.5 nats measured), not noise: the adapters learn over a frozen 4-bit base.
    assert losses[-1] < 0.6 * losses[0] and sum(b < a for a, b in zip(losses, losses[1:])) >= 15, losses
    assert all(torch.equal(t, storage[n]) for n, t in model.named_buffers() if "quantized_weight" in n)

# -- merging --------------------------------------------------------------------------------------
def test_merge_lora_unmerge_lora_round_trip_on_a_qlora_model():
    model = tiny_phi3(attn="sdpa", **NF4_SIZES)
    inject_lora(model, LoraConfig(r=4, quantize_base="nf4"))
    randomize_lora(model, 1, 0.2)
    x = X
    before = model(x).logits
    storage = {n: t.clone() for n, t in model.named_buffers()}
    merge_lora(model)
    assert all(m.merged for m in quantized_lora_layers(model).values())
    torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)
    unmerge_lora(model)
    assert torch.equal(model(x).logits, before)
    assert all(torch.equal(t, storage[n]) for n, t in model.named_buffers())


# -- adapters -------------------------------------------------------------------------------------

def test_adapter_round_trip_never_saves_the_quantized_base(tmp_path):
    model = tiny_phi3(torch.bfloat16, attn="sdpa", **NF4_SIZES)
    inject_lora(model, LoraConfig(r=4, quantize_base="nf4"))
    randomize_lora(model, 1, 0.2)
    x = X
    expected = model(x).logits
    save_adapter(model, tmp_path / "adapter")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(adapter_state_dict(model))
    assert all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B") for k in keys)
    lora_bytes = sum(t.nbytes for t in adapter_state_dict(model).values())
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size < lora_bytes + 4096

    bare = tiny_phi3(torch.bfloat16, attn="sdpa", **NF4_SIZES)  # the same base: load_adapter re-injects with quantize_base='nf4'
    load_adapter(bare, tmp_path / "adapter")
    assert set(quantized_lora_layers(bare)) == set(quantized_lora_layers(model))
    assert torch.equal(bare(x).logits, expected)
    again = tiny_phi3(torch.bfloat16, attn="sdpa", **NF4_SIZES)
    inject_lora(again, LoraConfig(r=4, quantize_base="nf4"))
    load_adapter(again, tmp_path / "adapter")
    assert torch.equal(again(x).logits, expected)

# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_errors():
    odd = nn.Sequential(nn.Linear(100, 8))
    with pytest.raises(ValueError, match=r"cannot quantize '0' \(weight \(8, 100\)\): its row length "
                                         r"in_features=100 is not a multiple of the block size 64"):
        inject_lora(odd, LoraConfig(r=2, target_modules=["0"], quantize_base="nf4"))
    emb = nn.Sequential(nn.Embedding(10, 64))
    with pytest.raises(ValueError, match=r"quantizes linear layers only; '0' is Embedding"):
        inject_lora(emb, LoraConfig(r=2, target_modules=["0"], quantize_base="nf4"))
    with pytest.raises(ValueError, match=r"quantize_base must be one of \(None, 'nf4'\), got 'int8'"):
        LoraConfig(quantize_base="int8")
    integer = nn.Linear(64, 4)
    integer.weight = nn.Parameter(torch.ones(4, 64, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"w.dtype must be one of .* got torch.int32"):
        Linear4bit.from_linear(integer, r=2)
    layer = Linear4bit.from_linear(nn.Linear(64, 4), r=2)
    with pytest.raises(ValueError, match=r"weight must have shape \(4, 64\) for this layer, got \(4, 32\)"):
        layer.set_base_weight(torch.randn(4, 32))
    with pytest.raises(TypeError, match=r"Linear4bit needs an NF4Tensor, got Tensor"):
        Linear4bit.from_nf4(torch.randn(4, 64), r=2)
    with pytest.raises(ValueError, match=r"needs a 2-D NF4Tensor \(out_features, in_features\), "
                                         r"got shape \(2, 4, 64\)"):
        Linear4bit.from_nf4(nf4_quantize(torch.randn(2, 4, 64)), r=2)
    layer.merge()
    with pytest.raises(ValueError, match=r"set_base_weight on a merged layer; unmerge\(\) first"):
        layer.set_base_weight(torch.randn(4, 64))


def test_gpt2_conv1d_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(Conv1D(16, 64))  # weight (in=64, out=16)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 16, generator=gen))
        model[0].bias.copy_(torch.randn(16, generator=gen))
    inject_lora(model, LoraConfig(r=2, target_modules=["0"], quantize_base="nf4"))
    layer = model[0]
    assert isinstance(layer, Linear4bit) and layer.fan_in_fan_out
    assert layer.weight is None and layer.dense_base_weight().shape == (64, 16)
    randomize_lora(model, 1, 0.2)
    x = torch.randn(3, 64, generator=gen)
    W = layer.quantized_weight.dequantize()  # (out, in)
    ref = x @ (W + layer.scaling * layer.lora_B @ layer.lora_A).T + layer.bias
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    plain = merge_and_unload(model)
    assert type(plain[0]) is Conv1D and plain[0].weight.shape == (64, 16)
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-5)


def test_refused_quantized_injection_changes_nothing():
    # 'a' could be quantised, 'b' cannot (30 is not a multiple of 64): every target is checked
    # before the first replacement, so 'a' stays a plain nn.Linear with its weight.
    model = nn.Sequential()
    model.add_module("a", nn.Linear(64, 64))
    model.add_module("b", nn.Linear(30, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot quantize 'b' \(weight \(64, 30\)\): its row length "
                                         r"in_features=30 is not a multiple of the block size 64"):
        inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b"],
                                      quantize_base="nf4"))
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["a"], quantize_base="nf4"))
    assert isinstance(model.a, Linear4bit)
