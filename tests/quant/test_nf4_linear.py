"""``nf4_matmul``: ``x @ dequant(W).T + b`` against dense references, slab by slab, saving no dense weight."""

import pytest
import torch
import torch.nn.functional as F

from lora_phi3.quant import nf4 as nf4_module
from lora_phi3.quant import nf4_linear
from lora_phi3.quant.nf4 import nf4_quantize
from lora_phi3.quant.nf4_linear import NF4LinearFunction, nf4_matmul


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear_function_matches_dense_reference_and_saves_no_dense_weight(double_quant):
    gen = torch.Generator().manual_seed(9)
    q = nf4_quantize(torch.randn(24, 64, generator=gen), double_quant=double_quant)
    weight = q.dequantize()  # dense reference weight, (out, in)
    bias = torch.randn(24, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, 64, generator=gen, requires_grad=True)
    grad_out = torch.randn(2, 5, 24, generator=gen)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = NF4LinearFunction.apply(x, q, bias)
    # Only the NF4 storage is kept for backward: its bytes, and nothing weight-shaped.
    assert sum(t.nbytes for t in saved) == q.nbytes and all(t.shape != weight.shape for t in saved)
    grad_x, grad_bias = torch.autograd.grad(out, (x, bias), grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = bias.detach().clone().requires_grad_(True)
    out_ref = x_ref @ weight.T + bias_ref
    ref_grad_x, ref_grad_bias = torch.autograd.grad(out_ref, (x_ref, bias_ref), grad_out)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad_x, ref_grad_x)
    torch.testing.assert_close(grad_bias, ref_grad_bias)
    # The quantised weight is not a graph input: nothing can receive a gradient for it.
    inputs = [fn.variable for fn, _ in out.grad_fn.next_functions]
    assert len(inputs) == 2 and inputs[0] is x and inputs[1] is bias


@pytest.mark.parametrize(
    "out_f, in_f, block_size, chunk, dtype",
    [(40, 128, 64, 300, torch.float32),  # 2-row slabs, 64-column slabs
     (37, 42, 3, 100, torch.float32),  # odd block size: column slabs of whole bytes (6); last slab short
     (64, 256, 32, 1000, torch.bfloat16),
     (10, 256, 128, 129, torch.float16),  # one row per slab
     (24, 35, 7, 50, torch.float32)],  # odd in_features: rows are not byte-aligned, dequantised whole
)  # fmt: skip
def test_linear_function_in_slabs_matches_dense_reference(monkeypatch, out_f, in_f, block_size, chunk, dtype):
    gen = torch.Generator().manual_seed(14)
    q = nf4_quantize(torch.randn(out_f, in_f, generator=gen), block_size=block_size, compute_dtype=dtype)
    weight = q.dequantize()  # the dense reference, taken before the chunk size shrinks
    monkeypatch.setitem(nf4_module._CHUNK_ELEMENTS, "cpu", chunk)
    dense_sizes = []
    for module, name in [(nf4_linear, "_dequantize_rows"), (nf4_linear, "_dequantize_cols"),
                         (nf4_linear, "nf4_dequantize"), (nf4_module, "nf4_dequantize")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: dense_sizes.append(
            (out := _real(*a, **k)).numel()) or out)
    x = torch.randn(2, 3, in_f, generator=gen, requires_grad=True)
    bias = torch.randn(out_f, generator=gen, requires_grad=True)
    out = nf4_matmul(x, q, bias)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    grad_x, grad_bias = torch.autograd.grad(out, (x, bias), grad_out)

    # The reference in fp32 on the same (compute-dtype) inputs; 16-bit outputs are then rounded.
    x_ref = x.detach().to(dtype).float().requires_grad_(True)
    bias_ref = bias.detach().to(dtype).float().requires_grad_(True)
    out_ref = x_ref @ weight.float().T + bias_ref
    ref_grad_x, ref_grad_bias = torch.autograd.grad(out_ref, (x_ref, bias_ref), grad_out.float())
    tol = {torch.float32: {}, torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
    assert out.dtype == dtype and grad_x.dtype == torch.float32
    torch.testing.assert_close(out.float(), out_ref, **tol[dtype])
    torch.testing.assert_close(grad_x, ref_grad_x, **tol[dtype])
    torch.testing.assert_close(grad_bias, ref_grad_bias, **tol[dtype])
    if in_f % 2 == 0:  # slabs: the whole dense weight never exists
        # a slab is at least one row, or one block (of whole bytes) of every row
        smallest = max(in_f, out_f * block_size * (1 + block_size % 2))
        assert max(dense_sizes) <= max(chunk, smallest) < out_f * in_f
    else:
        assert max(dense_sizes) == out_f * in_f


def test_linear_function_in_bf16_compute_dtype():
    gen = torch.Generator().manual_seed(10)
    q = nf4_quantize(torch.randn(32, 64, generator=gen), compute_dtype=torch.bfloat16)
    x = torch.randn(7, 64, generator=gen, requires_grad=True)  # fp32 input, bf16 compute
    out = nf4_matmul(x, q)
    assert out.dtype == torch.bfloat16
    (grad_x,) = torch.autograd.grad(out.float().sum(), x)
    assert grad_x.dtype == torch.float32
    x_ref = x.detach().bfloat16().requires_grad_(True)
    out_ref = F.linear(x_ref, q.dequantize())
    (ref_grad,) = torch.autograd.grad(out_ref.float().sum(), x_ref)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad_x, ref_grad.float())


def test_matmul_argument_errors():
    q = nf4_quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., in_features=64\), got \(2, 32\)"):
        nf4_matmul(torch.randn(2, 32), q)
    with pytest.raises(TypeError, match=r"x must be a float tensor, got torch.int64"):
        nf4_matmul(torch.ones(2, 64, dtype=torch.long), q)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\) \(out_features\), got \(9,\)"):
        nf4_matmul(torch.randn(2, 64), q, torch.randn(9))
    with pytest.raises(ValueError, match=r"2-D \(out_features, in_features\) weight, got shape \(2, 8, 64\)"):
        nf4_matmul(torch.randn(2, 64), nf4_quantize(torch.randn(2, 8, 64)))
    with pytest.raises(TypeError, match=r"q must be an NF4Tensor, got Tensor"):
        nf4_matmul(torch.randn(2, 64), torch.randn(8, 64))
