"""Optimizer parameter groups for LoRA variants: LoRA+ (Hayou et al. 2024, arXiv:2402.12354).

LoRA+ trains ``B`` with a learning rate ``ratio`` times that of ``A``. The groups built here mirror
PEFT's ``peft.optimizers.create_loraplus_optimizer`` (PEFT 0.21) group for group, so a recipe moves
between the two libraries unchanged; the rules are listed in :func:`lora_plus_param_groups`.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from .layers import Conv1d, Conv2d, Conv3d, Embedding, LoRALayer, lora_layers

__all__ = ["lora_plus_param_groups", "LORAPLUS_GROUPS"]

#: The group names, in PEFT's order (each group dict carries its name under ``"name"``).
LORAPLUS_GROUPS = ("groupA", "embedding", "groupB", "groupB_no_decay")


def _check_number(name: str, value: Any, allowed: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not ok(value):
        raise ValueError(f"lora_plus_param_groups: {name} must be a finite number {allowed}, "
                         f"got {value!r}")
    return float(value)


def _in_layernorm(model: nn.Module) -> set[str]:
    """Qualified names of the modules strictly below the root that are ``nn.LayerNorm``.

    transformers' ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` (``ALL_LAYERNORM_LAYERS`` is
    ``[nn.LayerNorm]``), which PEFT uses for its weight-decay set, leaves out every parameter at or
    below such a module; RMSNorm (Phi-3's) is not a LayerNorm there, so it is not here either.
    """
    return {n for n, m in model.named_modules() if n and isinstance(m, nn.LayerNorm)}


def _role(layer: LoRALayer, attr: str, param: nn.Parameter) -> str:
    """``"A"``, ``"B"`` or ``"embedding"`` for an adapter parameter declared by ``layer``."""
    kind = attr.split(".")[0]
    if isinstance(layer, Embedding) and kind in ("lora_A", "lora_B"):
        return "embedding"  # PEFT: lora_embedding_A/B sit directly under its lora.Embedding
    if kind == "lora_B":
        return "B"
    if kind == "lora_A":
        return "A"
    # Hook for new adapter parameters (a DoRA magnitude vector, lora_bias, ...): PEFT decides by
    # shape, so a 1-D one (DoRA's magnitude, also on an embedding; lora_B's bias) goes with B at
    # ratio * lr, anything else with A at lr. A conv's DoRA magnitude is 1-D here but
    # (1, out, 1, ...) in PEFT, which puts it with A: we follow PEFT, in this one place.
    if kind == "lora_magnitude" and isinstance(layer, (Conv1d, Conv2d, Conv3d)):
        return "A"
    return "B" if param.ndim == 1 else "A"


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                           weight_decay: float = 0.0, *,
                           lr_embedding: float = 1e-6) -> list[dict[str, Any]]:
    """LoRA+ optimizer parameter groups over ``model``'s trainable parameters.

    Why ``B`` gets a larger learning rate: with one learning rate for ``A`` and ``B``, LoRA does
    not learn features efficiently at large width (Hayou et al. 2024, section 3 on a toy model,
    section 4 in the infinite-width limit, where efficient learning needs ``lr_B / lr_A`` to grow
    with the width); their experiments (section 5) find a ratio around ``2**4 = 16`` a good
    default. Pass the groups to any torch
    optimizer: ``torch.optim.AdamW(lora_plus_param_groups(model, lr=2e-4))``. A scheduler such as
    ``LambdaLR`` scales every group's lr by the same factor, so the ratio holds throughout.

    The groups are PEFT's (``create_loraplus_optimizer``, mirrored rule for rule; empty groups are
    left out, which changes no update):

    - ``"groupA"`` at ``lr``, ``weight_decay``: every ``lora_A``, and every other trainable
      parameter that is not 1-D (e.g. the weights of ``modules_to_save``);
    - ``"embedding"`` at ``lr_embedding`` (PEFT's ``loraplus_lr_embedding``, default ``1e-6``, not
      scaled by ``lr``), ``weight_decay``: ``lora_A`` and ``lora_B`` of each :class:`lora.Embedding`
      and its table, if trainable;
    - ``"groupB"`` at ``ratio * lr``, ``weight_decay``: every ``lora_B``, and every trainable 1-D
      parameter (a bias, a norm's weight) that would be decayed: not inside an ``nn.LayerNorm``
      and without ``"bias"`` in its name (e.g. an RMSNorm weight in ``modules_to_save``);
    - ``"groupB_no_decay"`` at ``ratio * lr``, weight decay 0: the other trainable 1-D
      parameters: biases (``bias="lora_only"``/``"all"``) and LayerNorm weights.

    Adapter parameters are the ones each LoRA layer declares (``LoRALayer.adapter_params()``).
    Each group is ``{"params", "lr", "weight_decay", "name"}``; frozen parameters are left out.

    Args:
        model: a model holding LoRA layers with trainable adapters.
        lr: the learning rate of ``A`` (> 0).
        ratio: ``lr_B / lr_A`` (> 0, finite; PEFT's ``loraplus_lr_ratio``).
        weight_decay: decoupled weight decay of the decayed groups (>= 0; PEFT's
            ``loraplus_weight_decay``).
        lr_embedding: the learning rate of embedding adapters (> 0; PEFT's
            ``loraplus_lr_embedding``).

    Raises:
        ValueError: a bad ``lr``, ``ratio``, ``weight_decay`` or ``lr_embedding`` (named, with the
            value and what is allowed), or no trainable adapter parameter in ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lora_plus_param_groups needs an nn.Module, got {type(model).__name__}")
    lr = _check_number("lr", lr, "> 0", lambda v: v > 0)
    ratio = _check_number("ratio", ratio, "> 0", lambda v: v > 0)
    weight_decay = _check_number("weight_decay", weight_decay, ">= 0", lambda v: v >= 0)
    lr_embedding = _check_number("lr_embedding", lr_embedding, "> 0", lambda v: v > 0)

    roles: dict[int, str] = {}
    for layer in lora_layers(model).values():
        for attr, p in layer.adapter_params().items():
            roles[id(p)] = _role(layer, attr, p)
    adapter = set(roles)
    for layer in lora_layers(model).values():
        table = layer._parameters.get("weight")
        if isinstance(layer, Embedding) and table is not None:
            roles.setdefault(id(table), "embedding")  # PEFT: base_layer.weight of its Embedding
    if not any(p.requires_grad and id(p) in adapter for p in model.parameters()):
        raise ValueError(f"lora_plus_param_groups: {type(model).__name__} has no trainable LoRA "
                         "adapter parameter (inject_lora, or LoRA layers with r > 0 and "
                         "mark_only_lora_as_trainable)")

    layernorms = _in_layernorm(model)
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in LORAPLUS_GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = roles.get(id(p))
        if role == "embedding":
            groups["embedding"].append(p)
        elif role == "B" or (role is None and p.ndim == 1):
            parents = name.split(".")[:-1]
            in_norm = any(".".join(parents[:i]) in layernorms for i in range(1, len(parents) + 1))
            decayed = not in_norm and "bias" not in name  # PEFT's decay set, name rule included
            groups["groupB" if decayed else "groupB_no_decay"].append(p)
        else:
            groups["groupA"].append(p)

    settings = {"groupA": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
                "groupB": (ratio * lr, weight_decay), "groupB_no_decay": (ratio * lr, 0.0)}
    return [{"params": groups[g], "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
            for g in LORAPLUS_GROUPS if groups[g]]
