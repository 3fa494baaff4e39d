"""PEFT's ``lora_bias``: a trained bias on ``B``, on Linear, MergedLinear (adapted rows only), NF4
bases and convolutions, against dense references written out here:
``x @ (W + s B A).T + b + s * b_B``, and against HF PEFT 0.21's layers holding the same tensors."""

import copy
import math
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora
from lora_phi3.inject.factory import check_lora_target
from lora_phi3.layers.named import activate
from lora_phi3.quant import Linear4bit, nf4_quantize


def _randomize(layer, gen, scale=0.3):
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_bias):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_lora_bias_forward_and_grads_match_dense_reference(bias, dropout, fan_in_fan_out):
    gen = torch.Generator().manual_seed(0)
    layer = lora.Linear(10, 6, r=3, lora_alpha=6, bias=bias, lora_dropout=dropout,
                        fan_in_fan_out=fan_in_fan_out, lora_bias=True, merge_weights=False)
    assert layer.lora_bias.shape == (6,) and not layer.lora_bias.any()  # init True: 0
    _randomize(layer, gen)
    layer.eval()  # dropout off, so the reference needs no mask
    x = torch.randn(4, 10, generator=gen, requires_grad=True)
    out = layer(x)
    dy = torch.randn(out.shape, generator=gen)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_bias]
    grads = torch.autograd.grad(out, params, dy)
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    xr, Ar, Br, br = refs
    W = layer.weight.T if fan_in_fan_out else layer.weight
    ref = xr @ (W + 2.0 * Br @ Ar).T + 2.0 * br
    ref = ref + layer.bias if bias else ref
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, torch.autograd.grad(ref, refs, dy)):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def test_training_with_dropout_gives_lora_bias_its_full_gradient():
    """Dropout acts on the adapter's input; the bias term is x-independent: d out / d b_B = s."""
    gen = torch.Generator().manual_seed(1)
    layer = lora.Linear(8, 5, r=2, lora_alpha=2, lora_dropout=0.5, lora_bias=True)
    _randomize(layer, gen)
    out = layer(torch.randn(3, 8, generator=gen))
    (grad,) = torch.autograd.grad(out.sum(), [layer.lora_bias])
    torch.testing.assert_close(grad, torch.full((5,), 3.0))  # 3 rows, scaling 1


def test_merged_linear_lora_bias_covers_only_the_adapted_rows():
    gen = torch.Generator().manual_seed(2)
    layer = lora.MergedLinear(12, 16, r=2, lora_alpha=4, enable_lora=[True, False, True],
                              split_sizes=[8, 4, 4], lora_bias=True)
    assert layer.lora_bias.shape == (12,) == (layer.lora_B.shape[0],)
    _randomize(layer, gen)
    x = torch.randn(2, 3, 12, generator=gen)
    out = layer(x)
    W, b, A, B, bb = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_bias
    assert torch.equal(out[..., 8:12], F.linear(x, W, b)[..., 8:12])  # k rows: bit for bit
    for rows, a, b_i, bias_i in [(slice(0, 8), A[:2], B[:8], bb[:8]),
                                 (slice(12, 16), A[2:], B[8:], bb[8:])]:
        ref = x @ (W[rows] + 2.0 * b_i @ a).T + b[rows] + 2.0 * bias_i
        torch.testing.assert_close(out[..., rows], ref, atol=1e-5, rtol=1e-5)
    W0, b0 = W.detach().clone(), b.detach().clone()
    layer.eval()  # merges
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.bias[8:12], b0[8:12])
    layer.train()
    assert torch.equal(layer.weight, W0) and torch.equal(layer.bias, b0)


def test_nf4_base_with_lora_bias_matches_the_dequantized_reference():
    gen = torch.Generator().manual_seed(3)
    q = nf4_quantize(torch.randn(16, 64, generator=gen), block_size=64)
    bias = nn.Parameter(torch.randn(16, generator=gen), requires_grad=False)
    layer = Linear4bit.with_base(Linear4bit.from_nf4(q, bias).quantized_weight, bias, r=2,
                                 lora_alpha=4, lora_bias=True)
    _randomize(layer, gen)
    x = torch.randn(3, 64, generator=gen)
    ref = x @ (q.dequantize() + 2.0 * layer.lora_B @ layer.lora_A).T + bias + 2.0 * layer.lora_bias
    torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-5)


