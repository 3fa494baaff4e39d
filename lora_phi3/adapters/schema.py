"""What ``adapter_config.json`` of our adapter format may hold: the one schema check of that file.

:func:`check_adapter_json` runs before anything else reads the json (``read_adapter``, and so
``load_adapter`` and the CLI), so every later reader may index it without guarding types. Each
refusal is a ``ValueError`` that names the field path, the value and what is allowed, e.g.
``modules['model.layers.0.self_attn.qkv_proj'].r must be an int >= 1, got 'x'``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..config import LoraConfig
from ..layers.base import check_init_lora_weights, is_data_init

__all__ = ["ADAPTER_FORMAT", "ADAPTER_FORMAT_VERSION", "ADAPTER_TENSOR_FILE", "ADAPTER_CONFIG_FILE",
           "DTYPE_NAMES", "MODULE_FIELDS", "check_adapter_json", "is_int", "is_number",
           "is_positive_number"]

ADAPTER_FORMAT = "lora_phi3.adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_TENSOR_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"

# The dtype names a tensor entry may give (as safetensors can store them; non-float ones are
# refused later, with the key, by the tensor checks).
DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
               "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool")

_SHA256 = re.compile(r"[0-9a-f]{64}")


# JSON value checks shared by every reader of adapter files (ours and PEFT's): a JSON bool is
# never a number here.
def is_int(v: Any, least: int) -> bool:
    """``v`` is an int (not a bool) ``>= least``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def is_number(v: Any) -> bool:
    """``v`` is a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_positive_number(v: Any) -> bool:
    """``v`` is a finite number ``> 0``."""
    return is_number(v) and v > 0


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(is_int(x, 1) for x in v)


# Per-module facts (what state.module_meta writes): field -> (check, what is allowed). Every fact
# but ``type`` (the saving class, e.g. Linear4bit; recorded for information) is compared with the
# model's layer on load (validate.check_modules).
MODULE_FIELDS: dict[str, tuple[Any, str]] = {
    "type": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "kind": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "r": (lambda v: is_int(v, 1), "an int >= 1"),
    "lora_alpha": (is_number, "a finite number"),
    "scaling": (is_number, "a finite number"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "a bool"),
    **{f: (lambda v: is_int(v, 1), "an int >= 1")
       for f in ("in_features", "out_features", "num_embeddings", "embedding_dim", "in_channels",
                 "out_channels", "groups")},
    "kernel_size": (_int_list, "a non-empty list of ints >= 1"),
    "split_sizes": (_int_list, "a non-empty list of ints >= 1"),
    "enable_lora": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, bool) for x in v),
                    "a non-empty list of bools"),
    "lora_layout": (lambda v: v in ("loralib", "peft"), "'loralib' or 'peft'"),
    "token_indices": (lambda v: isinstance(v, list) and bool(v) and all(is_int(x, 0) for x in v),
                      "a non-empty list of ints >= 0"),
}
_REQUIRED_MODULE_FIELDS = ("type", "kind", "r", "lora_alpha", "scaling")


def _refuse(where: str, field: str, value: Any, allowed: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return ValueError(f"{where}: {field} must be {allowed}, got {shown}")


def _object(where: str, field: str, value: Any, allowed: str) -> dict:
    if not isinstance(value, dict):
        raise _refuse(where, field, value, allowed)
    return value


def check_adapter_json(doc: Any, where: str) -> LoraConfig | None:
    """Check the types and values of every field of an ``adapter_config.json`` document.

    Args:
        doc: the parsed json.
        where: the file's name, for messages.

    Returns:
        The file's ``LoraConfig`` (None for ``lora_config: null``, hand-built layers).

    Raises:
        ValueError: naming the first bad field's path, its value and what is allowed; also the
            ``LoraConfig``'s own refusal, prefixed with ``lora_config``.
    """
    if not isinstance(doc, dict):
        raise _refuse(where, "the document", doc, "a JSON object")
    if doc.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{where}: format is {doc.get('format')!r}, expected {ADAPTER_FORMAT!r} "
                         "(for a PEFT adapter use import_peft)")
    version = doc.get("format_version")
    if not is_int(version, 1) or version > ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {version!r} is not supported; this library "
                         f"reads versions 1..{ADAPTER_FORMAT_VERSION}")
    allowed = {"format", "format_version", "lora_config", "base_model", "modules", "tensor_file",
               "tensors", "num_bytes", "sha256"}
    unknown = sorted(set(doc) - allowed - {"init_conversion"})  # the one optional field
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for format_version {version}; "
                         f"allowed: {sorted(allowed)}")
    for field in sorted(allowed):
        if field not in doc:
            raise ValueError(f"{where}: missing field {field!r}")
    if doc["tensor_file"] != ADAPTER_TENSOR_FILE:
        raise _refuse(where, "tensor_file", doc["tensor_file"], repr(ADAPTER_TENSOR_FILE))
    if not is_int(doc["num_bytes"], 0):
        raise _refuse(where, "num_bytes", doc["num_bytes"], "an int >= 0")
    if not isinstance(doc["sha256"], str) or not _SHA256.fullmatch(doc["sha256"]):
        raise _refuse(where, "sha256", doc["sha256"], "64 lowercase hex digits")
    base = _object(where, "base_model", doc["base_model"], "an object")
    for key, value in base.items():
        if value is not None and not isinstance(value, str):
            raise _refuse(where, f"base_model.{key}", value, "a string or null")

    if "init_conversion" in doc:  # a PiSSA/OLoRA adapter converted for the original base
        conv = _object(where, "init_conversion", doc["init_conversion"],
                       "an object {init_lora_weights, r, lora_alpha}")
        if set(conv) != {"init_lora_weights", "r", "lora_alpha"}:
            raise _refuse(where, "init_conversion fields", sorted(conv),
                          "exactly ['init_lora_weights', 'lora_alpha', 'r']")
        if not is_data_init(conv["init_lora_weights"]):
            raise _refuse(where, "init_conversion.init_lora_weights", conv["init_lora_weights"],
                          "'pissa', 'pissa_niter_K' or 'olora'")
        try:
            check_init_lora_weights(conv["init_lora_weights"], "init_conversion.init_lora_weights")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not is_int(conv["r"], 1):
            raise _refuse(where, "init_conversion.r", conv["r"], "an int >= 1")
        if not is_positive_number(conv["lora_alpha"]):
            raise _refuse(where, "init_conversion.lora_alpha", conv["lora_alpha"], "a number > 0")
    tensors = _object(where, "tensors", doc["tensors"], "an object {key: {shape, dtype}}")
    for key, info in tensors.items():
        path = f"tensors[{key!r}]"
        _object(where, path, info, "an object {shape, dtype}")
        if set(info) != {"shape", "dtype"}:
            raise _refuse(where, f"{path} fields", sorted(info), "exactly ['dtype', 'shape']")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(is_int(n, 0) for n in shape):
            raise _refuse(where, f"{path}.shape", shape, "a list of ints >= 0")
        if info["dtype"] not in DTYPE_NAMES:
            raise _refuse(where, f"{path}.dtype", info["dtype"], f"one of {list(DTYPE_NAMES)}")

    modules = _object(where, "modules", doc["modules"], "an object {module path: facts}")
    for name, meta in modules.items():
        path = f"modules[{name!r}]"
        _object(where, path, meta, "an object of per-module facts")
        unknown = sorted(set(meta) - set(MODULE_FIELDS))
        if unknown:
            raise ValueError(f"{where}: {path} has unknown field(s) {unknown}; "
                             f"allowed: {sorted(MODULE_FIELDS)}")
        for field in _REQUIRED_MODULE_FIELDS:
            if field not in meta:
                raise ValueError(f"{where}: {path} lacks field {field!r}")
        for field, value in meta.items():
            check, allowed_values = MODULE_FIELDS[field]
            if not check(value):
                raise _refuse(where, f"{path}.{field}", value, allowed_values)

    saved = doc["lora_config"]
    if saved is None:
        return None
    _object(where, "lora_config", saved, "an object (LoraConfig fields) or null")
    try:
        return LoraConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: lora_config: {e}") from None
