"""NF4 quantisation: code book, codes against a plain argmin reference and bitsandbytes, layout, errors."""

import pytest
import torch

from lora_phi3.quant import nf4 as nf4_module
from lora_phi3.quant.nf4 import NF4_CODEBOOK, NF4Tensor, nf4_dequantize, nf4_empty, nf4_quantize

# QLoRA (Dettmers et al. 2023) Appendix E, written out by hand.
PAPER_CODEBOOK = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def rel_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def unpack(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """Plain unpacking: element 2k is the high nibble of byte k, element 2k+1 the low nibble."""
    out = []
    for byte in codes.tolist():
        out += [byte >> 4, byte & 15]
    return torch.tensor(out[:numel])


def reference_nf4(w: torch.Tensor, block_size: int):
    """Per element: index of the nearest code book value of w / absmax(block); and the dense value."""
    blocks = w.float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codebook = torch.tensor(PAPER_CODEBOOK)
    index = (scaled.unsqueeze(-1) - codebook).abs().argmin(dim=-1)
    return index.reshape(-1), (codebook[index] * absmax).reshape(w.shape), absmax.reshape(-1)


def test_codebook_is_the_papers_sorted_with_exact_zero():
    assert list(NF4_CODEBOOK) == PAPER_CODEBOOK
    assert len(PAPER_CODEBOOK) == 16 and sorted(PAPER_CODEBOOK) == PAPER_CODEBOOK
    assert PAPER_CODEBOOK.index(0.0) == 7 and torch.tensor(PAPER_CODEBOOK)[7].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_on_gaussian_weights(dtype):
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)
    plain = nf4_quantize(w, double_quant=False).dequantize()
    double = nf4_quantize(w, double_quant=True).dequantize()
    assert plain.dtype == double.dtype == dtype and plain.shape == w.shape
    err_plain, err_double = rel_rms(plain, w), rel_rms(double, w)
    assert 0.085 < err_plain < 0.10 and 0.085 < err_double < 0.10
    assert err_double - err_plain < 0.01 * err_plain  # 8-bit scales add under 1% relative error


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_codes_and_values_equal_argmin_reference(block_size):
    gen = torch.Generator().manual_seed(1)
    # Rows of very different scales, so the per-block absmax matters.
    w = torch.randn(48, 512, generator=gen) * torch.logspace(-3, 1, 48).unsqueeze(1)
    index, dense, absmax = reference_nf4(w, block_size)
    q = nf4_quantize(w, block_size=block_size, double_quant=False)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == w.numel() // 2
    assert torch.equal(unpack(q.codes, w.numel()), index)
    assert torch.equal(q.absmax, absmax)
    assert torch.equal(q.dequantize(), dense)


def test_double_quant_scales_are_nearest_map_entries():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(300, 128, generator=gen) * torch.rand(300, 1, generator=gen)  # 600 blocks: 2 full + tail
    _, _, absmax = reference_nf4(w, 64)
    q = nf4_quantize(w, block_size=64, double_quant=True)
    assert q.absmax.dtype == torch.uint8 and q.absmax.numel() == 600 and q.absmax_scale.numel() == 3
    dynamic = nf4_module._dynamic_map_values()
    assert dynamic.numel() == 256 and torch.equal(dynamic, dynamic.sort().values) and 0.0 in dynamic.tolist()
    assert dynamic.max().item() == 1.0 and dynamic.unique().numel() == 256
    # Dynamic map: 2^e fractions per decade (10^(e-7), 10^(e-6)), e = 0..6, both signs, plus 0 and 1.
    for e in range(7):
        in_decade = (dynamic.abs() > 10.0 ** (e - 7)) & (dynamic.abs() < 10.0 ** (e - 6))
        assert in_decade.sum().item() == 2 * 2**e
    assert abs(dynamic[-2].item() - 0.99296875) < 1e-7 and abs(dynamic[0].item() + 0.99296875) < 1e-7
    offset = absmax.mean()
    centred = torch.nn.functional.pad(absmax - offset, (0, 168)).reshape(3, 256)
    scale = centred.abs().amax(dim=1, keepdim=True)
    expected = ((centred / scale).unsqueeze(-1) - dynamic).abs().argmin(dim=-1).reshape(-1)[:600]
    assert torch.equal(q.absmax.long(), expected)
    assert torch.equal(q.absmax_scale, scale.reshape(-1)) and torch.equal(q.absmax_offset, offset)
    rebuilt = (dynamic[expected] * scale.repeat_interleave(256)[:600]) + offset
    torch.testing.assert_close(q.block_absmax(), rebuilt)
    assert (q.block_absmax() - absmax).abs().max() < 0.01 * absmax.max()
    # Dense values use the rebuilt scales: code book value * rebuilt absmax.
    index = unpack(q.codes, w.numel()).reshape(600, 64)
    dense = torch.tensor(PAPER_CODEBOOK)[index] * rebuilt[:, None]
    torch.testing.assert_close(q.dequantize(), dense.reshape(w.shape))


