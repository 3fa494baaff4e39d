"""Reading adapter files safely, and checking what they hold against a model before it changes.

Shared by our adapter format (:mod:`.files`) and the PEFT import (:mod:`.peft_import`). Tensor files
are decoded by the safetensors library, which already refuses every malformed header (truncation,
bad JSON, unknown dtypes, offsets past the end, overlapping or gapped data); what it lacks, and is
checked here, is that an adapter holds floating-point tensors only, and that they fit the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as st_load

from ..config import VARIANT_DEFAULTS, LoraConfig
from ..layers import lora_layers
from ..layers.param_lora import split_param_lora_name
from .schema import MODULE_FIELDS
from .state import adapter_state_dict, module_meta

logger = logging.getLogger(__name__)

__all__ = ["FLOAT_DTYPES", "dtype_name", "decode_safetensors", "read_json", "non_float_keys",
           "check_against_model", "check_modules", "check_config", "check_modules_exist",
           "unlisted_module_tensors"]

# The tensors every LoRA layer holds (variants may add more: LoRALayer.adapter_param_names),
# and the layer kinds that hold others instead.
_LORA_PARAMS = ("lora_A", "lora_B")
_KIND_PARAMS = {"TrainableTokens": ("token_values",), "ParamLoRA": _LORA_PARAMS}
_ANY_PARAMS = ("lora_A", "lora_B", "lora_magnitude", "lora_bias", "token_values")

# The dtypes an adapter tensor may have (anything else is refused, never cast).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# LoraConfig fields that must agree between a file and the model under strict loading.
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
                  "bias", "modules_to_save", *VARIANT_DEFAULTS)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling adapter json files use)."""
    return str(dtype).removeprefix("torch.")


def decode_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Decode a safetensors buffer (never unpickles anything).

    Args:
        data: the whole file.
        where: the file's name, for messages.

    Returns:
        ``{key: tensor}``.

    Raises:
        ValueError: for any malformed buffer, naming ``where`` and the decoder's reason.
    """
    try:
        return st_load(data)
    except Exception as e:  # safetensors_rust.SafetensorError, which it does not export
        reason = str(e).removeprefix("Error while deserializing: ")
        if "JSON" in reason or "UTF-8" in reason:
            raise ValueError(f"{where}: safetensors header is not valid JSON for the format "
                             f"({reason})") from None
        raise ValueError(f"{where}: not a safetensors file, or truncated or corrupt "
                         f"({reason}; {len(data)} bytes)") from None


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        ValueError: the file cannot be read, is not JSON, or is not an object; names ``path``.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def non_float_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """``"key (dtype)"`` for every tensor whose dtype is not in :data:`FLOAT_DTYPES`."""
    return [f"{k} ({dtype_name(t.dtype)})" for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES]


def check_against_model(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool,
                        where: str) -> list[str]:
    """Compare file tensors with the model's adapter tensors; return the problems found.

    Shapes and dtypes are always checked (float to float is cast, and logged); missing and
    unexpected keys only when ``strict``.
    """
    expected = adapter_state_dict(model)
    problems, casts = [], []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if not strict and (missing or unexpected):
        logger.warning("%s: strict=False: ignoring missing keys %s and unexpected keys %s",
                       where, missing, unexpected)
    for key in sorted(set(expected) & set(tensors)):
        want, got = expected[key], tensors[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"shape mismatch for {key}: file {tuple(got.shape)}, "
                            f"model {tuple(want.shape)}")
        elif got.dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: dtype {dtype_name(got.dtype)} is not a floating dtype")
        elif got.dtype != want.dtype:
            casts.append(f"{key} {dtype_name(got.dtype)}->{dtype_name(want.dtype)}")
    if casts and not problems:
        logger.warning("%s: casting %d tensor(s) to the model's dtype: %s", where, len(casts),
                       ", ".join(casts[:8]) + (" ..." if len(casts) > 8 else ""))
    return problems


def check_modules(model: nn.Module, modules: dict[str, Any], strict: bool = True) -> list[str]:
    """Problems where a file's per-module facts differ from the model's layers.

    Every fact :func:`~.state.module_meta` records is compared (kind, r, lora_alpha, scaling,
    in/out features, fan_in_fan_out, split_sizes, enable_lora, ...), except ``type``, the class
    that saved it (an adapter saved over an NF4 base loads into the same family over a dense one).
    A fact the file lacks or has in excess counts as a difference. With ``strict``, an entry for
    a module that is no LoRA layer of the model is a problem; otherwise it is skipped with its
    tensors (the unexpected keys).
    """
    problems = []
    layers = lora_layers(model)
    for name, saved in modules.items():
        module = layers.get(name)
        if module is None:
            if strict:
                problems.append(f"module {name} (in the file's modules) is not a LoRA layer of the "
                                "model")
            continue
        have = module_meta(module)
        diff = {k: (saved.get(k), have.get(k)) for k in MODULE_FIELDS
                if k != "type" and saved.get(k) != have.get(k)}
        if diff:
            problems.append(f"module {name} differs (file, model): {diff}")
    return problems


def unlisted_module_tensors(modules: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Where a file disagrees with itself: LoRA tensors of a module its ``modules`` does not
    list, or a listed module without its ``lora_A``/``lora_B`` tensors (``token_values`` for
    trainable tokens)."""
    problems = []
    for key in sorted(tensors):
        name, _, leaf = key.rpartition(".")
        if leaf in _ANY_PARAMS and name not in modules:
            problems.append(f"tensor {key} belongs to no entry of modules")
    for name in sorted(modules):
        needed = _KIND_PARAMS.get(modules[name].get("kind"), _LORA_PARAMS)
        absent = [k for k in (f"{name}.{p}" if name else p for p in needed) if k not in tensors]
        if absent:
            problems.append(f"modules[{name!r}] has no tensors {absent}")
    return problems


