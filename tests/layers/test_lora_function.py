"""The one LoRA computation (fused autograd node and plain path) against dense references.

Every comparison runs in fp32 with dropout on and a fixed seed: on CPU the fused path draws its
mask with ``torch.native_dropout``, which consumes the generator exactly as ``F.dropout`` does, so
the references below apply ``F.dropout`` after the same ``torch.manual_seed``.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_phi3 as lora
from lora_phi3.layers import lora_linear
from tiny import assert_all_close, grads_of, randomize_lora

ATOL = 1e-5


# ------------------------------------------------------------------ fused == plain == dense
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_fused_matches_dense_reference_with_dropout(bias, fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.Linear(12, 9, r=3, lora_alpha=6, lora_dropout=0.25, bias=bias,
                        fan_in_fan_out=fan_in_fan_out)
    randomize_lora(layer, 1, 0.3)
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = 0.1 * torch.randn(2, 5, 9)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, layer.lora_A, layer.lora_B]
    W = layer.weight.T if fan_in_fan_out else layer.weight
    b = layer.bias if bias else 0

    def dense():  # written out: x W^T + b + s * dropout(x) (B A)^T
        return x @ W.T + b + 2.0 * F.dropout(x, 0.25, True) @ (layer.lora_B @ layer.lora_A).T
    fused = grads_of(lambda: layer(x), tensors, g)
    assert_all_close(fused, grads_of(dense, tensors, g))
    assert layer(x).grad_fn.name() == "LoRALinearFunctionBackward"


def test_linear_fused_matches_plain_path_including_weight_and_bias_grads():
    torch.manual_seed(0)
    layer = lora.Linear(10, 6, r=2, lora_alpha=4, lora_dropout=0.3)
    randomize_lora(layer, 1, 0.3)
    layer.weight.requires_grad_(True)  # full fine-tuning of the base too
    x = torch.randn(4, 3, 10, requires_grad=True)
    g = 0.1 * torch.randn(4, 3, 6)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, layer.weight, layer.bias, layer.lora_A, layer.lora_B]
    args = lambda fused: lambda: lora_linear(x, layer.weight, layer.bias, layer.lora_A,  # noqa: E731
                                             layer.lora_B, layer.scaling, 0.3, fused=fused)
    assert_all_close(grads_of(args(True), tensors, g), grads_of(args(False), tensors, g))


@pytest.mark.parametrize("enable,splits", [([True, False, True], [4, 2, 3]),  # a GEMM per slice
                                           ([True, True, True], None),  # one batched GEMM
                                           ([True, False, True], None),  # batched, strided
                                           ([False, True], [5, 4])])
def test_merged_linear_fused_matches_dense_reference_with_dropout(enable, splits):
    torch.manual_seed(0)
    layer = lora.MergedLinear(8, 9, r=2, lora_alpha=6, lora_dropout=0.2, enable_lora=enable,
                              split_sizes=splits, bias=False)
    randomize_lora(layer, 1, 0.3)
    x = torch.randn(3, 4, 8, requires_grad=True)
    g = 0.1 * torch.randn(3, 4, 9)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, layer.lora_A, layer.lora_B]
    sizes = splits or [9 // len(enable)] * len(enable)

    def dense():  # delta W written block by block from the stacked A and B
        A, B, rows, a0, b0 = layer.lora_A, layer.lora_B, [], 0, 0
        for on, size in zip(enable, sizes):
            if on:
                rows.append(B[b0:b0 + size] @ A[a0:a0 + 2])
                a0, b0 = a0 + 2, b0 + size
            else:
                rows.append(torch.zeros(size, 8))
        delta = torch.cat(rows) * 3.0
        return x @ layer.weight.T + F.dropout(x, 0.2, True) @ delta.T
    assert_all_close(grads_of(lambda: layer(x), tensors, g), grads_of(dense, tensors, g))


def test_eval_mode_has_no_dropout_and_equals_merged():
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=2, lora_alpha=2, lora_dropout=0.5, merge_weights=False)
    randomize_lora(layer, 1, 0.3)
    layer.eval()
    x = torch.randn(7, 6)
    expected = x @ (layer.weight + layer.lora_B @ layer.lora_A).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer(x), layer(x))  # deterministic: no dropout
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_custom_dropout_module_takes_the_plain_path():
    class MyDropout(nn.Dropout):
        pass
    layer = lora.Linear(6, 5, r=2, lora_dropout=0.1)
    layer.lora_dropout = MyDropout(0.1)
    y = layer(torch.randn(3, 6, requires_grad=True))
    assert y.grad_fn.name() != "LoRALinearFunctionBackward"


def test_saves_x_once_packed_mask_and_rank_r_intermediate():
    layer = lora.Linear(64, 32, r=4, lora_dropout=0.1, bias=False)
    x = torch.randn(16, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    acts = sorted((tuple(t.shape), t.dtype) for t in saved if t.data_ptr() not in params)
    assert acts == sorted([((16, 64), torch.float32), ((16, 4), torch.float32),
                           ((16 * 64 // 8,), torch.uint8)])
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a dropped-out copy


# ------------------------------------------------------------------ dtypes
def test_bf16_base_with_fp32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    layer = lora.MergedLinear.from_linear(base, r=2, lora_alpha=4, lora_dropout=0.1,
                                          enable_lora=[True, False, True], lora_dtype=torch.float32)
    randomize_lora(layer, 1, 0.3)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    g = 0.1 * torch.randn(3, 12, dtype=torch.bfloat16)
    tensors = [x, layer.lora_A, layer.lora_B]
    fused = grads_of(lambda: layer(x), tensors, g)
    plain = grads_of(lambda: lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                     layer.scaling, 0.1, layer.lora_slices, fused=False), tensors, g)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert_all_close(fused, plain, atol=2e-2)


# ------------------------------------------------------------------ torch.compile
class _Block(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.qkv = lora.MergedLinear(16, 24, r=2, lora_alpha=4, lora_dropout=p,
                                     enable_lora=[True, False, True])
        self.out = lora.Linear(24, 8, r=2, lora_alpha=4, lora_dropout=p)

    def forward(self, x):
        return self.out(torch.relu(self.qkv(x)))


def test_compile_has_no_graph_breaks_in_lora_layers():
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_Block(0.1).train())(torch.randn(3, 16, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_matches_eager_without_dropout():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _Block(0.0).train()
    randomize_lora(block.qkv, 1, 0.3)
    randomize_lora(block.out, 2, 0.3)
    x = torch.randn(3, 16, requires_grad=True)
    g = 0.1 * torch.randn(3, 8)  # grads of order 1: atol 1e-5 is ~50 ulps
    tensors = [x, block.qkv.lora_A, block.qkv.lora_B, block.out.lora_A, block.out.lora_B]
    compiled = torch.compile(block, backend="aot_eager")
    assert_all_close(grads_of(lambda: compiled(x), tensors, g), grads_of(lambda: block(x), tensors, g))


# ------------------------------------------------------------------ bad input
def test_lora_linear_rejects_mismatched_shapes():
    x, W = torch.randn(2, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"lora_A \(2, 6\), lora_B \(4, 2\) and slices"):
        lora_linear(x, W, None, torch.randn(2, 6), torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match=r"lora_A \(3, 6\).*slices=\(\(0, 2\), \(2, 3\)\)"):
        lora_linear(x, W, None, torch.randn(3, 6), torch.randn(5, 1), 1.0, slices=[(0, 2), (2, 3)])
    # sizes that add up but a slice that runs past the output (rows 4..6 of 5)
    with pytest.raises(ValueError, match=r"slices=\(\(0, 2\), \(4, 2\)\) do not fit x \(\.\.\., 6\) "
                                         r"-> \(\.\.\., 5\)"):
        lora_linear(x, W, None, torch.randn(4, 6), torch.randn(4, 2), 1.0, slices=[(0, 2), (4, 2)])


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_lora_linear_rejects_bad_dropout(p):
    x, W = torch.randn(2, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got"):
        lora_linear(x, W, None, torch.randn(2, 6), torch.randn(5, 2), 1.0, dropout_p=p)
