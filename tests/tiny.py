"""Tiny models, dense references and a chat shared by the tests (nothing is downloaded)."""

import torch
import torch.nn as nn
from transformers import Phi3Config, Phi3ForCausalLM

from lora_phi3.inject.injector import inject_lora, lora_modules
from lora_phi3.config import LoraConfig
from lora_phi3.layers.lora_layers import Embedding, MergedLinear

# Grouped-query attention: 8 query heads share 2 key/value heads, so q, k and v differ in size.
TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=96, num_hidden_layers=2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
# Per-slice targets: q and v of qkv_proj, the whole gate_up_proj, o_proj and down_proj.
PER_SLICE = ["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
X = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_config(**overrides) -> Phi3Config:
    """``TINY`` with ``overrides`` (e.g. ``hidden_size=128`` for NF4's block size of 64)."""
    return Phi3Config(**{**TINY, **overrides})


def tiny_phi3(dtype: torch.dtype = torch.float32, seed: int = 0, attn: str | None = None,
              **overrides) -> Phi3ForCausalLM:
    """The one tiny Phi-3 builder of the tests: same base weights for the same seed and overrides."""
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    if attn is not None:
        cfg._attn_implementation = attn
    return Phi3ForCausalLM(cfg).to(dtype).eval()


def randomize(model: nn.Module, seed: int, only=lambda name: True) -> nn.Module:
    """Random values in every trainable tensor (A, a non-zero B, saved modules, biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and only(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def randomize_lora(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Non-zero A and B in every LoRA layer, so every delta is non-zero (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
    return model


def adapted(targets=PER_SLICE, seed=1, **kw) -> Phi3ForCausalLM:
    model = tiny_phi3()
    inject_lora(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **kw}))
    return randomize(model, seed)


def logits(model, ids=X):
    with torch.no_grad():
        return model(ids).logits


def dense_reference(model) -> Phi3ForCausalLM:
    """A plain Phi-3 whose weights are ``W + s * B_i @ A_i`` in every adapted slice, written out
    slice by slice, with the trained non-LoRA tensors (modules_to_save, biases) copied over."""
    ref = tiny_phi3()
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            W, r, s = ref.get_submodule(name).weight, m.r, m.scaling
            if isinstance(m, MergedLinear):
                b0 = 0
                for i, (start, size) in enumerate(m.lora_slices):
                    W[start:start + size] += s * m.lora_B[b0:b0 + size] @ m.lora_A[i * r:(i + 1) * r]
                    b0 += size
            elif isinstance(m, Embedding):
                W += s * (m.lora_B @ m.lora_A).T
            else:
                W += s * m.lora_B @ m.lora_A
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                ref.get_parameter(name).copy_(p)
    return ref


# A two-round conversation with a system prompt (the masking tests write its tokens out by hand).
CONV = [
    {"role": "system", "content": "Answer with the result only."},
    {"role": "user", "content": "Sort: c a b"},
    {"role": "assistant", "content": "a b c"},
    {"role": "user", "content": "Add 2 to that."},
    {"role": "assistant", "content": "5"},
]
