"""The LoRA layers against dense references written out here: ``x @ (W + s * B @ A).T + b``."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora


def _randomize_b(layer, seed=1):
    """Give lora_B non-zero values: with B = 0 every check below would pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.5)


# ---------------------------------------------------------------- Linear
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense_reference(bias):
    torch.manual_seed(0)
    layer = lora.Linear(12, 7, r=3, lora_alpha=6, bias=bias)
    _randomize_b(layer)
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
    _randomize_b(layer)
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
    _randomize_b(layer)
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
    _randomize_b(layer)
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
    _randomize_b(layer)
    w0 = layer.weight.detach().clone()
    for _ in range(50):
        layer.eval()
        layer.train()
    # At most one ulp apart, as the brief asks; the kept-aside values in fact make it exact.
    one_ulp = (torch.nextafter(w0.abs(), torch.full_like(w0, float("inf"))) - w0.abs()).float()
    assert ((layer.weight.float() - w0.float()).abs() <= one_ulp).all()
    assert torch.equal(layer.weight, w0)


# ---------------------------------------------------------------- MergedLinear
def test_merged_linear_unequal_slices_match_dense_reference():
    torch.manual_seed(0)
    q, k, v = 8, 2, 2  # grouped-query attention: k and v smaller than q
    layer = lora.MergedLinear(6, q + k + v, r=2, lora_alpha=4, enable_lora=[True, False, True],
                              split_sizes=[q, k, v])
    assert layer.lora_A.shape == (2 * 2, 6) and layer.lora_B.shape == (q + v, 2)
    _randomize_b(layer)
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
    _randomize_b(layer)
    w0 = layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.weight[:4], w0[:4]) and torch.equal(layer.weight[8:], w0[8:])
    assert not torch.equal(layer.weight[4:8], w0[4:8])


def test_merged_linear_gradients_match_dense_reference():
    torch.manual_seed(0)
    layer = lora.MergedLinear(6, 10, r=2, lora_alpha=2, enable_lora=[True, True],
                              split_sizes=[7, 3])
    _randomize_b(layer)
    x = torch.randn(4, 6, requires_grad=True)
    layer(x).square().sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    delta = torch.cat([B[:7] @ A[:2], B[7:] @ A[2:]])
    (x2 @ (layer.weight + 1.0 * delta).T + layer.bias).square().sum().backward()
    for ours, ref in [(layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (x.grad, x2.grad)]:
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- Embedding
def test_embedding_matches_dense_reference():
    torch.manual_seed(0)
    layer = lora.Embedding(15, 6, r=3, lora_alpha=6, padding_idx=0)
    assert layer.lora_A.shape == (3, 15) and layer.lora_B.shape == (6, 3)
    assert torch.count_nonzero(layer.lora_A) == 0  # loralib: A zeros, B normal
    _randomize_b(layer)
    ids = torch.randint(0, 15, (3, 4))
    table = layer.weight + 2.0 * (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(ids), table[ids], atol=1e-5, rtol=1e-5)


def test_from_embedding_shares_table():
    base = nn.Embedding(9, 4, padding_idx=1)
    layer = lora.Embedding.from_embedding(base, r=2)
    assert layer.weight.data_ptr() == base.weight.data_ptr() and layer.padding_idx == 1


# ---------------------------------------------------------------- Conv
@pytest.mark.parametrize("cls,conv,shape,kwargs", [
    (lora.Conv1d, F.conv1d, (2, 4, 11), dict(kernel_size=3, stride=2, padding=1)),
    (lora.Conv2d, F.conv2d, (2, 4, 7, 7), dict(kernel_size=(3, 2), padding=(1, 0), groups=2)),
    (lora.Conv3d, F.conv3d, (1, 4, 5, 6, 5), dict(kernel_size=(2, 3, 1), stride=1, groups=4)),
])
def test_conv_matches_dense_reference(cls, conv, shape, kwargs):
    torch.manual_seed(0)
    layer = cls(4, 8, r=2, lora_alpha=4, **kwargs)
    _randomize_b(layer)
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
    _randomize_b(layer)
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
    _randomize_b(src, seed=3)
    dst = lora.Linear(6, 4, r=2, lora_alpha=2)
    dst.load_state_dict({"weight": src.weight, "bias": src.bias}, strict=False)
    dst.eval()  # merged with its own (zero) B
    dst.load_state_dict(lora.lora_state_dict(src), strict=False)
    x = torch.randn(3, 6)
    src.eval()
    torch.testing.assert_close(dst(x), src(x))
    dst.train()
    torch.testing.assert_close(dst.weight, src.weight.detach() - src.delta_weight(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- pickling & dtypes
def test_layers_pickle_deepcopy_and_torch_save():
    layer = lora.MergedLinear(6, 6, r=2, lora_dropout=0.1, enable_lora=[True, False])
    _randomize_b(layer)
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
    _randomize_b(layer)
    x = torch.randn(3, 16).to(base_dtype)
    y = layer(x)
    assert y.dtype == base_dtype
    expected = x.float() @ (layer.weight.float() + 2.0 * layer.lora_B @ layer.lora_A).T + layer.bias.float()
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad is not None


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
