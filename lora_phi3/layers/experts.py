"""LoRA on the 3-D expert weights of transformers' mixture-of-experts modules (Phi-3.5-MoE).

:class:`LoRAExperts` is the :class:`~.param_lora.LoRAParameters` host for an experts module whose
``gate_up_proj`` ``(E, 2I, H)`` and/or ``down_proj`` ``(E, H, I)`` carry
:class:`~.param_lora.ParamLoRA` adapters. Its forward is transformers' eager experts loop with each
adapter added in rank-r space to the tokens routed to its expert:

    h_e = x @ W_gu[e]^T + s * (x @ A_gu[:, e]^T) @ B_gu[:, :, e]^T      # (n, 2I)
    y_e = (act(h_e[:, :I]) * h_e[:, I:]) @ W_d[e]^T + s * (...) @ ...    # (n, H)

so no dense per-expert ``W_e + s * B_e @ A_e`` is formed (merge forms it, as merge does).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .param_lora import LoRAParameters

__all__ = ["LoRAExperts", "is_experts_module"]


def is_experts_module(module: nn.Module) -> bool:
    """True for transformers' experts modules whose loop :class:`LoRAExperts` re-implements:
    ``gate_up_proj`` ``(E, 2I, H)`` (gate rows first), ``down_proj`` ``(E, H, I)``, ``act_fn``, no
    biases, no post-expert norm, not transposed (Phi-3.5-MoE, and the Mixtral family)."""
    gate_up, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    return (gate_up is not None and down is not None and gate_up.dim() == down.dim() == 3
            and gate_up.shape[0] == down.shape[0] == getattr(module, "num_experts", None)
            and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
            and getattr(module, "has_gate", None) is True
            and getattr(module, "is_concatenated", None) is True
            and getattr(module, "is_transposed", None) is False
            and getattr(module, "has_bias", None) is False
            and not getattr(module, "has_post_expert_norm", False)
            and isinstance(getattr(module, "act_fn", None), nn.Module))


class LoRAExperts(LoRAParameters):
    """Hosts adapters on a transformers experts module's ``gate_up_proj`` and/or ``down_proj``.

    With an active adapter it runs transformers' eager experts loop (the routing inputs, the
    activation ``act_fn(gate) * up`` and the accumulation of the original) and adds each adapter in
    rank-r space, expert by expert, to that expert's routed tokens only. Without one (disabled,
    merged, another adapter active) it runs the module's own forward, whatever
    ``config._experts_implementation`` selects.

    Raises:
        ValueError: ``module`` is not such an experts module (see :func:`is_experts_module`), or
            the :class:`LoRAParameters` refusals.
    """

    def __init__(self, module: nn.Module, parameter_names: Iterable[str], **lora_kwargs: Any) -> None:
        if not is_experts_module(module):
            raise ValueError(f"LoRAExperts needs a transformers experts module with gate_up_proj "
                             f"(E, 2I, H), down_proj (E, H, I) and a gated act_fn; "
                             f"{type(module).__name__} is not one")
        super().__init__(module, parameter_names, **lora_kwargs)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states ``(T, H)``, top_k_index and top_k_weights ``(T, k)`` -> ``(T, H)``."""
        adapters = self.active_adapters()
        if not adapters:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        gate_up, down = adapters.get("gate_up_proj"), adapters.get("down_proj")
        num_experts = self.gate_up_proj.shape[0]
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)  # (E+1, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            if expert == num_experts:  # transformers' sentinel for tokens routed elsewhere
                continue
            top_k_pos, token_idx = torch.where(mask[expert])
            x = hidden_states[token_idx]  # (n, H)
            h = F.linear(x, self.gate_up_proj[expert])  # (n, 2I)
            if gate_up is not None:
                h = h + gate_up.lora_update(x, expert)
            gate, up = h.chunk(2, dim=-1)
            h = self.act_fn(gate) * up  # (n, I)
            out = F.linear(h, self.down_proj[expert])  # (n, H)
            if down is not None:
                out = out + down.lora_update(h, expert)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final
