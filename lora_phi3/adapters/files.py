"""Adapter files: save, validate and load only what a LoRA fine-tune trained.

An adapter is a directory holding two files (format described in ``docs/adapters.md``):

- ``adapter.safetensors``: the trained tensors, keyed as in ``model.state_dict()`` (never pickle);
- ``adapter_config.json``: the :class:`LoraConfig`, a format version, per-module metadata (type, r,
  scaling, split sizes, ...), the shape and dtype of every tensor, and the sha256 of the tensor
  file, so a tensor file that does not belong to this json (or was truncated) is refused.

Both are written atomically (temp files, fsync, rename), the json last: it is the commit record.
:func:`load_adapter` checks the whole file against the model before it changes anything.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..atomic import atomic_write_dir
from ..config import LoraConfig
from ..inject.injector import get_lora_config, inject_lora
from ..layers.lora_layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear

logger = logging.getLogger(__name__)

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "ADAPTER_FORMAT",
           "ADAPTER_FORMAT_VERSION", "ADAPTER_TENSOR_FILE", "ADAPTER_CONFIG_FILE"]

ADAPTER_FORMAT = "lora_phi3.adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_TENSOR_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

# safetensors dtype tags -> bytes per element; only the float ones are accepted as adapter tensors.
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_MAX_HEADER = 100 * 1024 * 1024  # a header larger than this is corrupt, not an adapter
# The layer family a module belongs to (MergedLinear first: it is not a Linear subclass, but a
# quantized variant may subclass either); files are compared by family, so an adapter trained
# over an NF4 base loads into the same layers over a bf16 base.
_KINDS = (MergedLinear, Linear, Embedding, Conv1d, Conv2d, Conv3d)


# -- the model side --------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of ``model`` that holds an adapter (``r > 0``), by module path."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoRALayer) and m.r > 0 and hasattr(m, "lora_A")}


def matches_suffix(name: str, patterns: list[str] | None) -> bool:
    """True if the dotted path ``name`` equals or ends with ``"." + p`` for some ``p``."""
    return bool(patterns) and any(name == p or name.endswith("." + p) for p in patterns)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`save_adapter` writes: everything the fine-tune trained, nothing else.

    That is each LoRA layer's ``lora_A``/``lora_B``; the biases selected by the config's ``bias``
    (``"all"``: every bias parameter; ``"lora_only"``: the biases of LoRA layers); and every
    parameter of the ``modules_to_save`` modules. Without a stored config, only LoRA tensors.

    Returns:
        ``{state_dict key: detached tensor}`` sharing storage with the model.
    """
    config = get_lora_config(model)
    bias = config.bias if config is not None else "none"
    to_save = config.modules_to_save if config is not None else None
    layers = lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A"] = module.lora_A.detach()
        out[prefix + "lora_B"] = module.lora_B.detach()
        if bias == "lora_only" and getattr(module, "bias", None) is not None:
            out[prefix + "bias"] = module.bias.detach()
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, leaf = name.rpartition(".")
        if bias == "all" and leaf == "bias":
            out[name] = param.detach()
        elif to_save and _under_any(module_name, to_save):
            out[name] = param.detach()
    return dict(sorted(out.items()))


