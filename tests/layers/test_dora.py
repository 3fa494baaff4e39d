"""DoRA on Linear, MergedLinear and NF4 bases, against a dense reference written out here:
``x @ (m * (W + s B A) / ||W + s B A||_rows).T + b``, the norm detached as in PEFT."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora
from lora_phi3.layers.dora import dora_norm, weight_row_sq
from lora_phi3.quant import Linear4bit, MergedLinear4bit, nf4_quantize


def _randomize(layer, gen, scale=0.3):
    """Non-zero A, B and a magnitude away from its initial value."""
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * scale)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)
        layer.lora_magnitude.mul_(0.5 + torch.rand(layer.lora_magnitude.shape, generator=gen))


def _dense_dora(x, W, b, A, B, m, s):
    """The paper's formula, densely: each output row of ``W + s B A`` rescaled to length ``m``."""
    V = W + s * B @ A
    norm = V.norm(dim=1, keepdim=True).detach()
    out = x @ (m[:, None] * V / norm).T
    return out + b if b is not None else out


@pytest.mark.parametrize("bias", [True, False])
def test_linear_dora_forward_and_grads_match_dense_reference(bias):
    gen = torch.Generator().manual_seed(0)
    layer = lora.Linear(16, 12, r=4, lora_alpha=8, bias=bias, use_dora=True)
    _randomize(layer, gen)
    if bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    out = layer(x)
    dy = torch.randn(out.shape, generator=gen)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(out, params, dy)

    refs = [p.detach().clone().requires_grad_(True) for p in params]
    xr, Ar, Br, mr = refs[:4]
    ref = _dense_dora(xr, layer.weight.detach(), refs[4] if bias else None, Ar, Br, mr, 2.0)
    ref_grads = torch.autograd.grad(ref, refs, dy)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def test_dora_norm_equals_the_dense_norm_without_forming_it():
    gen = torch.Generator().manual_seed(1)
    W, A, B = (torch.randn(s, generator=gen) for s in [(20, 32), (4, 32), (20, 4)])
    norm = dora_norm(W, weight_row_sq(W), A, B, 0.75, ((0, 20),))
    torch.testing.assert_close(norm, (W + 0.75 * B @ A).norm(dim=1), atol=1e-5, rtol=1e-6)


