"""The merge protocol and state handling every LoRA layer shares (LoRALayer), on every layer kind."""

import math
import re

import pytest
import torch
import torch.nn as nn

import lora_phi3 as lora
from tiny import randomize_lora


# ---------------------------------------------------------------- merge protocol
def _all_layers():
    torch.manual_seed(0)
    return [
        (lora.Linear(12, 9, r=3, lora_alpha=5), torch.randn(4, 12)),
        (lora.Linear(12, 9, r=3, lora_alpha=5, fan_in_fan_out=True), torch.randn(4, 12)),
        (lora.MergedLinear(12, 9, r=2, lora_alpha=3, enable_lora=[True, False, True]),
         torch.randn(4, 12)),
        (lora.MergedLinear(12, 10, r=2, lora_alpha=3, enable_lora=[True, True, False],
                           split_sizes=[6, 2, 2], fan_in_fan_out=True), torch.randn(4, 12)),
        (lora.Embedding(20, 8, r=3, lora_alpha=6), torch.randint(0, 20, (4, 5))),
        (lora.Conv1d(4, 6, 3, r=2, lora_alpha=4, padding=1), torch.randn(2, 4, 9)),
        (lora.Conv2d(4, 6, (3, 2), r=2, lora_alpha=4, stride=2, groups=2), torch.randn(2, 4, 8, 8)),
        (lora.Conv3d(2, 4, 3, r=2, lora_alpha=4, padding=1), torch.randn(1, 2, 5, 5, 5)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_merged_equals_unmerged_equals_unmerged_again(index):
    layer, x = _all_layers()[index]
    randomize_lora(layer, 1, scale=0.5)
    w0 = layer.weight.detach().clone()
    layer.train()
    unmerged = layer(x)
    assert not torch.allclose(unmerged, _base_output(layer, x), atol=1e-3)  # B really acts
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.train()
    assert not layer.merged
    assert torch.equal(layer.weight, w0)  # restored bit for bit
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def _base_output(layer, x):
    with torch.no_grad():
        layer.lora_disabled = True
        out = layer(x)
        layer.lora_disabled = False
    return out


def test_merge_and_unmerge_are_idempotent():
    layer = lora.Linear(6, 6, r=2, lora_alpha=2, merge_weights=False)
    randomize_lora(layer, 1, scale=0.5)
    w0 = layer.weight.detach().clone()
    layer.eval()
    assert not layer.merged  # merge_weights=False: eval() leaves weights alone
    layer.merge()
    w1 = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, w1)
    layer.unmerge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    layer = lora.Linear(4, 4, r=2)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="safe_merge refused Linear"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, w0) and not layer.merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fifty_eval_train_cycles_do_not_drift(dtype):
    torch.manual_seed(0)
    layer = lora.MergedLinear(64, 96, r=8, lora_alpha=16, enable_lora=[True, False, True], dtype=dtype)
    randomize_lora(layer, 1, scale=0.5)
    w0 = layer.weight.detach().clone()
    for _ in range(50):
        layer.eval()
        layer.train()
    # At most one ulp apart, as the brief asks; the kept-aside values in fact make it exact.
    one_ulp = (torch.nextafter(w0.abs(), torch.full_like(w0, float("inf"))) - w0.abs()).float()
    assert ((layer.weight.float() - w0.float()).abs() <= one_ulp).all()
    assert torch.equal(layer.weight, w0)