def test_bf16_base_with_fp32_lora_bias():
    gen = torch.Generator().manual_seed(4)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = lora.Linear.from_linear(base, r=2, lora_alpha=4, lora_dtype=torch.float32,
                                    lora_bias=True, merge_weights=False)
    assert layer.lora_bias.dtype == torch.float32
    _randomize(layer, gen)
    x = torch.randn(3, 16, generator=gen).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = x.float() @ (base.weight.float() + 2.0 * layer.lora_B @ layer.lora_A).T \
        + base.bias.float() + 2.0 * layer.lora_bias
    torch.testing.assert_close(out.float(), ref.detach(), atol=5e-2, rtol=2e-2)
    out.float().sum().backward()
    assert layer.lora_bias.grad is not None and layer.lora_bias.grad.dtype == torch.float32


# -- convolutions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["peft", "loralib"])
@pytest.mark.parametrize("conv_cls,ours_cls,fn,shape", [
    (nn.Conv1d, lora.Conv1d, F.conv1d, (2, 4, 9)),
    (nn.Conv2d, lora.Conv2d, F.conv2d, (2, 4, 6, 5)),
    (nn.Conv3d, lora.Conv3d, F.conv3d, (1, 4, 5, 4, 5)),
])
def test_conv_lora_bias_matches_dense_reference(conv_cls, ours_cls, fn, shape, layout):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    conv = conv_cls(4, 6, 3, padding=1)
    layer = ours_cls.from_conv(conv, r=2, lora_alpha=4, lora_layout=layout, lora_bias=True)
    assert layer.lora_bias.shape == (6,)
    _randomize(layer, gen)
    x = torch.randn(*shape, generator=gen)
    out = layer(x)
    ref = fn(x, conv.weight + layer.delta_weight(), conv.bias + 2.0 * layer.lora_bias, padding=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), [layer.lora_bias])
    torch.testing.assert_close(grad, torch.full((6,), 2.0 * out[:, 0].numel()))
    W0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    layer.eval()
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
    layer.train()
    assert torch.equal(conv.weight, W0) and torch.equal(conv.bias, b0)


# -- against PEFT ----------------------------------------------------------------------------------
class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("module, shape", [(nn.Linear(10, 7), (3, 10)),
                                           (nn.Conv2d(3, 5, 3), (2, 3, 6, 6))])
def test_lora_bias_matches_peft_forward_merge_and_init(module, shape):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(Wrap(copy.deepcopy(module)), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["inner"], lora_bias=True, init_lora_weights=False))
    theirs = peft_model.base_model.model.inner
    if isinstance(module, nn.Linear):
        ours = lora.Linear.from_linear(module, r=4, lora_alpha=8, lora_bias=True)
    else:
        ours = lora.Conv2d.from_conv(module, r=4, lora_alpha=8, lora_layout="peft", lora_bias=True)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
        ours.lora_bias.copy_(theirs.lora_B["default"].bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        theirs.merge()
        ours.merge()
    torch.testing.assert_close(ours.bias, theirs.get_base_layer().bias, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.weight, theirs.get_base_layer().weight, atol=1e-6, rtol=1e-6)
    # init_lora_weights=False: the bias as nn.Linear(r, out) / PEFT's B conv leaves it, +-1/sqrt(fan_in)
    fresh = lora.Linear(10, 7, r=4, lora_bias=True, init_lora_weights=False)
    assert fresh.lora_bias.abs().max() <= 1 / math.sqrt(4) and fresh.lora_bias.any()


# -- merge refusals, adapter state, refusals -------------------------------------------------------
def test_a_bias_less_layer_runs_its_lora_bias_but_refuses_to_merge():
    gen = torch.Generator().manual_seed(6)
    with pytest.raises(ValueError, match=r"lora_bias=True on a Linear without a bias cannot merge .* "
                                         r"pass merge_weights=False"):
        lora.Linear(6, 4, r=2, bias=False, lora_bias=True)
    layer = lora.Linear(6, 4, r=2, bias=False, lora_bias=True, merge_weights=False)
    _randomize(layer, gen)
    x = torch.randn(2, 6, generator=gen)
    torch.testing.assert_close(layer(x), x @ (layer.weight + 0.5 * layer.lora_B @ layer.lora_A).T
                               + 0.5 * layer.lora_bias, atol=1e-6, rtol=1e-6)
    W0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="Linear has lora_bias but no bias to merge it into"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, W0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4, bias=False))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["0", "1"], lora_bias=True,
                                            init_lora_weights=False))
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no bias to merge it into"):
        lora.merge_lora(model)  # the first layer merged, then rolled back
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert not any(m.merged for m in lora.lora_modules(model).values())


