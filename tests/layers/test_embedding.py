"""Embedding against a dense reference table ``W + s * (B @ A).T``."""

import torch
import torch.nn as nn

import lora_phi3 as lora
from tiny import randomize_lora


# ---------------------------------------------------------------- Embedding
def test_embedding_matches_dense_reference():
    torch.manual_seed(0)
    layer = lora.Embedding(15, 6, r=3, lora_alpha=6, padding_idx=0)
    assert layer.lora_A.shape == (3, 15) and layer.lora_B.shape == (6, 3)
    assert torch.count_nonzero(layer.lora_A) == 0  # loralib: A zeros, B normal
    randomize_lora(layer, 1, scale=0.5)
    ids = torch.randint(0, 15, (3, 4))
    table = layer.weight + 2.0 * (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(ids), table[ids], atol=1e-5, rtol=1e-5)


def test_from_embedding_shares_table():
    base = nn.Embedding(9, 4, padding_idx=1)
    layer = lora.Embedding.from_embedding(base, r=2)
    assert layer.weight.data_ptr() == base.weight.data_ptr() and layer.padding_idx == 1