def _under_any(module_name: str, patterns: list[str]) -> bool:
    # A parameter belongs to a saved module if any ancestor path matches (e.g. lm_head.weight).
    parts = module_name.split(".") if module_name else []
    return any(matches_suffix(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def module_meta(module: LoRALayer) -> dict[str, Any]:
    """The per-module facts a file must agree with: type, rank, scaling and shapes."""
    kind = next((c.__name__ for c in _KINDS if isinstance(module, c)), type(module).__name__)
    meta: dict[str, Any] = {"type": type(module).__name__, "kind": kind, "r": module.r,
                            "lora_alpha": module.lora_alpha, "scaling": module.scaling}
    for attr in ("in_features", "out_features", "fan_in_fan_out", "num_embeddings",
                 "embedding_dim", "in_channels", "out_channels", "groups"):
        if hasattr(module, attr):
            meta[attr] = getattr(module, attr)
    if hasattr(module, "kernel_size"):
        meta["kernel_size"] = list(module.kernel_size)
    if isinstance(module, MergedLinear):
        meta["split_sizes"] = list(module.split_sizes)
        meta["enable_lora"] = list(module.enable_lora)
    return meta


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_bare(model: nn.Module) -> bool:
    """True if ``model`` holds no adapter yet (no LoRA layer and no stored config)."""
    return not lora_layers(model) and get_lora_config(model) is None


def injected_preview(model: nn.Module, config: LoraConfig) -> nn.Module:
    """A copy of ``model`` with every tensor on the meta device, injected with ``config``.

    It has the adapter keys, shapes and dtypes that ``inject_lora(model, config)`` would create,
    at no memory cost, so a file can be checked completely before the real model is touched.

    Raises:
        ValueError: from ``inject_lora`` (e.g. a target that matches nothing), or if the model
            cannot be copied.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as e:  # a module holding something deepcopy cannot copy
        raise ValueError(f"cannot preview the injection on a copy of {type(model).__name__} ({e}); "
                         "call inject_lora(model, config) yourself, then load") from None
    # The preview needs only adapter shapes: a quantized base is not built on meta tensors.
    return inject_lora(clone, dataclasses.replace(config, quantize_base=None))


# -- files -----------------------------------------------------------------------------------------
def parse_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Check a safetensors buffer's header by hand, then decode it; never unpickles anything.

    Raises:
        ValueError: for a truncated or corrupt buffer, naming ``where`` and what is wrong.
    """
    if len(data) < 8:
        raise ValueError(f"{where}: not a safetensors file ({len(data)} bytes, truncated)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > _MAX_HEADER:
        raise ValueError(f"{where}: safetensors header claims {n} bytes but the file has "
                         f"{len(data) - 8} after the length field (truncated or corrupt)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: safetensors header must be a JSON object")
    body = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(info, dict) and info.get("dtype") in _ST_ITEMSIZE \
            and isinstance(info.get("shape"), list) \
            and all(isinstance(s, int) and s >= 0 for s in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
        if ok:
            begin, end = info["data_offsets"]
            numel = 1
            for s in info["shape"]:
                numel *= s
            ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= body \
                and end - begin == numel * _ST_ITEMSIZE[info["dtype"]]
        if not ok:
            raise ValueError(f"{where}: safetensors entry {key!r} is corrupt or points past the "
                             f"end of the file: {info!r}")
    try:
        return st_load(data)
    except Exception as e:  # the Rust decoder's own checks (overlaps, alignment, ...)
        raise ValueError(f"{where}: corrupt safetensors data ({e})") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def to_saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage (tied lm_head/embeddings): own copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


# -- save ------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of ``model`` (see :func:`adapter_state_dict`) to directory ``path``.

    Returns:
        The directory written.

    Raises:
        ValueError: if the model holds no LoRA layer, or ``path`` is an existing file.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model holds no LoRA layer with r > 0; "
                         "call inject_lora(model, config) first")
    tensors = to_saveable(adapter_state_dict(model))
    blob = st_save(tensors, metadata={"format": "pt", "lora_phi3_format": ADAPTER_FORMAT})
    config = get_lora_config(model)
    model_cfg = getattr(model, "config", None)
    doc = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "lora_config": config.to_dict() if config is not None else None,
        "base_model": {"model_type": getattr(model_cfg, "model_type", None),
                       "name_or_path": getattr(model_cfg, "_name_or_path", None) or None,
                       "class": type(model).__name__},
        "modules": {name: module_meta(m) for name, m in layers.items()},
        "tensor_file": ADAPTER_TENSOR_FILE,
        "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype)}
                    for k, v in tensors.items()},
        "num_bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    out = atomic_write_dir(path, [(ADAPTER_TENSOR_FILE, blob),
                                  (ADAPTER_CONFIG_FILE, text.encode("utf-8"))])
    logger.info("saved adapter (%d tensors, %.2f MB) to %s", len(tensors), len(blob) / 1e6, out)
    return out