def check_config(model_cfg: LoraConfig | None, saved: dict[str, Any] | None) -> list[str]:
    """A problem if the saved config differs from the model's in a field that shapes the adapter."""
    if model_cfg is None or saved is None:
        return []
    have = model_cfg.to_dict()
    saved = {**VARIANT_DEFAULTS, **saved}  # a variant switch absent from a file is at its default
    diff = {k: (saved.get(k), have.get(k)) for k in _CONFIG_FIELDS if saved.get(k) != have.get(k)}
    return [f"LoraConfig differs (file, model): {diff}"] if diff else []


def check_modules_exist(model: nn.Module, modules: dict[str, Any]) -> list[str]:
    """Before injecting into a bare model: every saved module must exist with matching shapes (an
    adapter on a parameter, ``<module>.param_lora.<parameter>``: that parameter, ``(out, in)`` or
    ``(experts, out, in)``)."""
    problems = []
    named = dict(model.named_modules())
    for name, meta in modules.items():
        host = split_param_lora_name(name) if meta.get("kind") == "ParamLoRA" else None
        if host is not None:
            problems += _parameter_problems(named, name, host, meta)
            continue
        module = named.get(name)
        if module is None:
            problems.append(f"module {name} (in the file) does not exist in the model")
            continue
        for attr in ("in_features", "out_features", "num_embeddings", "embedding_dim",
                     "in_channels", "out_channels"):
            if attr in meta and hasattr(module, attr) and getattr(module, attr) != meta[attr]:
                problems.append(f"module {name}: {attr} is {getattr(module, attr)} in the model, "
                                f"{meta[attr]} in the file")
    return problems


def _parameter_problems(named: dict[str, nn.Module], name: str, host: tuple[str, str],
                        meta: dict[str, Any]) -> list[str]:
    """Why the parameter a saved :class:`~lora_phi3.layers.ParamLoRA` adapts is not in the model."""
    module_name, parameter = host
    module = named.get(module_name)
    param = None if module is None else module._parameters.get(parameter)
    if param is None:
        return [f"module {name} (in the file) adapts {module_name}.{parameter}, which is no "
                "parameter of the model"]
    have = {"out_features": param.shape[-2], "in_features": param.shape[-1]}
    return [f"module {name}: {attr} is {have[attr]} in the model's {module_name}.{parameter}, "
            f"{meta[attr]} in the file" for attr in have if attr in meta and meta[attr] != have[attr]]
