"""QLoRA models as a whole: build one from a dense checkpoint, and merge one back into a dense model.

It lives with the injector, not in :mod:`lora_phi3.quant`, because it works on whole models with
``inject_lora`` and ``merge_and_unload``; :mod:`lora_phi3.quant` holds the 4-bit format and layers,
which the injector builds on.

:func:`load_quantized_model` builds a QLoRA model from a bf16 (or fp32) safetensors checkpoint,
quantising one tensor at a time as it is read; :func:`dequantize_and_merge` is
``merge_and_unload`` for a QLoRA model, one layer at a time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import LoraConfig
from . import injector as inject
from ..layers import LoRALayer
from ..quant.nf4 import NF4_FLOAT_DTYPES
from ..quant.nf4_base import NF4Weight

logger = logging.getLogger(__name__)

__all__ = ["load_quantized_model", "dequantize_and_merge", "quantized_lora_layers"]


# -- model-wide helpers ----------------------------------------------------------------------------
def quantized_lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of ``model`` over an NF4 base, by module path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALayer) and isinstance(getattr(m, "quantized_weight", None), NF4Weight)}


@torch.no_grad()
def dequantize_and_merge(model: nn.Module, safe_merge: bool = True) -> nn.Module:
    """``merge_and_unload`` for a QLoRA model, one layer at a time: a plain dense model.

    Each quantized layer gets its dense merged weight ``dequant(W) + delta`` (compute dtype) and
    drops its 4-bit storage right away, so at most one layer holds both; then
    :func:`~lora_phi3.inject.merge_and_unload` puts the plain modules back. The 4-bit base is never
    rounded into: merging into 4 bits would round the update away.

    Raises:
        ValueError: with ``safe_merge``, a merged weight would hold NaN/Inf (checked for every
            layer before any is changed); or as ``merge_and_unload``.
    """
    inject.check_not_disabled(model, "dequantize_and_merge")
    layers = {n: m for n, m in quantized_lora_layers(model).items() if m.r > 0 and not m.merged}
    if safe_merge:
        # the very weights merge() would store
        bad = [n for n, m in layers.items() if not torch.isfinite(m.merged_weight()).all()]
        if bad:
            raise ValueError(f"safe_merge refused: merged weights would contain NaN or Inf in {bad}; "
                             "no weight was changed")
    for layer in quantized_lora_layers(model).values():
        if layer.r > 0:
            layer.merge()
        elif not layer.merged:  # no adapter: the plain module gets the dequantised base
            layer.weight = nn.Parameter(layer.dense_base_weight(), requires_grad=False)
            layer.merged = True
        layer.quantized_weight = None  # free the 4-bit copy now: the layer is dense from here on
    return inject.merge_and_unload(model, safe_merge=safe_merge)


# -- loading a quantized base from a dense checkpoint ----------------------------------------------
def _checkpoint_dir(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise ValueError(f"{str(name_or_path)!r} is not a directory, and huggingface_hub is not "
                         "installed to fetch it") from None
    keys = ("revision", "cache_dir", "token", "local_files_only")
    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.py"],
                                  **{k: hub_kwargs[k] for k in keys if k in hub_kwargs}))


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{str(directory)!r} holds no *.safetensors checkpoint (load_quantized_model "
                         "reads safetensors only, tensor by tensor); found "
                         f"{sorted(p.name for p in directory.iterdir())[:10]}")
    return shards


_Slot = tuple  # (module, leaf name, is_param): one place a parameter or buffer is held


def _slots(model: nn.Module) -> dict[str, list[_Slot]]:
    """state-dict key -> every slot holding that tensor (a tied weight has several)."""
    by_id: dict[int, list[_Slot]] = {}
    names: dict[str, int] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for leaf, t in table.items():
                if t is None or (not is_param and leaf in module._non_persistent_buffers_set):
                    continue
                slots = by_id.setdefault(id(t), [])
                if not any(m is module and n == leaf for m, n, _ in slots):
                    slots.append((module, leaf, is_param))
                names[f"{mname}.{leaf}" if mname else leaf] = id(t)
    return {key: by_id[i] for key, i in names.items()}


def _held(slot: _Slot) -> torch.Tensor:
    module, leaf, is_param = slot
    return module._parameters[leaf] if is_param else module._buffers[leaf]


def _place(slots: list[_Slot], tensor: torch.Tensor) -> None:
    old = _held(slots[0])
    new = nn.Parameter(tensor, requires_grad=old.requires_grad) if slots[0][2] else tensor
    for module, leaf, is_param in slots:
        (module._parameters if is_param else module._buffers)[leaf] = new


def _load_tensor(key: str, read, layer: LoRALayer | None, slots: list[_Slot] | None) -> None:
    """Read one checkpoint tensor; quantise it into ``layer`` or make it the held tensor."""
    if layer is not None:
        out_in = (layer.out_features, layer.in_features)
        shape = out_in[::-1] if layer.fan_in_fan_out else out_in
        dtype = layer.quantized_weight.dtype
    else:
        shape, dtype = tuple(_held(slots[0]).shape), _held(slots[0]).dtype
    tensor = read(key)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the model "
                         f"expects {shape}")
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)  # as from_pretrained(dtype=...) would hold it
    if layer is not None:
        layer.set_base_weight(tensor)  # the dense tensor is dropped on return
    else:
        _place(slots, tensor)


@torch.no_grad()
def load_quantized_model(name_or_path: str | os.PathLike, config: LoraConfig,
                         dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                         **from_pretrained_kwargs: Any) -> nn.Module:
    """A QLoRA causal LM from a dense safetensors checkpoint, quantised while it is read.

    The transformers model is built on the meta device and injected with ``config`` (its targeted
    projections become 4-bit layers with empty storage). Then the checkpoint is read one tensor at
    a time: a targeted weight is cast to ``dtype`` and quantised straight into its layer, any other
    tensor becomes the model's parameter. So only one dense projection is alive at a time, never
    the whole dense model next to its quantised copy. The result equals
    ``inject_lora(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), config)``: adapters are
    initialised as there (``B = 0``), non-persistent buffers (rotary tables) are rebuilt by the
    model's own initialiser.

    Args:
        name_or_path: a local directory with ``config.json`` and ``*.safetensors`` (sharded or
            not), or a hub id (fetched with ``huggingface_hub.snapshot_download``).
        config: the LoRA config; ``quantize_base`` must be ``"nf4"``.
        dtype: dtype of the dense parameters and the compute dtype of the 4-bit layers.
        device: where tensors are read to and quantised (``"cuda"`` quantises on the GPU).
        **from_pretrained_kwargs: passed to ``AutoConfig.from_pretrained`` (e.g.
            ``trust_remote_code``, ``revision``); ``attn_implementation`` goes to the model;
            ``cache_dir``, ``token``, ``local_files_only`` only to the hub download.

    Returns:
        The model in eval mode, with the config ``get_lora_config`` reports.

    Raises:
        ValueError: ``config.quantize_base`` is not ``"nf4"``; a non-float ``dtype``; no
            safetensors files; a checkpoint tensor whose shape differs from the model's; model
            tensors the checkpoint lacks.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(config, LoraConfig) or config.quantize_base != "nf4":
        raise ValueError("load_quantized_model needs a LoraConfig with quantize_base='nf4', got "
                         f"{getattr(config, 'quantize_base', config)!r}")
    if dtype not in NF4_FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {list(NF4_FLOAT_DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    kwargs = dict(from_pretrained_kwargs)
    directory = _checkpoint_dir(name_or_path, kwargs)
    model_kwargs = {k: kwargs.pop(k) for k in ("attn_implementation",) if k in kwargs}
    for k in ("cache_dir", "token", "local_files_only"):
        kwargs.pop(k, None)
    with torch.device("meta"):
        hf_config = AutoConfig.from_pretrained(str(directory), **kwargs)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **model_kwargs)
    inject.inject_lora(model, config)  # on meta: the 4-bit layers get empty meta storage
    quantized = {n + ".weight": m for n, m in quantized_lora_layers(model).items()}
    slots = _slots(model)
    prefix = getattr(model, "base_model_prefix", "")
    unexpected, loaded = [], set()
    for shard in _shards(directory):
        with safe_open(str(shard), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = key
                if key not in quantized and key not in slots and f"{prefix}.{key}" in slots:
                    name = f"{prefix}.{key}"  # a base-model checkpoint ("layers.0..." keys)
                if name not in quantized and name not in slots:
                    unexpected.append(key)
                    continue
                _load_tensor(key, f.get_tensor, quantized.get(name), slots.get(name))
                loaded.add(name)
    if unexpected:
        logger.warning("load_quantized_model: ignored %d checkpoint tensors the model does not "
                       "have: %s", len(unexpected), unexpected[:10])
    _finish_loading(model, device)
    missing = [k for k in quantized if k not in loaded]
    missing += [k for k, s in slots.items() if k not in loaded and _held(s[0]).is_meta]
    if missing:
        raise ValueError(f"load_quantized_model: the checkpoint in {str(directory)!r} lacks "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if (directory / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.eval()
    logger.info("load_quantized_model: %s, %d layers in NF4 (%.1f MiB of 4-bit storage)",
                directory, len(quantized), sum(m.quantized_weight.nbytes for m in quantized.values()) / 2**20)
    return model


def _finish_loading(model: nn.Module, device: torch.device) -> None:
    """Materialise what the checkpoint does not hold: adapters and non-persistent buffers."""
    for layer in model.modules():
        if isinstance(layer, LoRALayer) and hasattr(layer, "lora_A") and layer.lora_A.is_meta:
            for name in ("lora_A", "lora_B"):
                p = layer._parameters[name]
                layer._parameters[name] = nn.Parameter(torch.empty_like(p, device=device),
                                                       requires_grad=p.requires_grad)
            layer.reset_lora_parameters()
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        meta = [k for k in module._non_persistent_buffers_set
                if module._buffers.get(k) is not None and module._buffers[k].is_meta]
        if not meta:
            continue
        for k in meta:  # NaN-filled, so a buffer the initialiser does not set is caught below
            old = module._buffers[k]
            fill = float("nan") if old.is_floating_point() else 0
            module._buffers[k] = torch.full_like(old, fill, device=device)
        if callable(init):
            init(module)  # transformers recomputes e.g. rotary inv_freq here
        unset = [k for k in meta if module._buffers[k].is_floating_point()
                 and torch.isnan(module._buffers[k]).any()]
        if unset:
            raise ValueError(f"load_quantized_model: {type(module).__name__}'s non-persistent buffers "
                             f"{unset} are not in the checkpoint and its model's _init_weights did not "
                             "rebuild them")
