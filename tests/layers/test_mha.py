"""MultiheadAttention LoRA against a dense reference (torch's attention with ``W + s * B @ A`` on the
in-projection and on out_proj), against HF PEFT's layer with the same tensors, and through the
injector (merge, disable, merge_and_unload)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora
from lora_phi3.config import LoraConfig
from lora_phi3.inject.injector import (disable_lora, inject_lora, lora_modules, merge_and_unload,
                                       merge_lora, unmerge_lora)
from lora_phi3.layers import MultiheadAttention
from tiny import randomize_lora

E, H, R, ALPHA = 8, 2, 4, 6


def adapted(seed: int = 0, **kwargs) -> MultiheadAttention:
    torch.manual_seed(seed)
    layer = MultiheadAttention(E, H, r=R, lora_alpha=ALPHA, merge_weights=False, **kwargs)
    return randomize_lora(layer, seed=seed + 1, scale=0.2)


def dense(layer: MultiheadAttention, query, key, value, **kwargs):
    """Torch's attention over ``W + s * B @ A`` for both projections, written out."""
    s = ALPHA / R
    w_in = layer.in_proj_weight + s * layer.lora_B @ layer.lora_A
    out = layer.out_proj
    w_out = out.weight + s * out.lora_B @ out.lora_A
    if layer.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    result, weights = F.multi_head_attention_forward(
        query, key, value, E, H, w_in, layer.in_proj_bias, layer.bias_k, layer.bias_v,
        layer.add_zero_attn, 0.0, w_out, out.bias, training=False, **kwargs)
    return (result.transpose(0, 1) if layer.batch_first else result), weights


@pytest.mark.parametrize("batch_first", [False, True])
def test_matches_dense_reference_self_and_cross_attention(batch_first):
    layer = adapted(batch_first=batch_first).eval()
    assert layer.lora_A.shape == (R, E) and layer.lora_B.shape == (3 * E, R)  # PEFT's shapes
    assert layer.out_proj.lora_A.shape == (R, E) and layer.out_proj.lora_B.shape == (E, R)
    g = torch.Generator().manual_seed(3)
    x, kv = torch.randn(3, 5, E, generator=g), torch.randn(3, 7, E, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.8 if batch_first else None
    with torch.no_grad():
        for q, k, v, kw in [(x, x, x, {}), (x, kv, kv, {"key_padding_mask": mask})]:
            if not batch_first:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
                kw = {}
            got, got_w = layer(q, k, v, **kw)
            want, want_w = dense(layer, q, k, v, **kw)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)


def test_unbatched_input_and_attention_mask():
    layer = adapted().eval()
    x = torch.randn(6, E)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, x, x, attn_mask=causal)[0],
                                   dense(layer, x, x, x, attn_mask=causal)[0], atol=1e-5, rtol=1e-5)


def test_from_mha_shares_parameters_and_r0_is_the_plain_module():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(E, H, add_bias_kv=True, batch_first=True)
    layer = MultiheadAttention.from_mha(base, r=R, lora_alpha=ALPHA)
    assert layer.in_proj_weight is base.in_proj_weight and layer.bias_k is base.bias_k
    assert layer.out_proj.weight is base.out_proj.weight and isinstance(layer.out_proj, lora.Linear)
    assert not layer.in_proj_weight.requires_grad and not layer.out_proj.weight.requires_grad
    plain = MultiheadAttention.from_mha(copy.deepcopy(base), r=0)
    assert isinstance(plain.out_proj, nn.Linear) and not isinstance(plain.out_proj, lora.LoRALayer)
    x = torch.randn(2, 4, E)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, x, x)[0], base(x, x, x)[0])
        torch.testing.assert_close(layer(x, x, x)[0], base(x, x, x)[0])  # B starts at zero


def test_merge_is_idempotent_unmerge_restores_bits_and_outputs_agree():
    layer = adapted().eval()
    w_in, w_out = layer.in_proj_weight.clone(), layer.out_proj.weight.clone()
    x = torch.randn(5, 2, E)
    with torch.no_grad():
        want = layer(x, x, x)[0]
        layer.merge()
        layer.merge()
        assert layer.merged and layer.out_proj.merged
        torch.testing.assert_close(layer.in_proj_weight, w_in + layer.delta_weight(), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x, x, x)[0], want, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    assert torch.equal(layer.in_proj_weight, w_in) and torch.equal(layer.out_proj.weight, w_out)