def test_bits_per_parameter_from_nbytes():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    n = w.numel()
    plain, double = nf4_quantize(w, double_quant=False), nf4_quantize(w, double_quant=True)
    assert plain.nbytes == n // 2 + 4 * (n // 64)
    assert double.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert plain.nbytes * 8 / n == 4.5
    assert abs(double.nbytes * 8 / n - 4.127) < 0.001


@pytest.mark.parametrize(
    "shape, block_size", [((8, 96), 96), ((5, 21), 7), ((3, 3), 3), ((1, 1), 1), ((7,), 7), ((2, 3, 10), 5)]
)
@pytest.mark.parametrize("double_quant", [False, True])
def test_odd_shapes_and_block_equal_to_row(shape, block_size, double_quant):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    index, dense, _ = reference_nf4(w, block_size)
    q = nf4_quantize(w, block_size=block_size, double_quant=double_quant)
    assert q.codes.numel() == (w.numel() + 1) // 2  # odd counts get one padding nibble
    assert torch.equal(unpack(q.codes, w.numel()), index)
    if not double_quant:
        assert torch.equal(q.dequantize(), dense)
    assert q.dequantize().shape == w.shape


def test_dequantize_chunking_matches_unchunked(monkeypatch):
    w = torch.randn(6, 35, generator=torch.Generator().manual_seed(5))
    whole = nf4_quantize(w, block_size=7)
    monkeypatch.setitem(nf4_module._CHUNK_ELEMENTS, "cpu", 14)  # 2 blocks per chunk
    chunked = nf4_quantize(w, block_size=7)
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.absmax, whole.absmax)
    monkeypatch.setitem(nf4_module._CHUNK_ELEMENTS, "cpu", 1 << 22)
    expected = whole.dequantize()
    monkeypatch.setitem(nf4_module._CHUNK_ELEMENTS, "cpu", 21)  # 3 blocks: rounded down to an even 2
    assert torch.equal(whole.dequantize(), expected)


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_blocks_give_zeros_not_nan(double_quant):
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(6))
    w[1] = 0.0  # two whole zero blocks
    out = nf4_quantize(w, double_quant=double_quant).dequantize()
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(128))
    zeros = nf4_quantize(torch.zeros(2, 64), double_quant=double_quant).dequantize()
    assert torch.equal(zeros, torch.zeros(2, 64))


def test_constant_tensor_round_trips_exactly_with_double_quant():
    w = torch.full((4, 256), -0.375)  # equal maxima centre to zero: second-level scale 0 must not divide
    q = nf4_quantize(w, double_quant=True)
    assert torch.equal(q.absmax_scale, torch.zeros(1)) and torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, block_size", [((300, 128), 64), ((5, 21), 7)])
def test_nf4_empty_has_the_layout_of_nf4_quantize(shape, block_size, double_quant):
    real = nf4_quantize(torch.randn(*shape, dtype=torch.bfloat16), block_size, double_quant)
    for device in ("cpu", "meta"):
        empty = nf4_empty(shape, torch.bfloat16, block_size, double_quant, device=device)
        assert empty.device == torch.device(device) and empty.nbytes == real.nbytes
        assert (empty.shape, empty.dtype, empty.block_size, empty.compute_dtype, empty.double_quant) == (
            real.shape, real.dtype, real.block_size, real.compute_dtype, real.double_quant)  # fmt: skip
        for a, b in zip(empty.storage(), real.storage()):
            assert (a is None and b is None) or (a.shape, a.dtype) == (b.shape, b.dtype)
    with pytest.raises(ValueError, match=r"dividing the row length 21 .* got 4"):
        nf4_empty((5, 21), torch.float32, 4)
    with pytest.raises(TypeError, match=r"dtype must be one of .* got torch.int64"):
        nf4_empty((5, 21), torch.int64, 7)


@pytest.mark.parametrize("block_size", [64, 3, 0, -40, 40.0, True, "40"])
def test_bad_block_size_is_a_value_error(block_size):
    with pytest.raises(ValueError, match=r"dividing the row length 200 .* got .*; e.g. block_size=8"):
        nf4_quantize(torch.randn(3, 200), block_size=block_size)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match=r"w.dtype must be one of .* got torch.int64"):
        nf4_quantize(torch.arange(64))
    with pytest.raises(TypeError, match=r"w.dtype must be one of .* got torch.float64"):
        nf4_quantize(torch.randn(64, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"w must be a torch.Tensor, got list"):
        nf4_quantize([1.0] * 64)
    with pytest.raises(TypeError, match=r"compute_dtype must be one of .* got torch.int8"):
        nf4_quantize(torch.randn(64), compute_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"double_quant must be a bool, got 'yes'"):
        nf4_quantize(torch.randn(64), double_quant="yes")
    with pytest.raises(ValueError, match=r"at least 1 dimension and 1 element, got shape \(\)"):
        nf4_quantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"inf or NaN"):
        nf4_quantize(torch.tensor([1.0, float("inf")] * 32))
    with pytest.raises(TypeError, match=r"q must be an NF4Tensor, got Tensor"):
        nf4_dequantize(torch.randn(4))
    with pytest.raises(TypeError, match=r"dtype must be one of .* got torch.int32"):
        nf4_quantize(torch.randn(64)).dequantize(torch.int32)


