"""Conv1d/2d/3d with ``lora_layout="peft"`` against HF PEFT's own LoRA conv layers and a dense reference.

PEFT's ``A`` is a conv ``in -> r`` with the layer's kernel, stride and padding; its ``B`` a grouped
1x1 conv ``r -> out``. Its tensors are copied into ours unchanged, so every comparison also checks
that the shapes are PEFT's.
"""

import copy
import math
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora

OURS = {nn.Conv1d: lora.Conv1d, nn.Conv2d: lora.Conv2d, nn.Conv3d: lora.Conv3d}
R, ALPHA = 4, 8


class Wrap(nn.Module):
    """The smallest model PEFT can adapt: one conv named ``conv``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def peft_layer(conv: nn.Module, **config) -> nn.Module:
    """PEFT's LoRA layer over a copy of ``conv``, with ``init_lora_weights=False`` so B is non-zero."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that groups > 1 cannot merge
        model = peft.get_peft_model(Wrap(copy.deepcopy(conv)), peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=["conv"], init_lora_weights=False, **config))
    return model.base_model.model.conv


def ours_with_peft_weights(conv: nn.Module, theirs: nn.Module, **kwargs) -> lora.LoRALayer:
    """Our layer over ``conv`` holding PEFT's ``lora_A``/``lora_B`` tensors, copied in unchanged."""
    ours = OURS[type(conv)].from_conv(conv, r=R, lora_alpha=ALPHA, lora_layout="peft", **kwargs)
    A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    assert ours.lora_A.shape == A.shape and ours.lora_B.shape == B.shape  # copy_ would broadcast
    with torch.no_grad():
        ours.lora_A.copy_(A)
        ours.lora_B.copy_(B)
    return ours


