"""Export our adapters as Hugging Face PEFT LoRA adapters (and the facts of that format).

PEFT stores, per adapted module, ``base_model.model.<path>.lora_A.weight`` ``(R, in)`` and
``.lora_B.weight`` ``(out, R)`` (``lora_embedding_A``/``lora_embedding_B`` for embeddings) with one
scaling ``lora_alpha / R``, and for DoRA ``.lora_magnitude_vector`` ``(out,)``. Our per-slice adapters on a fused projection (``MergedLinear``) export
exactly: the slices' ``A`` blocks are stacked and each ``B_i`` is placed block-diagonally in a full
``(out, r*k)`` matrix whose rows for unadapted slices are zero, so ``B_full @ A_stack`` is the
fused delta. Every module is zero-padded to the largest rank ``R`` and ``lora_alpha`` is set to
``scaling * R``: one rank and one alpha, which PEFT and vLLM (which ignores ``rank_pattern`` /
``alpha_pattern``) both read the same way. See ``docs/adapters.md``; the import is
:mod:`.peft_import`.
"""

from __future__ import annotations

import math

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as st_save

from ..atomic import atomic_write_dir
from ..inject.injector import get_lora_config
from ..inject.matching import is_hf_conv1d, under_any
from ..layers import Embedding, Linear, LoRALayer, MergedLinear, lora_layers
from ..layers.base import is_data_init
from ..layers.slices import iter_slices
from .state import adapter_param_keys, adapter_state_dict, to_saveable

logger = logging.getLogger(__name__)

__all__ = ["export_peft", "peft_state_dict", "PEFT_WEIGHTS_FILE", "PEFT_CONFIG_FILE", "PEFT_PREFIX",
           "json_number", "peft_targetable", "compress_targets"]

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel's path to the wrapped model, on every key


def json_number(x: float) -> int | float:
    """``x`` as PEFT writes it: an int when whole (``16``, not ``16.0``)."""
    return int(x) if float(x).is_integer() else float(x)


def peft_targetable(module: nn.Module) -> bool:
    """True for the module types PEFT's LoRA wraps when a target name matches them."""
    return isinstance(module, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)) \
        or is_hf_conv1d(module)


def compress_targets(chosen: list[str], candidates: dict[str, set[str]]) -> list[str]:
    """A PEFT target list: a short name where it selects exactly the chosen paths, else full paths.

    Args:
        chosen: the qualified module paths to select.
        candidates: short name -> every path PEFT would select by that name.
    """
    by_short: dict[str, set[str]] = {}
    for p in chosen:
        by_short.setdefault(p.rpartition(".")[2], set()).add(p)
    out: list[str] = []
    for short, paths in sorted(by_short.items()):
        out += [short] if paths == candidates.get(short) else sorted(paths)
    return out


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _dropout_p(layer: LoRALayer) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))