def test_safe_merge_refuses_a_non_finite_bias():
    layer = lora.Linear(4, 3, r=2, lora_bias=True)
    with torch.no_grad():
        layer.lora_bias.fill_(float("inf"))
    b0 = layer.bias.detach().clone()
    with pytest.raises(ValueError, match="safe_merge refused Linear: the merged bias"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.bias, b0)


def test_lora_bias_is_an_adapter_parameter_and_moves_with_its_adapter():
    model = nn.Sequential(nn.Linear(6, 6))
    lora.inject_lora(model, lora.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "0.lora_bias"}
    assert set(lora.lora_state_dict(model)) == trainable
    assert "lora_bias=True" in repr(model[0])
    layer, own = model[0], model[0].lora_bias
    activate(layer, None)  # stored: the layer computes its base function
    assert "lora_bias" not in layer._parameters and layer.lora_adapters["default"].lora_bias is own
    activate(layer, "default")
    assert layer.lora_bias is own


@pytest.mark.parametrize("make, message", [
    (lambda: lora.Embedding(10, 4, r=2, lora_bias=True),
     "lora_bias=True is not supported by Embedding"),
    (lambda: lora.Linear(4, 4, r=2, lora_bias=True, use_dora=True),
     "lora_bias=True cannot be combined with use_dora=True"),
    (lambda: lora.Linear(4, 4, r=2, lora_bias=True, init_lora_weights="gaussian"),
     r"lora_bias=True needs init_lora_weights True or False \(PEFT's rule\), got 'gaussian'"),
    (lambda: lora.Linear(4, 4, r=2, lora_bias=1), "lora_bias must be True or False, got 1"),
    (lambda: lora.LoraConfig(lora_bias="yes"), "LoraConfig.lora_bias must be a bool, got 'yes'"),
    (lambda: lora.LoraConfig(lora_bias=True, use_dora=True),
     "LoraConfig.lora_bias=True cannot be combined with use_dora=True"),
    (lambda: lora.LoraConfig(lora_bias=True, init_lora_weights="pissa"),
     r"LoraConfig.lora_bias=True needs init_lora_weights True or False .* got 'pissa'"),
])
def test_refusals_name_the_field_and_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_plain_config_files_keep_their_bytes():
    assert "lora_bias" not in lora.LoraConfig(r=2).to_file_dict()
    assert lora.LoraConfig(r=2, lora_bias=True).to_file_dict()["lora_bias"] is True


@pytest.mark.parametrize("module, message", [
    (nn.Embedding(10, 4), "emb: lora_bias=True is not supported by Embedding"),
    (nn.MultiheadAttention(8, 2), "emb: lora_bias=True is not supported by MultiheadAttention"),
])
def test_injection_refuses_lora_bias_on_embeddings_and_attention(module, message):
    config = lora.LoraConfig(r=2, target_modules=["emb"], lora_bias=True)
    with pytest.raises(ValueError, match=message):
        check_lora_target(module, "emb", config)
    model = nn.ModuleDict({"emb": module})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message.removeprefix("emb: ")):
        lora.inject_lora(model, config)
    assert type(model["emb"]) is type(module)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    check_lora_target(nn.Linear(4, 4), "lin", config)  # linear layers take it
