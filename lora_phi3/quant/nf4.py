"""4-bit NormalFloat (NF4) quantisation in plain PyTorch, as used by QLoRA.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3 (NF4 and
double quantisation) and Appendix E (the code book). Storage follows bitsandbytes' layout so the
4-bit codes are interchangeable: the flattened weight is cut into blocks of ``block_size``
elements, each block is scaled by its absolute maximum, every element becomes the index (0..15)
of the nearest code book value, and two indices share a byte, the first element in the high
nibble. With double quantisation the fp32 block maxima are shifted by their mean and stored as
8-bit indices into bitsandbytes' signed "dynamic" 8-bit code map, with one fp32 scale per 256
maxima. Everything runs on whatever device the weight is on; no compiled kernels are needed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["NF4_CODEBOOK", "NF4Tensor", "nf4_quantize", "nf4_dequantize", "nf4_empty", "NF4_FLOAT_DTYPES",
           "DOUBLE_QUANT_BLOCK_SIZE", "chunk_elements", "decode_pairs"]

# QLoRA Appendix E / bitsandbytes: quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
DOUBLE_QUANT_BLOCK_SIZE = 256  # QLoRA section 3: second-level blocks of 256 constants
# The dtypes NF4 quantises from and computes in; the order is the state_dict encoding.
NF4_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per step of (de)quantisation, bounding its temporaries (about 6 bytes per element):
# ~6 MiB on CPU, where smaller steps were as fast on an idle machine (slower when cores are
# contended); larger elsewhere, where every step costs kernel launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _dynamic_map_values() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers 2015, arXiv:1511.04561): 256 sorted values.

    For decimal exponents 10^-6 .. 10^0 there are 1, 2, 4, .., 64 linearly spaced fractions in
    (0.1, 1) (the midpoints of a linspace), each with both signs, plus 0 and 1.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1.0, 2**exponent + 1, dtype=torch.float32)
        midpoints, scale = (edges[:-1] + edges[1:]) / 2, 10.0 ** (exponent - 6)
        # fp32 products with +scale and -scale, exactly as bitsandbytes rounds them
        values += (midpoints * scale).tolist() + (midpoints * -scale).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


class _Tables(NamedTuple):
    """Constant lookup tables on one device."""

    nf4_midpoints: torch.Tensor  # (15,) decision boundaries: nearest code == bucket between midpoints
    dynamic: torch.Tensor  # (256,) the dynamic 8-bit map
    dynamic_midpoints: torch.Tensor  # (255,)
    pairs: torch.Tensor  # (256, 2): byte b -> (code[b >> 4], code[b & 15]), high nibble first
    # (256,) int64: the same fp32 pairs, each read as one 8-byte word. A 1-D gather of 8-byte
    # scalars is ~3x faster on CPU than gathering 2-float rows, and yields both nibbles at once.
    pair_words: torch.Tensor


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> _Tables:
    nf4 = torch.tensor(NF4_CODEBOOK, dtype=torch.float32)
    dynamic = _dynamic_map_values()
    byte = torch.arange(256)
    pairs = torch.stack([nf4[byte >> 4], nf4[byte & 15]], dim=1).contiguous()
    tables = _Tables(
        nf4_midpoints=(nf4[:-1] + nf4[1:]) / 2,
        dynamic=dynamic,
        dynamic_midpoints=(dynamic[:-1] + dynamic[1:]) / 2,
        pairs=pairs,
        pair_words=pairs.view(torch.int64).view(-1),
    )
    return _Tables(*(t.to(device) for t in tables))


def chunk_elements(device: torch.device) -> int:
    """Elements per step of (de)quantisation on ``device`` (bounds the fp32 temporaries)."""
    return _CHUNK_ELEMENTS.get(device.type, _DEFAULT_CHUNK_ELEMENTS)


def _nearest_index(scaled: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted table, given its midpoints (ties go lower), as uint8."""
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