def test_compute_dtype_and_to_device():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    q = nf4_quantize(w, compute_dtype=torch.bfloat16)
    assert q.dtype == torch.float32 and q.dequantize().dtype == torch.bfloat16
    assert torch.equal(q.dequantize(torch.float32).bfloat16(), q.dequantize())
    moved = q.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved.dequantize(), q.dequantize())
    assert "NF4Tensor(shape=(8, 64)" in repr(q)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_through_safetensors_and_module_buffers(tmp_path, double_quant):
    from safetensors.torch import load_file, save_file

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(8), dtype=torch.float16)
    q = nf4_quantize(w, block_size=32, double_quant=double_quant, compute_dtype=torch.bfloat16)
    save_file(q.state_dict(), str(tmp_path / "q.safetensors"))
    loaded = NF4Tensor.from_state_dict(load_file(str(tmp_path / "q.safetensors")))
    assert (loaded.shape, loaded.dtype, loaded.block_size, loaded.compute_dtype) == (
        q.shape, torch.float16, 32, torch.bfloat16)  # fmt: skip
    assert loaded.double_quant == double_quant and torch.equal(loaded.dequantize(), q.dequantize())

    module = torch.nn.Module()
    for name, tensor in q.state_dict().items():
        module.register_buffer(name, tensor)
    module.to(torch.float64)  # a dtype cast hits float buffers; the scales come back as fp32
    rebuilt = NF4Tensor.from_state_dict(dict(module.named_buffers()))
    assert rebuilt.codes.dtype == torch.uint8 and rebuilt.block_absmax().dtype == torch.float32
    assert torch.equal(rebuilt.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match=r"missing keys \['codes'\]"):
        NF4Tensor.from_state_dict({k: v for k, v in q.state_dict().items() if k != "codes"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(11))
    on_cpu, on_gpu = nf4_quantize(w), nf4_quantize(w.cuda())
    assert torch.equal(on_gpu.codes.cpu(), on_cpu.codes) and torch.equal(on_gpu.absmax.cpu(), on_cpu.absmax)
    assert on_gpu.dequantize().device.type == "cuda"
    torch.testing.assert_close(on_gpu.dequantize().cpu(), on_cpu.dequantize())
    assert torch.equal(on_cpu.to("cuda").dequantize(), on_gpu.dequantize())


def _bnb_functional():
    bnb = pytest.importorskip("bitsandbytes")
    try:
        bnb.functional.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4")
    except Exception as exc:  # a build without a CPU path for 4-bit
        pytest.skip(f"bitsandbytes cannot quantise on CPU here: {exc}")
    return bnb.functional


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [64, 128])
def test_codes_equal_bitsandbytes(dtype, block_size):
    bnb_functional = _bnb_functional()
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(12)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    ours = nf4_quantize(w, block_size=block_size, double_quant=False)
    assert torch.equal(packed.view(-1), ours.codes) and torch.equal(state.absmax, ours.absmax)
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), ours.dequantize())


def test_double_quant_matches_bitsandbytes():
    bnb_functional = _bnb_functional()
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(13))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4_quantize(w, block_size=64, double_quant=True)
    assert torch.equal(packed.view(-1), ours.codes)
    assert torch.equal(state.state2.code, nf4_module._dynamic_map_values())
    assert torch.equal(state.offset, ours.absmax_offset)
    assert torch.equal(state.state2.absmax, ours.absmax_scale)
    # bitsandbytes' CPU kernel finds 8-bit codes by an approximate search; ours is the exact
    # nearest entry. Where the two differ, theirs must be strictly farther from the true value.
    fp32_absmax = nf4_quantize(w, block_size=64, double_quant=False).absmax
    target = (fp32_absmax - ours.absmax_offset).view(-1, 256) / ours.absmax_scale[:, None]
    code = state.state2.code
    differ = state.absmax != ours.absmax
    dist_theirs = (target.reshape(-1) - code[state.absmax.long()]).abs()
    dist_ours = (target.reshape(-1) - code[ours.absmax.long()]).abs()
    assert differ.float().mean() < 0.01 and (dist_theirs[differ] > dist_ours[differ]).all()
