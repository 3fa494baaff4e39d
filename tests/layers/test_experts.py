"""``LoRAExperts``: LoRA on the 3-D expert weights of a transformers MoE experts module, against the
original module (B = 0, exactly) and a dense reference written expert by expert."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PhimoeConfig
from transformers.models.phimoe.modeling_phimoe import PhimoeExperts

from lora_phi3.layers import LoRAExperts

E, H, I, R, ALPHA = 4, 32, 48, 2, 6  # experts, hidden, intermediate, rank, alpha: s = 3
S = ALPHA / R


def experts(implementation: str = "eager") -> PhimoeExperts:
    torch.manual_seed(0)
    config = PhimoeConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)
    config._experts_implementation = implementation
    module = PhimoeExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(std=0.2)
        module.down_proj.normal_(std=0.2)
    return module.eval()


def routing(tokens: int = 10, top_k: int = 2, seed: int = 1):
    """``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``, every expert used."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return hidden, index, weights


def randomize(host: nn.Module, seed: int = 2) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in host.param_lora.values():
            lora.lora_A.copy_(torch.randn(lora.lora_A.shape, generator=g) * 0.2)
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.2)
    return host


def lora_experts(names=("gate_up_proj", "down_proj"), implementation="eager") -> LoRAExperts:
    return LoRAExperts(experts(implementation), names, r=R, lora_alpha=ALPHA)


def dense_experts_reference(module: PhimoeExperts, host: LoRAExperts, hidden, index, weights):
    """Token by token, each of its experts with ``W_e + s * B_e @ A_e``, written plainly."""
    def weight(name: str, e: int) -> torch.Tensor:
        W = getattr(module, name)[e]
        lora = host.param_lora[name] if name in host.param_lora else None
        return W if lora is None else W + S * lora.lora_B[:, :, e] @ lora.lora_A[:, e]

    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            gate, up = (hidden[t] @ weight("gate_up_proj", e).T).chunk(2)
            out[t] += weights[t, k] * ((F.silu(gate) * up) @ weight("down_proj", e).T)
    return out


# -- the experts host --------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_experts_with_b_zero_equal_the_original_module_exactly(implementation):
    module, host = experts(implementation), lora_experts(implementation=implementation)
    hidden, index, weights = routing()
    with torch.no_grad():
        assert host.param_lora["gate_up_proj"].lora_active  # the LoRA path runs, adding zeros
        assert torch.equal(host(hidden, index, weights), module(hidden, index, weights))


@pytest.mark.parametrize("names", [("gate_up_proj", "down_proj"), ("gate_up_proj",), ("down_proj",)])
def test_experts_against_a_dense_reference_per_expert(names):
    module, host = experts(), randomize(lora_experts(names))
    hidden, index, weights = routing()
    with torch.no_grad():
        got = host(hidden, index, weights)
        want = dense_experts_reference(module, host, hidden, index, weights)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, module(hidden, index, weights), atol=1e-3)


def test_experts_gradients_reach_only_the_adapters():
    host = randomize(lora_experts())
    host.gate_up_proj.requires_grad_(False)
    host.down_proj.requires_grad_(False)
    hidden, index, weights = routing()
    host(hidden, index, weights).square().sum().backward()
    for lora in host.param_lora.values():
        assert lora.lora_A.grad is not None and lora.lora_A.grad.abs().sum() > 0
        assert lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0
