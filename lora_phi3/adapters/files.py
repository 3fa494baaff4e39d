"""Adapter files: save, read and load only what a LoRA fine-tune trained.

An adapter is a directory holding two files (format described in ``docs/adapters.md``):

- ``adapter.safetensors``: the trained tensors, keyed as in ``model.state_dict()`` (never pickle);
- ``adapter_config.json``: the :class:`LoraConfig`, a format version, per-module metadata (type, r,
  scaling, split sizes, ...), the shape and dtype of every tensor, and the sha256 of the tensor
  file, so a tensor file that does not belong to this json (or was truncated) is refused.

Both are written atomically (temp files, fsync, rename), the json last: it is the commit record.
:func:`load_adapter` checks the whole file against the model (:mod:`.validate`) before it changes
anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save as st_save

from ..atomic import atomic_write_dir
from ..config import LoraConfig
from ..inject.injector import check_adapter_name, get_lora_config, inject_lora
from ..inject.named import add_adapter, adapter_names, delete_adapter, using_adapter
from ..layers import lora_layers
from .conversion import convert_for_original_base, split_for_data_init
from .schema import (ADAPTER_CONFIG_FILE, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION,
                     ADAPTER_TENSOR_FILE, check_adapter_json)
from .state import adapter_state_dict, injected_preview, is_bare, module_meta, to_saveable
from .validate import (FLOAT_DTYPES, check_against_model, check_config, check_modules,
                       check_modules_exist, decode_safetensors, dtype_name, read_json,
                       unlisted_module_tensors)

logger = logging.getLogger(__name__)

__all__ = ["save_adapter", "read_adapter", "load_adapter", "adapter_state_dict", "ADAPTER_FORMAT",
           "ADAPTER_FORMAT_VERSION", "ADAPTER_TENSOR_FILE", "ADAPTER_CONFIG_FILE"]


# -- save ------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None) -> Path:
    """Write the adapter of ``model`` (see :func:`adapter_state_dict`) to directory ``path``.

    Args:
        model: a model with LoRA layers.
        path: the directory to write.
        adapter_name: which named adapter (default: the active one); the file holds it as the
            model's only adapter, so it loads into any model under any name.

    Returns:
        The directory written.

    Raises:
        ValueError: if the model holds no LoRA layer, ``adapter_name`` is unknown, or ``path`` is
            an existing file.
    """
    if adapter_name is not None:
        with using_adapter(model, _known(model, adapter_name, "save_adapter")):
            return save_adapter(model, path)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model holds no LoRA layer with r > 0; "
                         "call inject_lora(model, config) first")
    tensors = adapter_state_dict(model)
    config = get_lora_config(model)
    lora_config = config.to_file_dict() if config is not None else None
    modules = {name: module_meta(m) for name, m in layers.items()}
    # PiSSA/OLoRA: written for the original base weights (rank 2r), never for the residual
    conversion = convert_for_original_base(model, tensors, modules, lora_config)
    tensors = to_saveable(tensors)
    blob = st_save(tensors, metadata={"format": "pt", "lora_phi3_format": ADAPTER_FORMAT})
    model_cfg = getattr(model, "config", None)
    doc = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "lora_config": lora_config,
        "base_model": {"model_type": getattr(model_cfg, "model_type", None),
                       "name_or_path": getattr(model_cfg, "_name_or_path", None) or None,
                       "class": type(model).__name__},
        "modules": modules,
        "tensor_file": ADAPTER_TENSOR_FILE,
        "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)}
                    for k, v in tensors.items()},
        "num_bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    if conversion is not None:
        doc["init_conversion"] = conversion
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    out = atomic_write_dir(path, [(ADAPTER_TENSOR_FILE, blob),
                                  (ADAPTER_CONFIG_FILE, text.encode("utf-8"))])
    logger.info("saved adapter (%d tensors, %.2f MB) to %s", len(tensors), len(blob) / 1e6, out)
    return out


# -- read ------------------------------------------------------------------------------------------
def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory on its own (no model): json, checksum, header, tensors.

    Returns:
        ``(config json, tensors)``.

    Raises:
        ValueError: for a missing file, a json field of the wrong type or value (naming its path,
            :func:`~.schema.check_adapter_json`), a checksum mismatch, a corrupt or truncated
            tensor file, or tensors that disagree with the json's ``tensors`` or ``modules``.
    """
    path = Path(path)
    cfg_path, st_path = path / ADAPTER_CONFIG_FILE, path / ADAPTER_TENSOR_FILE
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise ValueError(f"adapter directory {str(path)!r} lacks {p.name!r}")
    doc = read_json(cfg_path)
    check_adapter_json(doc, str(cfg_path))  # every field's type, before anything reads it
    data = st_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != doc["sha256"] or len(data) != doc["num_bytes"]:
        raise ValueError(f"{st_path}: checksum mismatch (sha256 {digest[:16]}..., {len(data)} bytes; "
                         f"{ADAPTER_CONFIG_FILE} expects {doc['sha256'][:16]}..., "
                         f"{doc['num_bytes']} bytes): the tensor file is truncated, corrupt or "
                         "from another save")
    tensors = decode_safetensors(data, str(st_path))
    listed = doc["tensors"]
    problems = []
    if set(listed) != set(tensors):
        problems.append(f"tensor file keys differ from the json: only in file "
                        f"{sorted(set(tensors) - set(listed))}, only in json "
                        f"{sorted(set(listed) - set(tensors))}")
    for key, t in tensors.items():
        info = listed.get(key)
        if info is not None and (list(t.shape) != info["shape"]
                                 or dtype_name(t.dtype) != info["dtype"]):
            problems.append(f"{key}: file has {dtype_name(t.dtype)} {list(t.shape)}, json says "
                            f"{info['dtype']} {info['shape']}")
        if t.dtype not in FLOAT_DTYPES:
            problems.append(f"{key}: dtype {dtype_name(t.dtype)} is not a floating dtype "
                            f"(allowed: {[dtype_name(d) for d in FLOAT_DTYPES]})")
    problems += unlisted_module_tensors(doc["modules"], tensors)
    if problems:
        raise ValueError(f"adapter {str(path)!r} is inconsistent: " + "; ".join(problems))
    return doc, tensors


