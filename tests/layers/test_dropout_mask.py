"""The dropout mask kept as bits between forward and backward."""

import pytest
import torch

from lora_phi3.layers.dropout_mask import pack_mask, unpack_mask


# ------------------------------------------------------------------ mask packing
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 11)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)