def test_safe_merge_refuses_a_non_finite_out_proj_and_changes_nothing():
    layer = adapted()
    with torch.no_grad():
        layer.out_proj.lora_B[0, 0] = float("inf")
    w_in = layer.in_proj_weight.clone()
    with pytest.raises(ValueError, match="merged out_proj weight would contain NaN or Inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.in_proj_weight, w_in)


def test_gradients_reach_both_adapters_only():
    layer = adapted().train()
    x = torch.randn(5, 2, E)
    layer(x, x, x)[0].square().sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.out_proj.lora_A, layer.out_proj.lora_B):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.in_proj_weight.grad is None and layer.out_proj.weight.grad is None


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="needs kdim == vdim == embed_dim"):
        MultiheadAttention.from_mha(nn.MultiheadAttention(E, H, kdim=5, vdim=5), r=2)
    with pytest.raises(ValueError, match="use_dora=True is not supported by MultiheadAttention"):
        MultiheadAttention(E, H, r=2, use_dora=True)
    with pytest.raises(TypeError, match="needs an nn.MultiheadAttention, got Linear"):
        MultiheadAttention.from_mha(nn.Linear(2, 2), r=2)


# -- through the injector ---------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_injected_four_way_and_merge_and_unload_gives_back_the_torch_module():
    torch.manual_seed(0)
    base = Net().eval()
    model = inject_lora(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA,
                                                        target_modules=["attn", "head"]))
    assert sorted(lora_modules(model)) == ["attn", "attn.out_proj", "head"]
    assert isinstance(model.attn, MultiheadAttention)
    randomize_lora(model, seed=2)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        adapted_out = model(x)
        assert (adapted_out - base(x)).abs().max() > 1e-3
        with disable_lora(model):
            torch.testing.assert_close(model(x), base(x))
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted_out, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())
        plain = merge_and_unload(model)
    assert type(plain.attn) is nn.MultiheadAttention
    assert type(plain.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(plain.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted_out, atol=1e-5, rtol=1e-5)


def test_targeting_out_proj_alone_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"target the attention module itself \('attn'\)"):
        inject_lora(Net(), LoraConfig(target_modules=["out_proj"]))


def test_hand_built_layer_unloads_to_the_torch_module():
    layer = adapted()
    model = nn.Sequential(layer)
    x = torch.randn(5, 2, E)
    with torch.no_grad():
        want = layer(x, x, x)[0]
        plain = merge_and_unload(model)[0]
        assert type(plain) is nn.MultiheadAttention and not isinstance(plain.out_proj, lora.LoRALayer)
        torch.testing.assert_close(plain(x, x, x)[0], want, atol=1e-5, rtol=1e-5)


# -- against HF PEFT's layer ------------------------------------------------------------------
peft = pytest.importorskip("peft")


def test_same_tensors_as_peft_give_peft_s_in_projection():
    """PEFT's lora.MultiheadAttention holding our tensors. PEFT <= 0.21 adds the out_proj update
    twice (huggingface/peft#3774), so with out_proj's B at zero the two must agree exactly, and
    with it non-zero PEFT equals our layer with that B doubled, or ours once PEFT is fixed."""
    torch.manual_seed(0)
    net = Net().eval()
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["attn"], init_lora_weights=False)).eval()
    ours = inject_lora(copy.deepcopy(net), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["attn"]))
    t = theirs.base_model.model.attn
    with torch.no_grad():
        for mine, their in ((ours.attn, t), (ours.attn.out_proj, t.base_layer.out_proj)):
            mine.lora_A.copy_(their.lora_A["default"].weight)
            mine.lora_B.copy_(their.lora_B["default"].weight)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        their_out, our_out = theirs(x), ours(x)
        doubled = copy.deepcopy(ours)
        doubled.attn.out_proj.lora_B.mul_(2)
        fixed = torch.allclose(their_out, our_out, atol=1e-5)
        torch.testing.assert_close(their_out, our_out if fixed else doubled(x), atol=1e-5, rtol=0)
        t.base_layer.out_proj.lora_B["default"].weight.zero_()
        ours.attn.out_proj.lora_B.zero_()
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)
