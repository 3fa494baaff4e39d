"""NF4Weight: the 4-bit base as a module; casts change only its compute dtype, never its storage."""

import pytest
import torch
import torch.nn as nn

from lora_phi3.quant import Linear4bit, NF4Weight


def test_module_casts_keep_the_4bit_storage_and_change_only_the_compute_dtype():
    layer = Linear4bit.from_linear(nn.Linear(128, 32), r=2, lora_alpha=2)
    before = {n: t.clone() for n, t in layer.named_buffers()}
    assert set(before) == {"quantized_weight." + f for f in ("codes", "absmax", "absmax_scale", "absmax_offset")}
    assert before["quantized_weight.absmax_scale"].dtype == torch.float32
    casts = [(lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
             (lambda m: m.float(), torch.float32), (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16)]
    for cast, dtype in casts:
        cast(layer)
        assert layer.quantized_weight.compute_dtype == dtype and layer.lora_A.dtype == dtype
        for name, tensor in layer.named_buffers():  # same dtypes, same bits
            assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
        assert layer(torch.randn(2, 128, dtype=dtype)).dtype == dtype
    assert layer.quantized_weight.dequantize().dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_to_cuda_moves_the_storage():
    layer = Linear4bit.from_linear(nn.Linear(128, 32), r=2).cuda()
    assert all(t.is_cuda for t in layer.buffers())
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x.cuda()).cpu(), layer.cpu()(x))


@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_as_parameters_keeps_keys_values_and_dtypes(double_quant):
    # What FSDP2 needs (it shards parameters only): same state-dict keys and values, storage
    # frozen parameters, 1-D everywhere, and the compute-dtype casts still leave the storage alone.
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    buffers = NF4Weight.from_weight(w, double_quant=double_quant)
    params = NF4Weight.from_weight(w, double_quant=double_quant)
    params.storage_as_parameters()
    assert list(buffers.state_dict()) == list(params.state_dict())
    assert all(p.dim() == 1 and not p.requires_grad for p in params.parameters())
    assert torch.equal(params.dequantize(), buffers.dequantize())
    x = torch.randn(3, 128)
    assert torch.equal(params.matmul(x), buffers.matmul(x))
    params.to(torch.bfloat16)
    assert params.compute_dtype == torch.bfloat16
    assert {p.dtype for p in params.parameters()} == {p.dtype for p in buffers.buffers()}
    params.load_dense(2 * w)  # re-quantising keeps the parameter form
    assert all(isinstance(p, torch.nn.Parameter) for p in params._parameters.values() if p is not None)
    torch.testing.assert_close(params.dequantize(torch.float32),
                               NF4Weight.from_weight(2 * w, double_quant=double_quant).dequantize(),
                               atol=0, rtol=0)