# ---------------------------------------------------------------- state dict & training
def test_pretrained_state_dict_loads_with_only_lora_keys_missing():
    model = nn.Sequential(nn.Linear(5, 5), nn.Embedding(7, 5))
    ours = nn.Sequential(lora.Linear(5, 5, r=2), lora.Embedding(7, 5, r=2))
    result = ours.load_state_dict(model.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"]
    assert result.unexpected_keys == []
    assert torch.equal(ours[0].weight, model[0].weight)


def test_optimizer_step_changes_only_lora_params():
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(6, 6, r=2), nn.ReLU(), nn.Linear(6, 3),
                          lora.MergedLinear(3, 6, r=2, enable_lora=[True, False]))
    lora.mark_only_lora_as_trainable(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    opt.zero_grad()
    model(torch.randn(4, 6)).sum().backward()  # second step: A moves once B is non-zero
    opt.step()
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == ("lora_" in key), key


def test_loading_lora_state_while_merged_merges_the_new_delta():
    torch.manual_seed(0)
    src = lora.Linear(6, 4, r=2, lora_alpha=2)
    randomize_lora(src, 3, scale=0.5)
    dst = lora.Linear(6, 4, r=2, lora_alpha=2)
    dst.load_state_dict({"weight": src.weight, "bias": src.bias}, strict=False)
    dst.eval()  # merged with its own (zero) B
    dst.load_state_dict(lora.lora_state_dict(src), strict=False)
    x = torch.randn(3, 6)
    src.eval()
    torch.testing.assert_close(dst(x), src(x))
    dst.train()
    torch.testing.assert_close(dst.weight, src.weight.detach() - src.delta_weight(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,message", [
    (dict(r=-1), r"r must be an int >= 0 \(0 means no adapter\), got -1"),
    (dict(r=2.5), r"r must be an int >= 0 .* got 2.5"),
    (dict(r=2, lora_dropout=1.0), r"lora_dropout must be a float in \[0, 1\), got 1.0"),
    (dict(r=2, lora_dropout=-0.1), r"lora_dropout must be a float in \[0, 1\), got -0.1"),
    (dict(r=2, lora_alpha=0), r"lora_alpha must be a number > 0, got 0"),
])
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.Linear(4, 4, **kwargs)


# -- rsLoRA: the scaling is the one thing that changes ---------------------------------------------
@pytest.mark.parametrize("make", [
    lambda **kw: lora.Linear(12, 10, r=4, lora_alpha=8, **kw),
    lambda **kw: lora.MergedLinear(12, 12, r=4, lora_alpha=8, enable_lora=[True, False, True], **kw),
    lambda **kw: lora.Embedding(20, 12, r=4, lora_alpha=8, **kw),
    lambda **kw: lora.Conv2d(3, 6, 3, r=4, lora_alpha=8, **kw),
])
def test_rslora_scales_by_alpha_over_sqrt_r(make):
    plain, rs = make(), make(use_rslora=True)
    assert plain.scaling == 8 / 4 and not plain.use_rslora
    assert rs.scaling == 8 / math.sqrt(4) and rs.use_rslora


def test_rslora_linear_forward_and_merge_against_a_dense_reference():
    torch.manual_seed(0)
    layer = lora.Linear(12, 10, r=4, lora_alpha=8, use_rslora=True)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)
    W, A, B, b = layer.weight, layer.lora_A, layer.lora_B, layer.bias
    expected = x @ (W + 8 / math.sqrt(4) * B @ A).T + b  # rsLoRA: alpha / sqrt(r)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.eval()  # merges
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_use_rslora_must_be_a_bool():
    with pytest.raises(ValueError, match="use_rslora must be True or False, got 'yes'"):
        lora.Linear(4, 4, r=2, use_rslora="yes")


# -- init_lora_weights: PEFT's True / "gaussian" / False ------------------------------------------
LINEAR_KINDS = [
    lambda **kw: lora.Linear(256, 64, r=8, **kw),
    lambda **kw: lora.MergedLinear(256, 96, r=8, enable_lora=[True, False, True], **kw),
    lambda **kw: lora.Conv2d(16, 32, 3, r=8, **kw),
]


@pytest.mark.parametrize("make", LINEAR_KINDS)
def test_init_lora_weights_gaussian_and_false(make):
    torch.manual_seed(0)
    default, gauss, off = make(), make(init_lora_weights="gaussian"), make(init_lora_weights=False)
    assert torch.count_nonzero(default.lora_B) == 0 and torch.count_nonzero(gauss.lora_B) == 0
    bound = 1 / math.sqrt(default.lora_A.shape[1])  # kaiming-uniform(a=sqrt(5)) on (r, fan_in)
    assert default.lora_A.abs().max() <= bound
    assert abs(gauss.lora_A.std().item() - 1 / 8) < 0.01  # N(0, 1/r^2), r = 8
    assert gauss.lora_A.abs().max() > bound  # not the kaiming draw
    assert torch.count_nonzero(off.lora_B) == off.lora_B.numel()  # the adapter is live at once
    assert off.delta_weight().abs().max() > 0 and default.delta_weight().abs().max() == 0


def test_init_lora_weights_on_an_embedding_follows_peft():
    torch.manual_seed(0)
    for init in (True, "gaussian"):  # A = 0, B normal: the delta starts at zero
        e = lora.Embedding(50, 16, r=4, init_lora_weights=init)
        assert torch.count_nonzero(e.lora_A) == 0 and torch.count_nonzero(e.lora_B) > 0
    off = lora.Embedding(50, 16, r=4, init_lora_weights=False)
    assert off.delta_weight().abs().max() > 0


@pytest.mark.parametrize("bad", ["loftq", "eva", "pissa_niter_0", "Gaussian", 1, None])
def test_unknown_init_lora_weights_is_named(bad):
    with pytest.raises(ValueError, match=r"init_lora_weights must be one of True, False, "
                                         r"'gaussian', 'pissa', 'pissa_niter_K' \(K a positive "
                                         r"int\) or 'olora', got " + re.escape(repr(bad))):
        lora.Linear(4, 4, r=2, init_lora_weights=bad)
    with pytest.raises(ValueError, match=r"LoraConfig.init_lora_weights must be one of"):
        lora.LoraConfig(init_lora_weights=bad)