# Kernel > 1, stride 2, padding 1, and grouped variants (PEFT needs r % groups == 0).
PEFT_CASES = [
    (nn.Conv1d, dict(kernel_size=3, stride=2, padding=1), (2, 4, 11)),
    (nn.Conv2d, dict(kernel_size=(3, 2), stride=2, padding=1), (2, 4, 9, 8)),
    (nn.Conv3d, dict(kernel_size=3, stride=2, padding=1), (1, 4, 6, 7, 5)),
    (nn.Conv2d, dict(kernel_size=1), (2, 4, 5, 5)),  # PEFT's 1x1 shortcut in get_delta_weight
    (nn.Conv1d, dict(kernel_size=3, stride=2, padding=1, groups=2), (2, 4, 11)),
    (nn.Conv2d, dict(kernel_size=3, stride=2, padding=1, groups=4), (2, 4, 9, 8)),
    (nn.Conv3d, dict(kernel_size=(3, 1, 2), stride=2, padding=1, groups=2), (1, 4, 6, 7, 5)),
]


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("conv_cls,kwargs,shape", PEFT_CASES)
def test_peft_layout_matches_peft(conv_cls, kwargs, shape, use_rslora):
    torch.manual_seed(0)
    conv = conv_cls(4, 8, **kwargs)
    theirs = peft_layer(conv, use_rslora=use_rslora)
    grouped = conv.groups > 1
    ours = ours_with_peft_weights(conv, theirs, use_rslora=use_rslora, merge_weights=not grouped)
    assert ours.scaling == theirs.scaling["default"] == ALPHA / (math.sqrt(R) if use_rslora else R)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, conv(x), atol=1e-3)  # the adapter is not a no-op
        if not grouped:  # PEFT refuses to form the delta of a grouped conv; see test below
            torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"),
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("conv_cls,kwargs,shape", [
    (nn.Conv1d, dict(kernel_size=3, dilation=2, padding="same"), (2, 4, 11)),
    (nn.Conv2d, dict(kernel_size=3, dilation=2, padding=2, stride=2), (2, 4, 9, 8)),
    (nn.Conv3d, dict(kernel_size=3, dilation=(1, 2, 1), padding=1), (1, 4, 5, 7, 5)),
    (nn.Conv1d, dict(kernel_size=3, stride=2, padding=1, padding_mode="replicate"), (2, 4, 11)),
    (nn.Conv2d, dict(kernel_size=3, padding=1, padding_mode="reflect"), (2, 4, 9, 8)),
    (nn.Conv3d, dict(kernel_size=3, padding=1, padding_mode="circular"), (1, 4, 5, 6, 5)),
])
def test_dilation_and_padding_mode_follow_peft_merged(conv_cls, kwargs, shape):
    """PEFT's A drops dilation and always zero-pads, so its unmerged forward crashes or disagrees
    with its own merge; ours applies A with the layer's settings and equals PEFT merged."""
    torch.manual_seed(0)
    conv = conv_cls(4, 8, **kwargs)
    theirs = peft_layer(conv)
    ours = ours_with_peft_weights(conv, theirs)
    x = torch.randn(*shape)
    with torch.no_grad():
        theirs.merge()
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        ours.merge()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_conv3d_kernel_1_1_k_merges_where_peft_cannot():
    """PEFT's 1x1 shortcut looks only at kernel dims 2:4, so a (1, 1, k) Conv3d crashes its merge."""
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 8, (1, 1, 3), padding=(0, 0, 1))
    theirs = peft_layer(conv)
    ours = ours_with_peft_weights(conv, theirs)
    x = torch.randn(1, 4, 3, 4, 5)
    with torch.no_grad():
        expected = theirs(x)
        with pytest.raises(RuntimeError):
            theirs.get_delta_weight("default")
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        ours.merge()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("conv_cls,kwargs,shape", [
    (nn.Conv1d, dict(kernel_size=3, stride=2, padding=1, dilation=2), (2, 4, 11)),
    (nn.Conv2d, dict(kernel_size=(3, 2), stride=2, padding=1, padding_mode="reflect"), (2, 4, 9, 8)),
    (nn.Conv3d, dict(kernel_size=3, stride=2, padding=1), (1, 4, 6, 7, 5)),
])
def test_merge_equals_unmerged_and_unmerge_restores_bits(conv_cls, kwargs, shape, dtype, tol):
    torch.manual_seed(0)
    conv = conv_cls(4, 8, **kwargs).to(dtype)
    layer = OURS[conv_cls].from_conv(conv, r=R, lora_alpha=ALPHA, lora_layout="peft",
                                     lora_dtype=torch.float32, init_lora_weights=False)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    W0 = layer.weight.detach().clone()
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        unmerged = layer(x)
        assert unmerged.dtype == dtype
        layer.eval()  # merge_weights=True: eval() merges
        assert layer.merged and not torch.equal(layer.weight, W0)
        merged_W = layer.weight.clone()
        layer.merge()  # idempotent
        assert torch.equal(layer.weight, merged_W)
        torch.testing.assert_close(layer(x), unmerged, atol=tol, rtol=tol)
        layer.train()
        assert not layer.merged and torch.equal(layer.weight, W0)
        assert torch.equal(layer(x), unmerged)


# ---------------------------------------------------------------- dense reference
@pytest.mark.parametrize("use_rslora,scaling", [(False, 6 / 3), (True, 6 / math.sqrt(3))])
def test_conv2d_peft_layout_matches_dense_reference(use_rslora, scaling):
    torch.manual_seed(0)
    geometry = dict(stride=2, padding=(1, 2), dilation=(2, 1))
    layer = lora.Conv2d(4, 6, (3, 2), r=3, lora_alpha=6, lora_layout="peft", use_rslora=use_rslora,
                        init_lora_weights=False, **geometry)
    A, B = layer.lora_A, layer.lora_B
    assert A.shape == (3, 4, 3, 2) and B.shape == (6, 3, 1, 1)
    delta = torch.einsum("oj,jihw->oihw", B[:, :, 0, 0], A)  # B is 1x1: a matrix over the rank
    x = torch.randn(2, 4, 9, 8)
    with torch.no_grad():
        expected = F.conv2d(x, layer.weight + scaling * delta, layer.bias, **geometry)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_peft_layout_with_dropout_runs_adapter_on_dropped_input():
    torch.manual_seed(0)
    layer = lora.Conv1d(3, 5, 3, r=2, lora_dropout=0.5, lora_layout="peft", init_lora_weights=False)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert not torch.allclose(layer(x), layer(x))  # a fresh mask each call
        layer.eval()
        torch.testing.assert_close(layer(x), F.conv1d(x, layer.weight, layer.bias))


