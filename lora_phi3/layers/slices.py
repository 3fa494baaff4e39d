"""How a fused projection is split into slices, each with its own ``A_i``/``B_i``: the one iterator.

A :class:`~lora_phi3.layers.MergedLinear` (and a plain ``Linear``, which is the one-slice case)
keeps the adapters of its ``k`` enabled output slices stacked, as loralib does:

- ``lora_A`` ``(r * k, in_features)``: slice ``i`` owns rows ``i*r .. (i+1)*r``;
- ``lora_B`` ``(sum of slice sizes, r)``: slice ``i`` owns the next ``size_i`` rows;
- its update lands in output features ``start_i .. start_i + size_i``.

Every piece of code that walks the slices (the forward, its backward, ``delta_weight``, the PEFT
export, the tests' dense references) asks :func:`iter_slices` for these index ranges.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

__all__ = ["LoraSlice", "iter_slices"]


class LoraSlice(NamedTuple):
    """One adapted slice of a (fused) linear layer's output."""

    start: int  # first output feature the slice's update lands in
    size: int  # number of output features of the slice
    a_rows: slice  # its rows of the stacked lora_A (and its columns of a block-diagonal B)
    b_rows: slice  # its rows of the stacked lora_B

    @property
    def out_rows(self) -> slice:
        """The output features ``start .. start + size`` (rows of an ``(out, in)`` weight)."""
        return slice(self.start, self.start + self.size)


def iter_slices(spans: Sequence[tuple[int, int]], r: int) -> Iterator[LoraSlice]:
    """The :class:`LoraSlice` of each ``(start, size)`` span, in the order of the stacked A/B blocks.

    Args:
        spans: ``(start, size)`` of each enabled output slice (a layer's ``lora_slices``).
        r: the rank of each slice's adapter.

    Yields:
        ``LoraSlice(start, size, a_rows, b_rows)``; e.g. slice ``i``'s update is
        ``B[b_rows] @ A[a_rows]``, of shape ``(size, in_features)``.
    """
    b0 = 0
    for i, (start, size) in enumerate(spans):
        yield LoraSlice(start, size, slice(i * r, (i + 1) * r), slice(b0, b0 + size))
        b0 += size
