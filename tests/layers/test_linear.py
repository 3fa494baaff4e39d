"""Linear and MergedLinear against dense references written out here: ``x @ (W + s * B @ A).T + b``."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import lora_phi3 as lora
from tiny import randomize_lora


# ---------------------------------------------------------------- Linear
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense_reference(bias):
    torch.manual_seed(0)
    layer = lora.Linear(12, 7, r=3, lora_alpha=6, bias=bias)
    randomize_lora(layer, 1, scale=0.5)
    x = torch.randn(2, 5, 12)
    W, A, B = layer.weight, layer.lora_A, layer.lora_B
    expected = x @ (W + 2.0 * B @ A).T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_linear_shapes_and_init_follow_loralib():
    layer = lora.Linear(10, 6, r=4)
    assert layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (6, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scaling == 1 / 4  # lora_alpha defaults to 1
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    plain = lora.Linear(10, 6)  # r=0: no adapter at all
    assert not hasattr(plain, "lora_A") and set(plain.state_dict()) == {"weight", "bias"}


def test_linear_fan_in_fan_out_stores_transposed_weight():
    torch.manual_seed(0)
    layer = lora.Linear(8, 5, r=2, lora_alpha=4, fan_in_fan_out=True)
    assert layer.weight.shape == (8, 5)
    randomize_lora(layer, 1, scale=0.5)
    x = torch.randn(3, 8)
    expected = x @ (layer.weight.T + 2.0 * layer.lora_B @ layer.lora_A).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * (layer.lora_B @ layer.lora_A).T)


def test_from_linear_shares_storage_and_keeps_keys():
    base = nn.Linear(6, 4)
    layer = lora.Linear.from_linear(base, r=2, lora_alpha=2)
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert layer.bias.data_ptr() == base.bias.data_ptr()
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: identical at start


# ---------------------------------------------------------------- MergedLinear
def test_merged_linear_unequal_slices_match_dense_reference():
    torch.manual_seed(0)
    q, k, v = 8, 2, 2  # grouped-query attention: k and v smaller than q
    layer = lora.MergedLinear(6, q + k + v, r=2, lora_alpha=4, enable_lora=[True, False, True],
                              split_sizes=[q, k, v])
    assert layer.lora_A.shape == (2 * 2, 6) and layer.lora_B.shape == (q + v, 2)
    randomize_lora(layer, 1, scale=0.5)
    A, B, s = layer.lora_A, layer.lora_B, 2.0
    delta = torch.zeros(q + k + v, 6)
    delta[:q] = B[:q] @ A[:2]
    delta[q + k:] = B[q:] @ A[2:]
    x = torch.randn(5, 6)
    expected = x @ (layer.weight + s * delta).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), s * delta)


def test_merged_linear_equal_slices_like_loralib():
    layer = lora.MergedLinear(6, 12, r=3, enable_lora=[True, False, True])
    assert layer.split_sizes == [4, 4, 4]
    assert layer.lora_A.shape == (6, 6) and layer.lora_B.shape == (8, 3)


def test_merged_linear_only_enabled_rows_change_on_merge():
    layer = lora.MergedLinear(6, 12, r=2, lora_alpha=2, enable_lora=[False, True, False])
    randomize_lora(layer, 1, scale=0.5)
    w0 = layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.weight[:4], w0[:4]) and torch.equal(layer.weight[8:], w0[8:])
    assert not torch.equal(layer.weight[4:8], w0[4:8])


def test_merged_linear_gradients_match_dense_reference():
    torch.manual_seed(0)
    layer = lora.MergedLinear(6, 10, r=2, lora_alpha=2, enable_lora=[True, True],
                              split_sizes=[7, 3])
    randomize_lora(layer, 1, scale=0.5)
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).square().sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    delta = torch.cat([B[:7] @ A[:2], B[7:] @ A[2:]])
    (x2 @ (layer.weight + 1.0 * delta).T + layer.bias).square().sum().backward()
    for ours, ref in [(layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (x.grad, x2.grad)]:
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- pickling & dtypes
def test_layers_pickle_deepcopy_and_torch_save():
    layer = lora.MergedLinear(6, 6, r=2, lora_dropout=0.1, enable_lora=[True, False])
    randomize_lora(layer, 1, scale=0.5)
    x = torch.randn(2, 6)
    layer.eval()
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer, buf)  # loralib's dropout lambda makes this fail (loralib #200)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), layer(x))


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapter_on_half_base(base_dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(base_dtype)
    layer = lora.Linear.from_linear(base, r=4, lora_alpha=8, lora_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == base_dtype
    randomize_lora(layer, 1, scale=0.5)
    x = torch.randn(3, 16).to(base_dtype)
    y = layer(x)
    assert y.dtype == base_dtype
    expected = x.float() @ (layer.weight.float() + 2.0 * layer.lora_B @ layer.lora_A).T + layer.bias.float()
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad is not None


# ---------------------------------------------------------------- bad input
def test_bad_merged_linear_arguments():
    with pytest.raises(ValueError, match=r"enable_lora has 3 slices, which does not divide "
                                         r"out_features=10; pass split_sizes"):
        lora.MergedLinear(4, 10, r=2, enable_lora=[True, False, True])
    with pytest.raises(ValueError, match=r"split_sizes=\[4, 4\] must be positive and sum to "
                                         r"out_features=10"):
        lora.MergedLinear(4, 10, r=2, enable_lora=[True, False], split_sizes=[4, 4])
    with pytest.raises(ValueError, match=r"split_sizes=\[5, 5\] has 2 entries but "
                                         r"enable_lora=\[True, False, True\] has 3"):
        lora.MergedLinear(4, 10, r=2, enable_lora=[True, False, True], split_sizes=[5, 5])
