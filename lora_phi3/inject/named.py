"""Several named adapters in one model: add, switch, delete, and batches that mix them.

PEFT's names and behaviour: :func:`inject_lora` creates the first adapter (``adapter_name``,
default ``"default"``); :func:`add_adapter` adds another, with its own targets, rank, alpha,
dropout and variant; :func:`set_adapter` chooses the one the model computes with (and trains: only
the active adapter's parameters require grad); :func:`delete_adapter` frees one;
:func:`mixed_batch` runs a batch whose rows use different adapters (or None, the base model).
Each layer keeps its active adapter where a single-adapter layer keeps it and the others under
``lora_adapters.<name>`` (:mod:`lora_phi3.layers.named`), so a model with one adapter keeps its
keys, files and loralib compatibility exactly, and merging merges the active adapter only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from . import phi3
from ..config import LoraConfig
from ..layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from ..layers.base import is_data_init
from ..layers.named import activate, adapter_names as layer_adapter_names, delete_stored, store_adapter
from .factory import lora_kwargs, make_lora_module, quantized_check
from .injector import (ACTIVE_ATTR, ADAPTERS_ATTR, CONFIG_ATTR, _paths, _replace,
                       check_adapter_name, get_lora_config)
from .matching import SliceSpec, plan_targets

__all__ = ["add_adapter", "set_adapter", "delete_adapter", "mixed_batch", "active_adapter",
           "adapter_names", "using_adapter"]


def _all_lora_layers(model: nn.Module) -> list[LoRALayer]:
    """Every LoRA layer, with or without the active adapter (shared ones once)."""
    return list({id(m): m for m in model.modules() if isinstance(m, LoRALayer)}.values())


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    configs = getattr(model, ADAPTERS_ATTR, None)
    if configs is None:  # injected before named adapters existed: its one adapter is "default"
        config = get_lora_config(model)
        configs = {} if config is None else {"default": config}
    return configs


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(_configs(model))


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter the model computes with (None without adapters)."""
    if not _configs(model):
        return None
    return getattr(model, ACTIVE_ATTR, "default")


def _require(model: nn.Module, name: object, what: str) -> str:
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{what}: the model has no adapter; call inject_lora(model, config) first")
    if name not in names:
        raise ValueError(f"{what}: unknown adapter {name!r}; the model has {names}")
    return name  # type: ignore[return-value]