# ---------------------------------------------------------------- shapes and init
def test_peft_layout_shapes_and_state_dict_keys():
    layer = lora.Conv2d(4, 8, (3, 2), r=4, groups=2, lora_layout="peft", merge_weights=False)
    assert layer.lora_layout == "peft"
    assert layer.lora_A.shape == (4, 4, 3, 2) and layer.lora_B.shape == (8, 2, 1, 1)
    assert set(layer.adapter_params()) == {"lora_A", "lora_B"}
    assert {"weight", "bias", "lora_A", "lora_B"} == set(layer.state_dict())
    assert "lora_layout='peft'" in repr(layer)
    assert lora.Conv2d(4, 8, 3, r=4).lora_layout == "loralib"


def test_peft_layout_r0_is_the_plain_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    layer = lora.Conv2d.from_conv(conv, r=0, lora_layout="peft")
    x = torch.randn(1, 3, 6, 6)
    assert not layer.adapter_params() and torch.equal(layer(x), conv(x))


def test_init_false_draws_exactly_what_peft_draws():
    """Both draw A then B with kaiming_uniform_(a=sqrt(5)) on the conv-shaped tensors (PEFT via
    nn.Conv2d's own init), so under one seed the tensors are identical."""
    conv = nn.Conv2d(4, 8, 3, groups=2)
    torch.manual_seed(1)
    theirs = peft_layer(conv)
    torch.manual_seed(1)
    ours = lora.Conv2d.from_conv(conv, r=R, lora_alpha=ALPHA, lora_layout="peft",
                                 init_lora_weights=False, merge_weights=False)
    assert torch.equal(ours.lora_A, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B, theirs.lora_B["default"].weight)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_true_and_gaussian_start_as_the_base(init):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3)
    layer = lora.Conv2d.from_conv(conv, r=4, lora_layout="peft", init_lora_weights=init)
    A = layer.lora_A
    assert torch.count_nonzero(layer.lora_B) == 0
    if init is True:  # kaiming_uniform_(a=sqrt(5)): U(-b, b), b = 1 / sqrt(fan_in), fan_in = 8 * 3 * 3
        bound = 1 / math.sqrt(8 * 9)
        assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    else:  # N(0, 1 / r^2)
        assert 0.8 / 4 < A.std() < 1.2 / 4
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", ["PEFT", "hf", None])
def test_bad_lora_layout_is_refused(bad):
    msg = rf"lora_layout must be one of 'loralib', 'peft', got {bad!r}"
    with pytest.raises(ValueError, match=msg):
        lora.Conv2d(4, 8, 3, r=2, lora_layout=bad)
    with pytest.raises(ValueError, match=msg):
        lora.Conv1d.from_conv(nn.Conv1d(4, 8, 3), r=2, lora_layout=bad)


def test_peft_layout_rank_must_split_into_groups():
    with pytest.raises(ValueError, match=r"needs r divisible by groups .* got r=3, groups=2"):
        lora.Conv2d(4, 8, 3, r=3, groups=2, lora_layout="peft", merge_weights=False)


def test_grouped_peft_layout_cannot_merge():
    with pytest.raises(ValueError, match=r"groups=2 cannot merge .* pass merge_weights=False"):
        lora.Conv1d(4, 8, 3, r=2, groups=2, lora_layout="peft")
    layer = lora.Conv1d(4, 8, 3, r=2, groups=2, lora_layout="peft", merge_weights=False,
                        init_lora_weights=False)
    W0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"groups=2 has no dense update"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, W0)
    layer.eval()  # merge_weights=False: stays unmerged, the adapter still runs
    x = torch.randn(2, 4, 9)
    with torch.no_grad():
        assert not torch.allclose(layer(x), F.conv1d(x, W0, layer.bias, groups=2), atol=1e-3)


def test_loralib_layout_refuses_dora_by_name():
    """DoRA on convolutions is PEFT's (tests/layers/test_dora_conv_embedding.py); loralib's layout
    has none."""
    with pytest.raises(ValueError, match=r"use_dora=True on Conv2d needs lora_layout='peft' .* "
                                         r"got lora_layout='loralib'"):
        lora.Conv2d(4, 8, 3, r=2, use_dora=True)
    conv = nn.Conv1d(3, 4, 3)
    with pytest.raises(ValueError, match=r"use_dora=True on Conv1d needs lora_layout='peft'"):
        lora.Conv1d.from_conv(conv, r=2, use_dora=True)