# -- load ------------------------------------------------------------------------------------------
def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory on its own (no model): json, checksum, header, tensors.

    Returns:
        ``(config json, tensors)``.

    Raises:
        ValueError: for a missing file, wrong format or version, checksum mismatch, corrupt or
            truncated tensor file, or tensors that disagree with the json.
    """
    path = Path(path)
    cfg_path, st_path = path / ADAPTER_CONFIG_FILE, path / ADAPTER_TENSOR_FILE
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise ValueError(f"adapter directory {str(path)!r} lacks {p.name!r}")
    doc = read_json(cfg_path)
    if doc.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{cfg_path}: format is {doc.get('format')!r}, expected "
                         f"{ADAPTER_FORMAT!r} (for a PEFT adapter use import_peft)")
    version = doc.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {version!r} is not supported; this library "
                         f"reads versions 1..{ADAPTER_FORMAT_VERSION}")
    for field in ("sha256", "tensors", "modules"):
        if field not in doc:
            raise ValueError(f"{cfg_path}: missing field {field!r}")
    data = st_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != doc["sha256"] or len(data) != doc.get("num_bytes", len(data)):
        raise ValueError(f"{st_path}: checksum mismatch (sha256 {digest[:16]}..., {len(data)} bytes; "
                         f"{ADAPTER_CONFIG_FILE} expects {str(doc['sha256'])[:16]}..., "
                         f"{doc.get('num_bytes')} bytes): the tensor file is truncated, corrupt or "
                         "from another save")
    tensors = parse_safetensors(data, str(st_path))
    listed = doc["tensors"]
    problems = []
    if set(listed) != set(tensors):
        problems.append(f"tensor file keys differ from the json: only in file "
                        f"{sorted(set(tensors) - set(listed))}, only in json "
                        f"{sorted(set(listed) - set(tensors))}")
    for key, t in tensors.items():
        info = listed.get(key)
        if info is not None and (list(t.shape) != info.get("shape")
                                 or dtype_name(t.dtype) != info.get("dtype")):
            problems.append(f"{key}: file has {dtype_name(t.dtype)} {list(t.shape)}, json says "
                            f"{info.get('dtype')} {info.get('shape')}")
        if t.dtype not in _FLOAT_DTYPES:
            problems.append(f"{key}: dtype {dtype_name(t.dtype)} is not a floating dtype "
                            f"(allowed: {[dtype_name(d) for d in _FLOAT_DTYPES]})")
    if problems:
        raise ValueError(f"adapter {str(path)!r} is inconsistent: " + "; ".join(problems))
    return doc, tensors


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
        elif got.dtype not in _FLOAT_DTYPES:
            problems.append(f"{key}: dtype {dtype_name(got.dtype)} is not a floating dtype")
        elif got.dtype != want.dtype:
            casts.append(f"{key} {dtype_name(got.dtype)}->{dtype_name(want.dtype)}")
    if casts and not problems:
        logger.warning("%s: casting %d tensor(s) to the model's dtype: %s", where, len(casts),
                       ", ".join(casts[:8]) + (" ..." if len(casts) > 8 else ""))
    return problems


def _check_modules(model: nn.Module, modules: dict[str, Any]) -> list[str]:
    problems = []
    layers = lora_layers(model)
    for name, saved in modules.items():
        module = layers.get(name)
        if module is None:
            continue  # reported as unexpected keys
        have = module_meta(module)
        diff = {k: (saved.get(k), have[k]) for k in ("kind", "r", "scaling", "split_sizes",
                                                     "enable_lora", "fan_in_fan_out")
                if k in have and saved.get(k) != have[k]}
        if diff:
            problems.append(f"module {name} differs (file, model): {diff}")
    return problems


_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
                  "bias", "modules_to_save")


def _check_config(model_cfg: LoraConfig | None, saved: dict[str, Any] | None) -> list[str]:
    if model_cfg is None or saved is None:
        return []
    have = model_cfg.to_dict()
    diff = {k: (saved.get(k), have.get(k)) for k in _CONFIG_FIELDS if saved.get(k) != have.get(k)}
    return [f"LoraConfig differs (file, model): {diff}"] if diff else []


def _pre_inject_check(model: nn.Module, doc: dict[str, Any]) -> list[str]:
    """Before injecting into a bare model: every saved module must exist with matching shapes."""
    problems = []
    named = dict(model.named_modules())
    for name, meta in doc["modules"].items():
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


def load_adapter(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``, after checking all of it.

    If the model holds no LoRA layer yet, it is first injected with the saved config (the saved
    modules must exist with the saved shapes). A merged layer (eval with ``merge_weights``) is
    unmerged, loaded and merged again, so loading works in train and eval mode alike.

    Args:
        model: the model to load into.
        path: the adapter directory.
        strict: refuse missing and unexpected keys and a differing ``LoraConfig``. Shapes,
            non-float dtypes, module types/ranks/scalings and file integrity are always checked.

    Returns:
        ``model``.

    Raises:
        ValueError: on any problem, naming the keys and shapes; the model is then unchanged.
    """
    doc, tensors = read_adapter(path)
    where = f"adapter {str(path)!r}"
    saved_cfg = doc.get("lora_config")
    target, config = model, None
    if is_bare(model):
        if saved_cfg is None:
            raise ValueError(f"{where} has no lora_config and the model holds no LoRA layer; "
                             "inject_lora(model, config) first")
        problems = _pre_inject_check(model, doc)
        if problems:
            raise ValueError(f"{where} does not fit the model (nothing was changed): "
                             + "; ".join(problems))
        config = LoraConfig.from_dict(saved_cfg)
        target = injected_preview(model, config)  # validate against a weightless copy
    problems = check_against_model(target, tensors, strict, where)
    problems += _check_modules(target, doc["modules"])
    if strict:
        problems += _check_config(get_lora_config(target), saved_cfg)
    if problems:
        raise ValueError(f"{where} does not fit the model (nothing was changed): "
                         + "; ".join(problems))
    if config is not None:
        inject_lora(model, config)
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
