"""Conv1d/2d/3d against dense references: a convolution with ``W + s * (B @ A).view(W.shape)``."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora
from tiny import randomize_lora


# ---------------------------------------------------------------- Conv
@pytest.mark.parametrize("cls,conv,shape,kwargs", [
    (lora.Conv1d, F.conv1d, (2, 4, 11), dict(kernel_size=3, stride=2, padding=1)),
    (lora.Conv2d, F.conv2d, (2, 4, 7, 7), dict(kernel_size=(3, 2), padding=(1, 0), groups=2)),
    (lora.Conv3d, F.conv3d, (1, 4, 5, 6, 5), dict(kernel_size=(2, 3, 1), stride=1, groups=4)),
])
def test_conv_matches_dense_reference(cls, conv, shape, kwargs):
    torch.manual_seed(0)
    layer = cls(4, 8, r=2, lora_alpha=4, **kwargs)
    randomize_lora(layer, 1, scale=0.5)
    x = torch.randn(*shape)
    W = layer.weight + 2.0 * (layer.lora_B @ layer.lora_A).view(layer.weight.shape)
    extra = {k: v for k, v in kwargs.items() if k != "kernel_size"}
    torch.testing.assert_close(layer(x), conv(x, W, layer.bias, **extra), atol=1e-5, rtol=1e-5)


def test_conv2d_uses_loralib_shapes():
    layer = lora.Conv2d(3, 8, 3, r=4, groups=1)
    assert layer.lora_A.shape == (4 * 3, 3 * 3) and layer.lora_B.shape == (8 * 3, 4 * 3)


def test_conv_with_dropout_runs_adapter_on_dropped_input():
    torch.manual_seed(0)
    layer = lora.Conv1d(3, 5, 3, r=2, lora_dropout=0.5)
    randomize_lora(layer, 1, scale=0.5)
    x = torch.randn(2, 3, 8)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # a fresh mask each call
    layer.eval()
    W = layer.weight  # merged
    torch.testing.assert_close(layer(x), F.conv1d(x, W, layer.bias))


def test_from_conv_shares_weight_and_checks_type():
    base = nn.Conv2d(2, 4, 3)
    layer = lora.Conv2d.from_conv(base, r=2)
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    with pytest.raises(TypeError, match="Conv1d.from_conv needs a Conv1d, got Conv2d"):
        lora.Conv1d.from_conv(base, r=2)