# -- load ------------------------------------------------------------------------------------------
def _known(model: nn.Module, adapter_name: str, what: str) -> str:
    if adapter_name not in adapter_names(model):
        raise ValueError(f"{what}: unknown adapter {adapter_name!r}; the model has "
                         f"{adapter_names(model)}")
    return adapter_name


def load_adapter(model: nn.Module, path: str | Path, strict: bool = True,
                 adapter_name: str | None = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``, after checking all of it.

    With ``adapter_name``: into a bare model, it is injected under that name; into a model that
    has the adapter already, its weights are replaced in place (a hot swap: smaller ranks are
    padded, a compiled model does not recompile; see :mod:`.hotswap`); into a model with other
    adapters, it is added (:func:`~lora_phi3.inject.named.add_adapter`) and loaded, inactive.

    If the model holds no LoRA layer yet, it is first injected with the saved config (the saved
    modules must exist with the saved shapes). A merged layer (eval with ``merge_weights``) is
    unmerged, loaded and merged again, so loading works in train and eval mode alike.

    Args:
        model: the model to load into.
        path: the adapter directory.
        strict: refuse missing and unexpected keys (and ``modules`` entries the model lacks) and
            a differing ``LoraConfig``. The json schema, file integrity, shapes, non-float dtypes
            and every per-module fact (kind, r, lora_alpha, scaling, in/out features, slices)
            are always checked.

    Returns:
        ``model``.

    Raises:
        ValueError: on any problem, naming the keys and shapes; the model is then unchanged.
    """
    if adapter_name is not None and not is_bare(model):
        check_adapter_name(adapter_name)
        if adapter_name in adapter_names(model):
            from .hotswap import hotswap_adapter
            return hotswap_adapter(model, path, adapter_name)
        doc, _ = read_adapter(path)
        if doc["lora_config"] is None:
            raise ValueError(f"adapter {str(path)!r} has no lora_config to add it as "
                             f"{adapter_name!r}")
        add_adapter(model, LoraConfig.from_dict(doc["lora_config"]), adapter_name)
        try:
            with using_adapter(model, adapter_name):
                return load_adapter(model, path, strict)
        except ValueError:
            delete_adapter(model, adapter_name)  # a refused load leaves the model as it was
            raise
    doc, tensors = read_adapter(path)
    where = f"adapter {str(path)!r}"
    split_for_data_init(model, doc, tensors, where)  # a PiSSA run reading its own save back
    saved_cfg = doc["lora_config"]
    target, config = model, None
    if is_bare(model):
        if saved_cfg is None:
            raise ValueError(f"{where} has no lora_config and the model holds no LoRA layer; "
                             "inject_lora(model, config) first")
        problems = check_modules_exist(model, doc["modules"])
        if problems:
            raise ValueError(f"{where} does not fit the model (nothing was changed): "
                             + "; ".join(problems))
        config = LoraConfig.from_dict(saved_cfg)  # valid: read_adapter checked it
        target = injected_preview(model, config)  # validate against a weightless copy
    problems = check_against_model(target, tensors, strict, where)
    problems += check_modules(target, doc["modules"], strict)
    if strict:
        problems += check_config(get_lora_config(target), saved_cfg)
    if problems:
        raise ValueError(f"{where} does not fit the model (nothing was changed): "
                         + "; ".join(problems))
    if config is not None:
        inject_lora(model, config, adapter_name=adapter_name or "default")
        logger.info("%s: injected LoRA into the bare model with the saved config", where)
    expected = adapter_state_dict(model)
    to_load = {k: v for k, v in tensors.items() if k in expected}
    with torch.no_grad():
        # LoRALayer._load_from_state_dict unmerges, loads and re-merges merged layers.
        result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; keep the guarantee loud
        raise RuntimeError(f"load_adapter: unexpected keys after validation: {result.unexpected_keys}")
    logger.info("loaded %d adapter tensors from %s", len(to_load), path)
    return model