def _refuse_merged(model: nn.Module, what: str) -> None:
    merged = [type(m).__name__ for m in _all_lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"{what}: {len(merged)} layers are merged with adapter "
                         f"{active_adapter(model)!r}; unmerge_lora(model) first")


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Compute (and train) with adapter ``adapter_name``; the others are kept, frozen.

    Layers the adapter does not target compute their base function. ``disable_lora`` still gives
    the base model, and merging merges this adapter only.

    Raises:
        ValueError: an unknown name, or merged layers (unmerge first); the model is unchanged.
    """
    _require(model, adapter_name, "set_adapter")
    _refuse_merged(model, "set_adapter")
    for layer in _all_lora_layers(model):
        activate(layer, adapter_name)
        for p in layer.adapter_params().values():
            p.requires_grad_(True)
        stored = layer._modules.get("lora_adapters")
        for p in stored.parameters() if stored is not None else ():
            p.requires_grad_(False)
    setattr(model, CONFIG_ATTR, _configs(model)[adapter_name])
    setattr(model, ACTIVE_ATTR, adapter_name)
    return model


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter_name: str | None) -> Iterator[nn.Module]:
    """Context with ``adapter_name`` active (None: leave the active one), restored on exit."""
    if adapter_name is None or adapter_name == active_adapter(model):
        yield model
        return
    previous = active_adapter(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    set_adapter(model, adapter_name)
    try:
        yield model
    finally:
        set_adapter(model, previous)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))


def _sibling(layer: LoRALayer, name: str, config: LoraConfig, spec: SliceSpec | None) -> LoRALayer:
    """A LoRA layer of ``layer``'s kind over the same (shared) base, holding only the new adapter."""
    kw = lora_kwargs(config, layer)
    if isinstance(layer, (Linear, MergedLinear)):
        slices: dict[str, Any] = {}
        if isinstance(layer, MergedLinear):
            enable = spec.enable_lora if spec is not None else [True] * len(layer.split_sizes)
            slices = dict(enable_lora=enable, split_sizes=list(layer.split_sizes))
        elif spec is not None:
            raise ValueError(f"add_adapter: {name} holds a whole-module adapter (Linear); a "
                             "per-slice adapter needs the fused MergedLinear layer")
        common = dict(lora_dropout=config.lora_dropout, fan_in_fan_out=layer.fan_in_fan_out,
                      **slices, **kw)
        if layer.weight is None:  # a quantized base, shared as it is
            return type(layer).with_base(layer.quantized_weight, layer.bias, **common)
        return type(layer).from_linear(layer, **common)
    if isinstance(layer, Embedding):
        return Embedding.from_embedding(layer, **kw)
    if isinstance(layer, (Conv1d, Conv2d, Conv3d)):
        extra = {"lora_layout": layer.lora_layout} if hasattr(layer, "lora_layout") else {}
        return type(layer).from_conv(layer, lora_dropout=config.lora_dropout, **extra, **kw)
    raise ValueError(f"add_adapter: {name} is a {type(layer).__name__}, which holds one adapter only")


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Add adapter ``adapter_name`` with ``config`` (any targets, rank, alpha, dropout, variant).

    It starts inactive (and frozen); :func:`set_adapter` makes it the one the model computes with.
    The base weights are shared by all adapters, so the config cannot change them: PiSSA/OLoRA
    (which rewrite the base), another ``quantize_base``, ``modules_to_save`` and trained biases are
    refused.

    Raises:
        ValueError: an existing or malformed name, no adapter yet, merged layers, a refused
            setting, or a target that matches nothing; the model is then unchanged.
    """
    check_adapter_name(adapter_name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_adapter needs a LoraConfig, got {type(config).__name__}")
    configs = _configs(model)
    if not configs:
        raise ValueError("add_adapter: the model has no adapter yet; inject_lora(model, config, "
                         "adapter_name=...) creates the first")
    if adapter_name in configs:
        raise ValueError(f"add_adapter: the model already has an adapter {adapter_name!r} "
                         f"(adapters: {list(configs)}); delete_adapter it first or load_adapter "
                         "into it")
    first = next(iter(configs.values()))
    for field, value, allowed in (
            ("init_lora_weights", is_data_init(config.init_lora_weights), False),
            ("quantize_base", config.quantize_base, first.quantize_base),
            ("modules_to_save", config.modules_to_save, None), ("bias", config.bias, "none")):
        if value != allowed:
            raise ValueError(f"add_adapter: LoraConfig.{field}={getattr(config, field)!r} is not "
                             f"allowed for a second adapter (the base is shared by all adapters; "
                             f"allowed: {allowed!r})")
    _refuse_merged(model, "add_adapter")
    residual = [type(m).__name__ for m in _all_lora_layers(model)
                if is_data_init(getattr(m, "init_lora_weights", True))]
    if residual:
        raise ValueError(f"add_adapter: adapter {next(iter(configs))!r} was initialised with "
                         f"{first.init_lora_weights!r}, so {len(residual)} base weights are its "
                         "residuals, which another adapter must not compute with; save it (it is "
                         "written for the original weights) and add adapters to a fresh model")
    targets = config.target_modules
    if targets is None:
        if not phi3.is_phi3(model):
            raise ValueError("add_adapter: LoraConfig.target_modules is None, which only has a "
                             f"default for Phi-3, not {type(model).__name__}")
        targets = list(phi3.DEFAULT_TARGETS)
    config = dataclasses.replace(config, target_modules=targets)
    plan = plan_targets(model, config, targets)
    check = quantized_check(config)
    # Build everything first: a refusal leaves the model as it was.
    built: list[tuple[str, nn.Module, LoRALayer]] = []
    for name, spec in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRALayer):
            built.append((name, module, _sibling(module, name, config, spec)))
        elif check is not None:
            check(module, name)
    current = active_adapter(model)
    for name, layer, sibling in built:
        sibling.active_adapter = adapter_name
        store_adapter(layer, adapter_name, sibling)
    paths = _paths(model)
    for name, spec in plan.items():
        module = model.get_submodule(name)
        if isinstance(module, LoRALayer):
            continue
        new = make_lora_module(module, name, config, spec)
        new.active_adapter = adapter_name
        activate(new, current)  # the new adapter is stored; the layer computes its base
        for path in paths[id(module)]:
            _replace(model, path, new)
    for layer in _all_lora_layers(model):
        stored = layer._modules.get("lora_adapters")
        for p in stored.parameters() if stored is not None else ():
            p.requires_grad_(False)
    setattr(model, ADAPTERS_ATTR, {**configs, adapter_name: config})
    setattr(model, ACTIVE_ATTR, current)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Delete a stored adapter and free its parameters.

    Raises:
        ValueError: an unknown name, or the active adapter (set_adapter to another first).
    """
    _require(model, adapter_name, "delete_adapter")
    if adapter_name == active_adapter(model):
        raise ValueError(f"delete_adapter: {adapter_name!r} is the active adapter; "
                         "set_adapter(model, another) first")
    for layer in _all_lora_layers(model):
        delete_stored(layer, adapter_name)
    configs = dict(_configs(model))
    del configs[adapter_name]
    setattr(model, ADAPTERS_ATTR, configs)
    return model


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Context in which row ``i`` of every batch uses adapter ``adapter_names[i]`` (None: the base).

    Each row gets the output it would get with its adapter active alone; the rows are grouped per
    adapter, so a layer runs once per distinct adapter, not once per row. It holds under
    ``model.generate(...)`` (the batch keeps its rows; beam search, which multiplies them, does not
    fit).

    Raises:
        ValueError: an empty list, an unknown name, or merged layers (here); a batch whose row
            count differs from ``len(adapter_names)`` (in the forward). The model is unchanged.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise ValueError(f"mixed_batch needs a non-empty list of adapter names (or None), one per "
                         f"row, got {adapter_names!r}")
    known = list(_configs(model))
    unknown = sorted({repr(n) for n in adapter_names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"mixed_batch: unknown adapter(s) {', '.join(unknown)}; the model has "
                         f"{known} (None means the base model)")
    _refuse_merged(model, "mixed_batch")
    names = list(adapter_names)
    order = list(dict.fromkeys(names))
    groups = [(n, torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long))
              for n in order]
    layers = _all_lora_layers(model)
    for layer in layers:
        layer.mixed_groups = (names, groups)
    try:
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("mixed_groups", None)