def _full_factors(name: str, layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's update as one PEFT pair ``A (rank, in)``, ``B (out, rank)``; exact. A PiSSA/OLoRA
    layer gives its rank-2r update for the original base (``original_base_factors``)."""
    if isinstance(layer, (Linear, MergedLinear)):
        A, B_stacked, r, _ = layer.original_base_factors()
        if not isinstance(layer, MergedLinear):
            return A, B_stacked
        B = B_stacked.new_zeros(layer.out_features, A.shape[0])
        for s in iter_slices(layer.lora_slices, r):  # block-diagonal: a slice sees only its A_i
            B[s.out_rows, s.a_rows] = B_stacked[s.b_rows]
        return A, B
    if isinstance(layer, (Linear, Embedding)):
        return layer.lora_A.detach(), layer.lora_B.detach()
    raise ValueError(f"export_peft: {name} is a LoRA {type(layer).__name__}; PEFT factorises "
                     "convolutions differently (A is a full-kernel conv, B a 1x1 conv), so it cannot "
                     "be exported exactly. Allowed layer types: Linear, MergedLinear, Embedding")


def _full_magnitude(layer: LoRALayer) -> torch.Tensor:
    """A DoRA layer's magnitude over all ``out`` rows, as PEFT holds it: rows no slice adapts get
    ``||W_i||``, which PEFT's own norm of ``W_i + 0`` divides back to a gain of 1."""
    m = layer.lora_magnitude.detach()
    if not isinstance(layer, MergedLinear) or m.shape[0] == layer.out_features:
        return m
    base = layer.dense_base_weight()
    base = base.T if layer.fan_in_fan_out else base  # (out, in)
    full = torch.linalg.vector_norm(base.float(), dim=1).to(m.dtype)
    offset = 0
    for start, size in layer.lora_slices:
        full[start:start + size] = m[offset:offset + size]
        offset += size
    return full


def _dora_flag(layers: dict[str, LoRALayer]) -> bool:
    """PEFT's one ``use_dora`` for the file; a model mixing DoRA and plain layers is refused."""
    dora = {name for name, layer in layers.items() if getattr(layer, "use_dora", False)}
    if dora and len(dora) != len(layers):
        plain = sorted(set(layers) - dora)
        raise ValueError(f"export_peft: PEFT has one use_dora for a whole adapter, but {len(dora)} "
                         f"layers use DoRA and {len(plain)} do not (e.g. {plain[0]})")
    return bool(dora)


def _rank_pattern(ranks: dict[str, int], rank: int) -> dict[str, int]:
    """PEFT ``rank_pattern`` for modules below ``rank``: by leaf name where that is unambiguous."""
    by_leaf: dict[str, set[int]] = {}
    for name, r in ranks.items():
        by_leaf.setdefault(name.rpartition(".")[2], set()).add(r)
    pattern: dict[str, int] = {}
    for name, r in ranks.items():
        leaf = name.rpartition(".")[2]
        if r != rank:
            # PEFT matches keys as regexes against the end of the module path.
            pattern[leaf if len(by_leaf[leaf]) == 1 else re.escape(name)] = r
    return pattern


def peft_state_dict(model: nn.Module, pad_to_max_rank: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT ``(tensors, adapter_config)`` that :func:`export_peft` writes.

    Args:
        model: a model with LoRA layers.
        pad_to_max_rank: zero-pad every module to the largest rank (one ``r``, one ``lora_alpha``;
            what vLLM reads). False keeps each module's rank and writes PEFT's ``rank_pattern`` /
            ``alpha_pattern`` instead: smaller, exact in PEFT, but vLLM ignores both patterns.

    Returns:
        ``(tensors keyed as PEFT saves them, the adapter_config.json dict)``.

    Raises:
        ValueError: if the model holds no LoRA layer or a LoRA convolution.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("export_peft: the model holds no LoRA layer with r > 0")
    factors = {name: _full_factors(name, layer) for name, layer in layers.items()}
    use_dora = _dora_flag(layers)
    rank = max(A.shape[0] for A, _ in factors.values())
    s_ref = next(iter(layers.values())).scaling
    tensors: dict[str, torch.Tensor] = {}
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    for name, (A, B) in factors.items():
        layer = layers[name]
        if pad_to_max_rank:
            pad = rank - A.shape[0]
            A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))  # zero rows of A, zero cols of B
        if layer.scaling != s_ref:  # one alpha for the whole file: fold the ratio into B
            B = (B.float() * (layer.scaling / s_ref)).to(B.dtype)
            logger.info("export_peft: %s has scaling %g != %g; folded the ratio into lora_B",
                        name, layer.scaling, s_ref)
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if isinstance(layer, Embedding)
                        else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{PEFT_PREFIX}{name}.{a_key}"] = A
        tensors[f"{PEFT_PREFIX}{name}.{b_key}"] = B
        if use_dora:  # zero padding and a B folded to s_ref leave every row's norm unchanged
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = _full_magnitude(layer)
    # Biases and modules_to_save: PEFT keeps the bias of a wrapped module under ``base_layer``.
    own = adapter_param_keys(model)
    for key, t in adapter_state_dict(model).items():
        if key in own:
            continue
        module_name, _, leaf = key.rpartition(".")
        if leaf == "bias" and module_name in layers:
            key = f"{module_name}.base_layer.bias"
        tensors[PEFT_PREFIX + key] = t
    config = get_lora_config(model)
    to_save = config.modules_to_save if config is not None else None
    candidates: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        if n and peft_targetable(m) and not under_any(n, to_save):  # PEFT never adapts modules_to_save
            candidates.setdefault(n.rpartition(".")[2], set()).add(n)
    targets = compress_targets(list(layers), candidates)
    rank_pattern = {} if pad_to_max_rank else _rank_pattern(ranks, rank)
    # rsLoRA when every layer has it (alpha / sqrt(r)), else alpha / r: either way alpha is chosen
    # so that PEFT's scaling is s_ref, and the logits are ours.
    rslora = all(getattr(layer, "use_rslora", False) for layer in layers.values())
    denom = math.sqrt if rslora else float
    alpha_pattern = {k: json_number(s_ref * denom(v)) for k, v in rank_pattern.items()}
    model_cfg = getattr(model, "config", None)
    peft_cfg = {
        "alora_invocation_tokens": None, "alpha_pattern": alpha_pattern, "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": getattr(model_cfg, "_name_or_path", None) or None,
        "bias": config.bias if config is not None else "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": any(getattr(l, "fan_in_fan_out", False) for l in layers.values()),
        "inference_mode": True, "kasa_config": None,
        # a PiSSA/OLoRA adapter is exported converted: a plain init on the original base
        "init_lora_weights": config.init_lora_weights if config is not None
        and not is_data_init(config.init_lora_weights) else True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": json_number(s_ref * denom(rank)), "lora_bias": False,
        "lora_dropout": config.lora_dropout if config is not None
        else _dropout_p(next(iter(layers.values()))),
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": list(config.modules_to_save) if config is not None
        and config.modules_to_save else None,
        "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": rank,
        "rank_pattern": rank_pattern, "revision": None, "target_modules": targets, "target_parameters": None,
        "task_type": "CAUSAL_LM" if _is_causal_lm(model) else None,
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": use_dora,
        "use_qalora": False, "use_rslora": rslora, "velora_config": None,
    }
    return tensors, peft_cfg


def export_peft(model: nn.Module, path: str | Path, pad_to_max_rank: bool = True) -> Path:
    """Write ``model``'s adapter as a PEFT LoRA adapter directory (atomic; weights file first).

    ``PeftModel.from_pretrained(base_model, path)`` then gives the same outputs as ``model``.

    Args:
        model: a model with LoRA layers.
        path: the directory to write (created, or its two files replaced).
        pad_to_max_rank: see :func:`peft_state_dict`; keep True for vLLM.

    Returns:
        The directory written.

    Raises:
        ValueError: no LoRA layer, a LoRA convolution, or ``path`` is an existing file.
    """
    tensors, cfg = peft_state_dict(model, pad_to_max_rank)
    blob = st_save(to_saveable(tensors), metadata={"format": "pt"})
    if cfg["modules_to_save"]:
        logger.warning("export_peft: modules_to_save=%s; PEFT loads them but vLLM refuses adapters "
                       "with modules_to_save", cfg["modules_to_save"])
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    out = atomic_write_dir(path, [(PEFT_WEIGHTS_FILE, blob), (PEFT_CONFIG_FILE, text.encode())])
    logger.info("exported PEFT adapter (rank %d, lora_alpha %s, %d tensors) to %s",
                cfg["r"], cfg["lora_alpha"], len(tensors), out)
    return out
