"""The slice iterator: where each adapted slice's A/B blocks sit in the stacked tensors."""

import torch

import lora_phi3 as lora
from lora_phi3.layers import LoraSlice, iter_slices
from tiny import randomize_lora


def test_iter_slices_lays_out_the_stacked_blocks():
    # q, k, v of a GQA qkv_proj (sizes 8, 2, 2) with q and v adapted at rank 3
    assert list(iter_slices([(0, 8), (10, 2)], r=3)) == [
        LoraSlice(0, 8, slice(0, 3), slice(0, 8)),
        LoraSlice(10, 2, slice(3, 6), slice(8, 10)),
    ]
    assert LoraSlice(10, 2, slice(3, 6), slice(8, 10)).out_rows == slice(10, 12)
    assert list(iter_slices([], r=3)) == []


def test_a_layers_slices_rebuild_its_delta_weight():
    layer = lora.MergedLinear(6, 12, r=2, lora_alpha=4, enable_lora=[False, True, True],
                              split_sizes=[4, 5, 3])
    randomize_lora(layer, 1)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    delta = torch.zeros(12, 6)  # written out: rows 4..9 get B[0:5] @ A[0:2], rows 9..12 B[5:8] @ A[2:4]
    delta[4:9] = B[0:5] @ A[0:2]
    delta[9:12] = B[5:8] @ A[2:4]
    assert [(s.start, s.size) for s in layer.iter_slices()] == [(4, 5), (9, 3)]
    from_slices = torch.zeros(12, 6)
    for s in layer.iter_slices():
        from_slices[s.out_rows] = B[s.b_rows] @ A[s.a_rows]
    torch.testing.assert_close(from_slices, delta, rtol=0, atol=0)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * delta)
    single = lora.Linear(6, 4, r=2)
    assert list(single.iter_slices()) == [LoraSlice(0, 4, slice(0, 2), slice(0, 4))]