def test_dora_starts_from_the_lora_function_exactly():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    plain = lora.Linear.from_linear(base, r=4, lora_alpha=8, init_lora_weights=False)
    dora = lora.Linear.from_linear(base, r=4, lora_alpha=8, use_dora=True)
    with torch.no_grad():  # same A, B as the plain layer; magnitude re-read for them
        dora.lora_A.copy_(plain.lora_A)
        dora.lora_B.copy_(plain.lora_B)
        dora.reset_dora_magnitude()
    x = torch.randn(3, 16)
    torch.testing.assert_close(dora(x), plain(x), atol=1e-6, rtol=1e-6)
    fresh = lora.Linear.from_linear(base, r=4, lora_alpha=8, use_dora=True)  # B = 0
    assert torch.equal(fresh(x), base(x))  # gain m / ||W|| is exactly 1
    assert set(fresh.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude"}
    torch.testing.assert_close(fresh.lora_magnitude, base.weight.norm(dim=1))


def test_fan_in_fan_out_dora_matches_dense_reference():
    gen = torch.Generator().manual_seed(2)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, fan_in_fan_out=True, use_dora=True)
    assert layer.weight.shape == (8, 6)
    torch.testing.assert_close(layer.lora_magnitude, layer.weight.T.norm(dim=1))
    _randomize(layer, gen)
    x = torch.randn(3, 8, generator=gen)
    ref = _dense_dora(x, layer.weight.T, layer.bias, layer.lora_A, layer.lora_B,
                      layer.lora_magnitude, 2.0)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_merged_linear_dora_scales_only_adapted_slices():
    gen = torch.Generator().manual_seed(3)
    sizes = [8, 4, 4]  # grouped-query q, k, v
    layer = lora.MergedLinear(12, 16, r=2, lora_alpha=4, enable_lora=[True, False, True],
                              split_sizes=sizes, use_dora=True)
    assert layer.lora_magnitude.shape == (12,)
    _randomize(layer, gen)
    x = torch.randn(2, 3, 12, generator=gen)
    out = layer(x)
    W, b, A, B, m = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude
    base_out = F.linear(x, W, b)
    assert torch.equal(out[..., 8:12], base_out[..., 8:12])  # the k slice: untouched, bit for bit
    for (rows, a, bb, mm) in [(slice(0, 8), A[:2], B[:8], m[:8]), (slice(12, 16), A[2:], B[8:], m[8:])]:
        ref = _dense_dora(x, W[rows], b[rows], a, bb, mm, 2.0)
        torch.testing.assert_close(out[..., rows], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_nf4_dora_matches_dense_reference_on_the_dequantized_weight(fused):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 128, generator=gen)
    q = nf4_quantize(w, block_size=64)
    bias = nn.Parameter(torch.randn(48, generator=gen), requires_grad=False)
    if fused:
        layer = MergedLinear4bit.from_nf4(q, bias, r=4, lora_alpha=8, enable_lora=[True, False, True],
                                         split_sizes=[16, 16, 16], use_dora=True)
    else:
        layer = Linear4bit.from_nf4(q, bias, r=4, lora_alpha=8, use_dora=True)
    W = q.dequantize()
    torch.testing.assert_close(layer.lora_magnitude,
                               W.norm(dim=1) if not fused else torch.cat([W[:16], W[32:]]).norm(dim=1))
    _randomize(layer, gen)
    x = torch.randn(3, 128, generator=gen)
    out = layer(x)
    if not fused:
        ref = _dense_dora(x, W, bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, 2.0)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    else:
        A, B, m = layer.lora_A, layer.lora_B, layer.lora_magnitude
        torch.testing.assert_close(out[:, :16], _dense_dora(x, W[:16], bias[:16], A[:4], B[:16],
                                                            m[:16], 2.0), atol=1e-4, rtol=1e-5)
        assert torch.equal(out[:, 16:32], layer.quantized_weight.matmul(x, bias)[:, 16:32])
        torch.testing.assert_close(out[:, 32:], _dense_dora(x, W[32:], bias[32:], A[4:], B[16:],
                                                            m[16:], 2.0), atol=1e-4, rtol=1e-5)
    layer.merge()  # the dense merged weight reproduces the forward
    torch.testing.assert_close(layer(x), out, atol=1e-4, rtol=1e-5)
    layer.unmerge()
    assert layer.weight is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_merge_matches_forward_and_unmerge_restores_bits(dtype):
    gen = torch.Generator().manual_seed(5)
    layer = lora.MergedLinear(24, 36, r=4, lora_alpha=8, enable_lora=[True, False, True],
                              lora_dtype=torch.float32, use_dora=True).to(dtype)
    layer.lora_A.data, layer.lora_B.data, layer.lora_magnitude.data = (
        p.data.float() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
    _randomize(layer, gen)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 24, generator=gen).to(dtype)
    out = layer(x)
    layer.merge()
    merged = layer(x)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(merged, out, **tol)
    assert torch.equal(layer.weight[12:24], w0[12:24])  # the unadapted slice merges to itself
    for _ in range(3):
        layer.unmerge()
        assert torch.equal(layer.weight, w0)
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_merge_and_unload_keeps_the_dora_function():
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
    lora.inject_lora(model, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                            use_dora=True))
    for layer in lora.lora_modules(model).values():
        _randomize(layer, gen)
    x = torch.randn(5, 10, generator=gen)
    out = model(x)
    plain = lora.merge_and_unload(model)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=1e-5)


def test_magnitude_is_an_adapter_parameter():
    model = nn.Sequential(nn.Linear(6, 6))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    lora.mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "0.lora_magnitude"}
    assert set(lora.lora_state_dict(model)) == trainable


def test_a_changed_base_is_seen_by_the_norm():
    gen = torch.Generator().manual_seed(7)
    layer = lora.Linear(8, 6, r=2, lora_alpha=4, use_dora=True)
    _randomize(layer, gen)
    x = torch.randn(2, 8, generator=gen)
    layer(x)  # fills the cached ||W||^2
    with torch.no_grad():
        layer.weight.mul_(2.0)
    ref = _dense_dora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, 2.0)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: lora.MultiheadAttention(8, 2, r=2, use_dora=True),
     "use_dora=True is not supported by MultiheadAttention"),
    (lambda: lora.Conv2d(3, 4, 3, r=2, use_dora=True),  # loralib's layout: PEFT's has DoRA
     "use_dora=True on Conv2d needs lora_layout='peft'"),
    (lambda: lora.Linear(4, 4, r=2, use_dora=True, lora_bias=True),
     "lora_bias=True cannot be combined with use_dora=True"),
])
def test_dora_on_an_unsupported_layer_is_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_use_dora_values_are_refused():
    with pytest.raises(ValueError, match="use_dora must be True or False, got 'yes'"):
        lora.Linear(4, 4, r=2, use_dora="yes")
    with pytest.raises(ValueError, match="LoraConfig.use_dora must be a bool, got 1"):
        lora.LoraConfig(use_dora=1)


def test_injecting_dora_into_attention_leaves_the_model_unchanged():
    model = nn.Sequential(nn.MultiheadAttention(6, 2), nn.Linear(6, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="use_dora=True is not supported by MultiheadAttention"):
        lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    assert type(model[0]) is nn.MultiheadAttention and type(model[1]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