@dataclasses.dataclass(eq=False)
class NF4Tensor:
    """A weight stored as NF4 codes plus block scales. A plain container, not a tensor subclass.

    Attributes:
        codes: uint8 ``(ceil(numel / 2),)``, two 4-bit code book indices per byte, first high.
        absmax: per-block scales ``(numel // block_size,)``: fp32, or uint8 indices into the
            dynamic 8-bit map when double quantised.
        absmax_scale: fp32 ``(ceil(n_blocks / 256),)`` second-level scales, or None.
        absmax_offset: fp32 ``()`` mean subtracted from the scales before 8-bit coding, or None.
        shape: original shape. dtype: original dtype. block_size: elements per block.
        compute_dtype: dtype that ``dequantize()`` returns by default.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: Optional[torch.Tensor]
    absmax_offset: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    compute_dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (codes, scales, second-level scales, offset)."""
        return sum(t.nbytes for t in self.storage() if t is not None)

    def storage(self) -> tuple:
        """``(codes, absmax, absmax_scale, absmax_offset)``; the last two None without double quant."""
        return (self.codes, self.absmax, self.absmax_scale, self.absmax_offset)

    def with_storage(self, codes, absmax, absmax_scale, absmax_offset) -> "NF4Tensor":
        """The same metadata over other storage tensors (e.g. moved ones, or None placeholders)."""
        return dataclasses.replace(self, codes=codes, absmax=absmax, absmax_scale=absmax_scale,
                                   absmax_offset=absmax_offset)  # fmt: skip

    def to(self, device) -> "NF4Tensor":
        """Copy to ``device`` (a ``torch.device`` or string). Codes and scales keep their dtypes."""
        return self.with_storage(*(None if t is None else t.to(device) for t in self.storage()))

    def block_absmax(self) -> torch.Tensor:
        """The fp32 per-block scales ``(n_blocks,)``, undoing double quantisation if used."""
        if not self.double_quant:
            return self.absmax.float()
        n_blocks = self.absmax.numel()
        centred = _tables(self.device).dynamic[self.absmax.long()]
        centred = F.pad(centred, (0, -n_blocks % DOUBLE_QUANT_BLOCK_SIZE)).view(-1, DOUBLE_QUANT_BLOCK_SIZE)
        centred = centred * self.absmax_scale.float()[:, None]
        return centred.reshape(-1)[:n_blocks] + self.absmax_offset.float()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """See :func:`nf4_dequantize`."""
        return nf4_dequantize(self, dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (safetensors- and buffer-friendly); metadata as int64 tensors."""
        state = {"codes": self.codes, "absmax": self.absmax}
        if self.double_quant:
            state.update(absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset)
        state["shape"] = torch.tensor(list(self.shape), dtype=torch.int64)
        state["block_size"] = torch.tensor(self.block_size, dtype=torch.int64)
        state["dtype"] = torch.tensor(NF4_FLOAT_DTYPES.index(self.dtype), dtype=torch.int64)
        state["compute_dtype"] = torch.tensor(NF4_FLOAT_DTYPES.index(self.compute_dtype), dtype=torch.int64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "NF4Tensor":
        """Rebuild from :meth:`state_dict` output (tensors may live on any device).

        Float scales are cast back to fp32, so a module ``.to(torch.bfloat16)`` that cast its
        buffers does not change the stored dtype (it may have rounded them, though).

        Raises:
            ValueError: a required key is missing.
        """
        required = ["codes", "absmax", "shape", "block_size", "dtype", "compute_dtype"]
        missing = [k for k in required if k not in state]
        if ("absmax_scale" in state) != ("absmax_offset" in state):
            missing.append("absmax_offset" if "absmax_scale" in state else "absmax_scale")
        if missing:
            raise ValueError(f"NF4 state_dict is missing keys {missing}; it has {sorted(state)}")
        double = "absmax_scale" in state
        absmax = state["absmax"] if double else state["absmax"].float()
        return cls(
            codes=state["codes"], absmax=absmax,
            absmax_scale=state["absmax_scale"].float() if double else None,
            absmax_offset=state["absmax_offset"].float() if double else None,
            shape=torch.Size(state["shape"].tolist()), dtype=NF4_FLOAT_DTYPES[int(state["dtype"])],
            block_size=int(state["block_size"]), compute_dtype=NF4_FLOAT_DTYPES[int(state["compute_dtype"])],
        )  # fmt: skip

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, device={self.device}, nbytes={self.nbytes})")  # fmt: skip


def _check_float_dtype(name: str, dtype) -> None:
    if dtype not in NF4_FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {list(NF4_FLOAT_DTYPES)}, got {dtype!r}")


def _check_block_size(shape: torch.Size, block_size) -> None:
    row = shape[-1]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or row % block_size:
        suggestion = max(b for b in (1, 2, 4, 8, 16, 32, 64) if row % b == 0)
        raise ValueError(
            f"block_size must be a positive int dividing the row length {row} (the last dim of "
            f"shape {tuple(shape)}), got {block_size!r}; e.g. block_size={suggestion}"
        )


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 scales -> (uint8 map indices, fp32 per-256 scales, fp32 mean offset)."""
    offset = absmax.mean()
    centred = absmax - offset
    pad = -centred.numel() % DOUBLE_QUANT_BLOCK_SIZE  # zero padding leaves each block's max intact
    blocks = F.pad(centred, (0, pad)).view(-1, DOUBLE_QUANT_BLOCK_SIZE)
    scale = blocks.abs().amax(dim=1)
    # A block of identical maxima centres to zeros: divide by 1 instead of 0, codes land on 0.0.
    scaled = blocks / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    codes = _nearest_index(scaled, _tables(absmax.device).dynamic_midpoints).reshape(-1)[: absmax.numel()]
    return codes, scale, offset


def nf4_quantize(
    w: torch.Tensor,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
) -> NF4Tensor:
    """Quantise a float tensor to NF4 in blocks of ``block_size`` consecutive elements.

    Args:
        w: float32/float16/bfloat16 tensor of any shape ``(..., row)``, at least 1-D.
        block_size: elements per absmax block; must divide the row length ``w.shape[-1]`` so
            that no block straddles two rows.
        double_quant: also quantise the block scales to 8 bits (QLoRA section 3).
        compute_dtype: dtype that dequantisation returns by default; defaults to ``w.dtype``.

    Returns:
        An :class:`NF4Tensor` on ``w.device``.

    Raises:
        TypeError: ``w`` is not a float tensor, ``double_quant`` not a bool, or a bad ``compute_dtype``.
        ValueError: bad ``block_size``, an empty or 0-d ``w``, or non-finite values in ``w``.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    _check_float_dtype("w.dtype", w.dtype)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    compute_dtype = w.dtype if compute_dtype is None else compute_dtype
    _check_float_dtype("compute_dtype", compute_dtype)
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError(f"w must have at least 1 dimension and 1 element, got shape {tuple(w.shape)}")
    _check_block_size(w.shape, block_size)
    n_blocks = w.numel() // block_size
    blocks = w.detach().reshape(n_blocks, block_size)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    indices = torch.empty(n_blocks, block_size, dtype=torch.uint8, device=w.device)
    step = max(1, chunk_elements(w.device) // block_size)
    for start in range(0, n_blocks, step):  # chunked so fp32 temporaries stay small
        chunk = blocks[start : start + step].float().contiguous()  # a transposed weight: bucketize wants rows
        chunk_max = chunk.abs().amax(dim=1)
        absmax[start : start + step] = chunk_max
        # An all-zero block has absmax 0: divide by 1 so its codes are the exact 0.0, not NaN.
        scaled = chunk / torch.where(chunk_max > 0, chunk_max, torch.ones_like(chunk_max))[:, None]
        indices[start : start + step] = _nearest_index(scaled, _tables(w.device).nf4_midpoints)
    if not torch.isfinite(absmax).all():
        raise ValueError("w contains inf or NaN; NF4 can only store finite values")
    flat = F.pad(indices.view(-1), (0, w.numel() % 2))  # an odd count gets a zero low nibble
    codes = (flat[0::2] << 4) | flat[1::2]
    scale = offset = None
    if double_quant:
        absmax, scale, offset = _double_quantize(absmax)
    logger.debug("NF4-quantised %s (%s) in blocks of %d", tuple(w.shape), w.dtype, block_size)
    return NF4Tensor(codes, absmax, scale, offset, w.shape, w.dtype, block_size, compute_dtype)


def nf4_empty(
    shape,
    dtype: torch.dtype,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    device=None,
) -> NF4Tensor:
    """An uninitialised :class:`NF4Tensor` with the storage :func:`nf4_quantize` would produce.

    For model skeletons (``device="meta"``) that get their 4-bit weights later, one layer at a time.

    Args:
        shape: shape of the dense weight ``(..., row)``.
        dtype: the dense weight's dtype (float32/float16/bfloat16).
        block_size, double_quant, compute_dtype: as :func:`nf4_quantize`.
        device: where the storage lives.

    Raises:
        TypeError / ValueError: as :func:`nf4_quantize`, for the same arguments.
    """
    shape = torch.Size(shape)
    _check_float_dtype("dtype", dtype)
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    _check_float_dtype("compute_dtype", compute_dtype)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if len(shape) == 0 or shape.numel() == 0:
        raise ValueError(f"shape must have at least 1 dimension and 1 element, got {tuple(shape)}")
    _check_block_size(shape, block_size)
    numel, n_blocks = shape.numel(), shape.numel() // block_size
    codes = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=device)
    if double_quant:
        n_scales = -(-n_blocks // DOUBLE_QUANT_BLOCK_SIZE)
        absmax = torch.empty(n_blocks, dtype=torch.uint8, device=device)
        scale = torch.empty(n_scales, dtype=torch.float32, device=device)
        offset = torch.empty((), dtype=torch.float32, device=device)
    else:
        absmax, scale, offset = torch.empty(n_blocks, dtype=torch.float32, device=device), None, None
    return NF4Tensor(codes, absmax, scale, offset, shape, dtype, block_size, compute_dtype)


def nf4_dequantize(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rebuild the dense tensor on ``q``'s device: ``code[index] * block_absmax`` in fp32, then cast.

    Per chunk of blocks: one gather of 8-byte words from a 256-entry table (each byte of codes
    gives both of its fp32 code book values at once), one in-place fp32 multiply by the block
    scales, and (for a 16-bit ``dtype``) one cast into the output. The fp32 product is rounded
    once into ``dtype``, as bitsandbytes does, so results are bit-identical to
    ``(code[index] * absmax).to(dtype)``.

    Args:
        q: an :class:`NF4Tensor`.
        dtype: result dtype; defaults to ``q.compute_dtype``.

    Returns:
        Tensor of shape ``q.shape``.

    Raises:
        TypeError: ``q`` is not an NF4Tensor or ``dtype`` is not a float dtype.
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q must be an NF4Tensor, got {type(q).__name__}")
    dtype = q.compute_dtype if dtype is None else dtype
    _check_float_dtype("dtype", dtype)
    absmax = q.block_absmax()
    words = _tables(q.device).pair_words
    n_blocks, size = absmax.numel(), q.block_size
    total = n_blocks * size
    # One spare element for an odd count, so every chunk is a whole number of 8-byte pairs.
    out = torch.empty(total + total % 2, dtype=dtype, device=q.device)
    step = max(2, (chunk_elements(q.device) // size) & ~1)  # even block count: each chunk starts on a byte
    scratch = None
    if dtype != torch.float32:  # fp32 staging buffer, reused by every chunk
        scratch = torch.empty(min(step * size, out.numel()), dtype=torch.float32, device=q.device)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        first, last = start * size, stop * size
        byte_index = q.codes[first // 2 : (last + 1) // 2].int()
        n_pairs = byte_index.numel()
        values = out[first : first + 2 * n_pairs] if scratch is None else scratch[: 2 * n_pairs]
        torch.index_select(words, 0, byte_index, out=values.view(torch.int64))  # (elements,) fp32
        values = values[: last - first].view(stop - start, size)
        values.mul_(absmax[start:stop, None])  # the fp32 product, in place
        if scratch is not None:
            out[first:last].view(stop - start, size).copy_(values)  # rounded once into dtype
    return out[:total].view(q.shape)


def decode_pairs(byte_index: torch.Tensor) -> torch.Tensor:
    """The fp32 code book values of packed NF4 bytes, both nibbles at once (high first).

    Args:
        byte_index: int32 ``(n,)`` indices of packed code bytes.

    Returns:
        fp32 ``(2 * n,)``: the unscaled values, in element order.
    """
    return torch.index_select(_tables(byte_index.device).pair_words, 0, byte_index).view(torch.float32)

