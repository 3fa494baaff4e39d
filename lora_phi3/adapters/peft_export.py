"""Export our adapters as Hugging Face PEFT LoRA adapters (and the facts of that format).

PEFT stores, per adapted module, ``base_model.model.<path>.lora_A.weight`` ``(R, in)`` and
``.lora_B.weight`` ``(out, R)`` (``lora_embedding_A``/``lora_embedding_B`` for embeddings) with one
scaling ``lora_alpha / R``; for DoRA ``.lora_magnitude_vector`` (``(out,)``; ``(embedding_dim,)`` for
an embedding; ``(1, out, 1, ...)`` for a convolution), and with ``lora_bias`` ``.lora_B.bias``
``(out,)``. A convolution's pair is two conv kernels, ``A`` ``(R, in, *kernel)`` and ``B``
``(out, R // groups, 1, ...)`` (our ``lora_layout="peft"``); an ``nn.MultiheadAttention`` holds the in-projection's pair under its own
path and the output projection's under ``<path>.base_layer.out_proj``; trainable tokens are
``<path>.token_adapter.trainable_tokens_delta`` ``(k, dim)`` with the ids in the config's
``trainable_token_indices``. Our per-slice adapters on a fused projection (``MergedLinear``) export
exactly: the slices' ``A`` blocks are stacked and each ``B_i`` is placed block-diagonally in a full
``(out, r*k)`` matrix whose rows for unadapted slices are zero, so ``B_full @ A_stack`` is the
fused delta (and a lora bias is 0 on the unadapted rows). An adapter on a parameter
(``target_parameters``, PEFT's ``ParamWrapper``) is keyed by the path of the module holding the
parameter, with one ``.base_layer`` per adapted parameter the module registers after it (PEFT nests
one wrapper per parameter, the first innermost); a 3-D ``(E, out, in)`` parameter's pair is
``lora_A`` ``(E * R, in)`` (expert ``e``'s rows ``[e * R, (e + 1) * R)``) and ``lora_B``
``(out, R * E)`` (expert ``e``'s column ``k`` at ``k * E + e``). Every module is zero-padded to the largest rank ``R`` and ``lora_alpha`` is set to
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
from safetensors.torch import save as st_save

from ..atomic import atomic_write_dir
from ..inject.injector import get_lora_config
from ..inject.matching import is_hf_conv1d, under_any
from ..inject.named import adapter_names, using_adapter
from ..layers import (Embedding, Linear, LoRALayer, LoRAParameters, MergedLinear,
                      MultiheadAttention, ParamLoRA, TrainableTokens, lora_layers)
from ..layers.param_lora import param_lora_name, split_param_lora_name
from ..layers.base import is_data_init
from ..layers.conv import _ConvLoRA
from ..layers.slices import iter_slices
from .state import adapter_param_keys, adapter_state_dict, to_saveable

logger = logging.getLogger(__name__)

__all__ = ["export_peft", "peft_state_dict", "PEFT_WEIGHTS_FILE", "PEFT_CONFIG_FILE", "PEFT_PREFIX",
           "PEFT_TOKENS_KEY", "json_number", "peft_targetable", "compress_targets", "pad_rank",
           "peft_path", "nested_in", "peft_param_paths", "parameter_candidates"]

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel's path to the wrapped model, on every key
PEFT_TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # after the embedding's path


def json_number(x: float) -> int | float:
    """``x`` as PEFT writes it: an int when whole (``16``, not ``16.0``)."""
    return int(x) if float(x).is_integer() else float(x)


def peft_targetable(module: nn.Module) -> bool:
    """True for the module types PEFT's LoRA wraps when a target name matches them (a host of
    adapters on parameters counts as the module it stands for)."""
    if isinstance(module, LoRAParameters):
        module = module.base_module
    return isinstance(module, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd,
                               nn.MultiheadAttention)) or is_hf_conv1d(module)


def nested_in(name: str, names) -> str | None:
    """The nearest proper ancestor of the module path ``name`` among ``names``, or None (an
    ``nn.MultiheadAttention``'s ``out_proj`` adapter is nested in the attention's)."""
    parts = name.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                 if p in names), None)


def peft_path(path: str, wrapped) -> str:
    """``path`` as PEFT names it: ``.base_layer`` after every module in ``wrapped`` (the LoRA layers)
    that it passes through, since PEFT keeps the original module there
    (``mha.out_proj`` -> ``mha.base_layer.out_proj``, ``fc.bias`` -> ``fc.base_layer.bias``). A
    ``wrapped`` mapping to an int wraps that module so many times (one ``ParamWrapper`` per
    adapted parameter)."""
    parts, out = path.split("."), []
    for i, part in enumerate(parts[:-1]):
        out.append(part)
        prefix = ".".join(parts[:i + 1])
        if prefix in wrapped:
            depth = wrapped[prefix] if isinstance(wrapped, dict) else 1
            out += ["base_layer"] * (depth if isinstance(depth, int) else 1)
    return ".".join(out + parts[-1:])


def peft_param_paths(host: str, parameter_names: list[str]) -> dict[str, str]:
    """Parameter name -> the module path PEFT keys its adapter under: PEFT wraps the module once
    per adapted parameter in registration order, so the first is innermost
    (``experts.base_layer`` for ``gate_up_proj``, ``experts`` for ``down_proj``)."""
    k = len(parameter_names)
    return {p: ".".join([host] + ["base_layer"] * (k - 1 - i)) for i, p in enumerate(parameter_names)}


def parameter_candidates(model: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> the path ``<module>.<parameter>`` of every module's own parameter of that
    name: what a short ``target_parameters`` entry selects in PEFT."""
    out: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        for p, t in m._parameters.items():
            if n and t is not None:
                out.setdefault(p, set()).add(f"{n}.{p}")
    return out


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int, groups: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` zero-padded to ``rank`` with ``B @ A`` unchanged: zero rows of ``A``, zero columns
    of ``B``. A grouped conv's ``B`` reads rank channels in ``groups`` blocks, so each block is
    padded at its end (``rank`` must split into the groups).

    Raises:
        ValueError: ``rank`` is not divisible by ``groups``.
    """
    r = A.shape[0]
    if rank == r:
        return A, B
    if rank % groups:
        raise ValueError(f"cannot pad a rank-{r} conv adapter to rank {rank}: its groups={groups} "
                         f"must divide the rank")
    per, new_per = r // groups, rank // groups
    A_blocks = A.reshape(groups, per, *A.shape[1:])
    A = torch.cat([A_blocks, A.new_zeros(groups, new_per - per, *A.shape[1:])], 1).flatten(0, 1)
    B = torch.cat([B, B.new_zeros(B.shape[0], new_per - per, *B.shape[2:])], 1)
    return A, B


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
    """The layer's update as one PEFT pair ``A (rank, in)``, ``B (out, rank)`` (conv kernels for a
    convolution); exact. A PiSSA/OLoRA layer gives its rank-2r update for the original base
    (``original_base_factors``)."""
    if isinstance(layer, (Linear, MergedLinear)):
        A, B_stacked, r, _ = layer.original_base_factors()
        if not isinstance(layer, MergedLinear):
            return A, B_stacked
        B = B_stacked.new_zeros(layer.out_features, A.shape[0])
        for s in iter_slices(layer.lora_slices, r):  # block-diagonal: a slice sees only its A_i
            B[s.out_rows, s.a_rows] = B_stacked[s.b_rows]
        return A, B
    if isinstance(layer, _ConvLoRA) and layer.lora_layout != "peft":
        raise ValueError(f"export_peft: {name} is a LoRA {type(layer).__name__} in "
                         f"lora_layout={layer.lora_layout!r}; PEFT factorises convolutions "
                         "differently (A a full-kernel conv, B a 1x1 conv), so it cannot be exported "
                         "exactly. Build it with lora_layout='peft' (as inject_lora does)")
    if isinstance(layer, (Linear, Embedding, MultiheadAttention, _ConvLoRA, ParamLoRA)):
        return layer.lora_A.detach(), layer.lora_B.detach()  # ParamLoRA: ours, rank first
    raise ValueError(f"export_peft: {name} is a LoRA {type(layer).__name__}, which has no PEFT "
                     "form. Allowed layer types: Linear, MergedLinear, Embedding, Conv1d/2d/3d "
                     "(lora_layout='peft'), MultiheadAttention, TrainableTokens, ParamLoRA")


def _full_magnitude(layer: LoRALayer) -> torch.Tensor:
    """A DoRA layer's magnitude over all ``out`` rows, as PEFT holds it: rows no slice adapts get
    ``||W_i||``, which PEFT's own norm of ``W_i + 0`` divides back to a gain of 1; a convolution's
    is PEFT's ``(1, out, 1, ...)``."""
    m = layer.lora_magnitude.detach()
    if isinstance(layer, _ConvLoRA):
        return m.view(1, -1, *(1,) * (layer.weight.dim() - 2))
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


def _full_lora_bias(layer: LoRALayer) -> torch.Tensor:
    """``lora_B``'s bias over all ``out`` rows, as PEFT holds it: the layer's ``lora_bias`` on the
    adapted rows, 0 elsewhere and for a layer without one (PEFT gives every ``lora_B`` a bias)."""
    out = layer.lora_B.shape[0] if isinstance(layer, _ConvLoRA) else layer.out_features
    bias = layer._parameters.get("lora_bias")
    if bias is None:
        return layer.lora_B.new_zeros(out).detach()
    if bias.shape[0] == out:
        return bias.detach()
    full, offset = bias.new_zeros(out).detach(), 0
    for start, size in layer.lora_slices:  # the rows of a MergedLinear's adapted slices
        full[start:start + size] = bias[offset:offset + size]
        offset += size
    return full


def _lora_bias_flag(layers: dict[str, LoRALayer]) -> bool:
    """PEFT's one ``lora_bias`` for the file: True if any layer has one (the others export a zero
    bias). PEFT refuses ``lora_bias`` on embeddings, so such a model is refused."""
    biased = [name for name, layer in layers.items()
              if layer._parameters.get("lora_bias") is not None]
    embeddings = [name for name, layer in layers.items() if isinstance(layer, Embedding)]
    if biased and embeddings:
        raise ValueError(f"export_peft: PEFT has one lora_bias for a whole adapter and refuses it on "
                         f"embeddings, but {biased[0]} has a lora bias and {embeddings[0]} is an "
                         "Embedding adapter")
    return bool(biased)


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


def _check_parameter_targets(params: dict[str, ParamLoRA], use_dora: bool, lora_bias: bool,
                             fan_in_fan_out: bool) -> None:
    """PEFT's ``ParamWrapper`` refuses DoRA, ``lora_bias`` and ``fan_in_fan_out``, which PEFT sets
    for a whole adapter: refuse a model mixing them with adapters on parameters."""
    for flag, on in (("use_dora", use_dora), ("lora_bias", lora_bias),
                     ("fan_in_fan_out", fan_in_fan_out)):
        if params and on:
            raise ValueError(f"export_peft: PEFT's adapters on parameters ({next(iter(params))}) "
                             f"refuse {flag}=True, which PEFT sets for the whole adapter, and "
                             f"another layer of this model needs it")


def _param_wrapping(model: nn.Module, params: dict[str, ParamLoRA]) -> tuple[dict[str, str], dict[str, int]]:
    """(adapter name -> the module path PEFT keys it under, host path -> how often PEFT wraps it)."""
    keys, depth = {}, {}
    for name in params:
        host, _ = split_param_lora_name(name)
        if host in depth:
            continue
        order = [p for p in model.get_submodule(host).param_lora if param_lora_name(host, p) in params]
        depth[host] = len(order)
        for p, path in peft_param_paths(host, order).items():
            keys[param_lora_name(host, p)] = path
    return keys, depth


def _check_adapter_name(model: nn.Module, adapter_name: str | None, what: str) -> None:
    if adapter_name is not None and adapter_name not in adapter_names(model):
        raise ValueError(f"{what}: unknown adapter_name {adapter_name!r}; the model's adapters are "
                         f"{adapter_names(model)}")


def peft_state_dict(model: nn.Module, pad_to_max_rank: bool = True,
                    adapter_name: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT ``(tensors, adapter_config)`` that :func:`export_peft` writes.

    Args:
        model: a model with LoRA layers.
        pad_to_max_rank: zero-pad every module to the largest rank (one ``r``, one ``lora_alpha``;
            what vLLM reads). False keeps each module's rank and writes PEFT's ``rank_pattern`` /
            ``alpha_pattern`` instead: smaller, exact in PEFT, but vLLM ignores both patterns.
        adapter_name: which named adapter (default: the active one); it is made active for the
            export and the active one restored after.

    Returns:
        ``(tensors keyed as PEFT saves them, the adapter_config.json dict)``.

    Raises:
        ValueError: if the model holds no LoRA layer (trainable tokens alone have no PEFT LoRA
            form either), an unknown ``adapter_name``, a LoRA convolution in loralib's layout, or
            layers PEFT cannot hold in one adapter (DoRA mixed with plain LoRA; a lora bias beside
            an embedding adapter; a grouped conv that cannot be padded to the rank).
    """
    _check_adapter_name(model, adapter_name, "export_peft")
    with using_adapter(model, adapter_name):
        return _peft_state_dict(model, pad_to_max_rank)


def _peft_state_dict(model: nn.Module, pad_to_max_rank: bool
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    every = lora_layers(model)
    tokens = {n: l for n, l in every.items() if isinstance(l, TrainableTokens)}
    layers = {n: l for n, l in every.items() if n not in tokens}
    if not layers:
        raise ValueError("export_peft: the model holds no LoRA layer with r > 0"
                         + (" (trainable tokens alone are not a PEFT LoRA adapter)" if tokens else ""))
    factors = {name: _full_factors(name, layer) for name, layer in layers.items()}
    use_dora = _dora_flag(layers)
    lora_bias = _lora_bias_flag(layers)
    fan_in_fan_out = any(getattr(l, "fan_in_fan_out", False) for l in layers.values())
    params = {n: l for n, l in layers.items() if isinstance(l, ParamLoRA)}
    _check_parameter_targets(params, use_dora, lora_bias, fan_in_fan_out)
    param_keys, param_depth = _param_wrapping(model, params)
    # PEFT's name of each adapter in rank_pattern / alpha_pattern: a parameter's is its own path
    pattern_names = {n: ".".join(split_param_lora_name(n)) if n in params else n for n in layers}
    rank = max(A.shape[0] for A, _ in factors.values())
    s_ref = next(iter(layers.values())).scaling
    tensors: dict[str, torch.Tensor] = {}
    # An MHA's out_proj adapter takes the attention's rank and alpha in PEFT: it is no target.
    owner = {name: nested_in(name, layers) for name in layers}
    ranks = {name: A.shape[0] for name, (A, _) in factors.items() if owner[name] is None}
    for name, (A, B) in factors.items():
        layer = layers[name]
        to_rank = rank if pad_to_max_rank else ranks[owner[name] or name]
        A, B = pad_rank(A, B, to_rank, getattr(layer, "groups", 1))
        bias = _full_lora_bias(layer) if lora_bias else None
        if layer.scaling != s_ref:  # one alpha for the whole file: fold the ratio into B
            B = (B.float() * (layer.scaling / s_ref)).to(B.dtype)
            bias = None if bias is None else (bias.float() * (layer.scaling / s_ref)).to(bias.dtype)
            logger.info("export_peft: %s has scaling %g != %g; folded the ratio into lora_B",
                        name, layer.scaling, s_ref)
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if isinstance(layer, Embedding)
                        else ("lora_A.weight", "lora_B.weight"))
        path = peft_path(name, layers)
        if isinstance(layer, ParamLoRA):  # keyed by its module, in PEFT's 2-D layout
            path = param_keys[name]
            A, B = layer.peft_factors(A, B)
        tensors[f"{PEFT_PREFIX}{path}.{a_key}"] = A
        tensors[f"{PEFT_PREFIX}{path}.{b_key}"] = B
        if use_dora:  # zero padding and a B folded to s_ref leave every row's norm unchanged
            tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = _full_magnitude(layer)
        if bias is not None:
            tensors[f"{PEFT_PREFIX}{path}.lora_B.bias"] = bias
    for name, layer in tokens.items():
        tensors[f"{PEFT_PREFIX}{name}.{PEFT_TOKENS_KEY}"] = layer.token_values.detach()
    if any(isinstance(layer, MultiheadAttention) for layer in layers.values()):
        logger.warning("export_peft: PEFT <= 0.21 adds an nn.MultiheadAttention's out_proj update "
                       "twice in its forward (huggingface/peft#3774); this model adds it once, so "
                       "PEFT's outputs differ from ours on out_proj until PEFT is fixed")
    # Biases and modules_to_save: PEFT keeps the bias of a wrapped module under ``base_layer``.
    own = adapter_param_keys(model)
    wrapped = {**{n: 1 for n in layers if n not in params}, **param_depth}
    for key, t in adapter_state_dict(model).items():
        if key not in own:
            tensors[PEFT_PREFIX + peft_path(key, wrapped)] = t
    config = get_lora_config(model)
    to_save = config.modules_to_save if config is not None else None
    candidates: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        if n and peft_targetable(m) and not under_any(n, to_save):  # PEFT never adapts modules_to_save
            candidates.setdefault(n.rpartition(".")[2], set()).add(n)
    targets = compress_targets([n for n in ranks if n not in params], candidates)
    target_parameters = compress_targets([pattern_names[n] for n in params],
                                         parameter_candidates(model)) or None
    rank_pattern = {} if pad_to_max_rank else \
        _rank_pattern({pattern_names[n]: r for n, r in ranks.items()}, rank)
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
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True, "kasa_config": None,
        # a PiSSA/OLoRA adapter is exported converted: a plain init on the original base
        "init_lora_weights": config.init_lora_weights if config is not None
        and not is_data_init(config.init_lora_weights) else True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": json_number(s_ref * denom(rank)), "lora_bias": lora_bias,
        "lora_dropout": config.lora_dropout if config is not None
        else _dropout_p(next(iter(layers.values()))),
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": list(config.modules_to_save) if config is not None
        and config.modules_to_save else None,
        "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": rank,
        "rank_pattern": rank_pattern, "revision": None, "target_modules": targets, "target_parameters": target_parameters,
        "task_type": "CAUSAL_LM" if _is_causal_lm(model) else None,
        "trainable_token_indices": {n: list(l.token_indices) for n, l in tokens.items()} or None,
        "use_bdlora": None, "use_dora": use_dora,
        "use_qalora": False, "use_rslora": rslora, "velora_config": None,
    }
    return tensors, peft_cfg


def export_peft(model: nn.Module, path: str | Path, pad_to_max_rank: bool = True,
                adapter_name: str | None = None) -> Path:
    """Write ``model``'s adapter as a PEFT LoRA adapter directory (atomic; weights file first).

    ``PeftModel.from_pretrained(base_model, path)`` then gives the same outputs as ``model``.

    Args:
        model: a model with LoRA layers.
        path: the directory to write (created, or its two files replaced).
        pad_to_max_rank: see :func:`peft_state_dict`; keep True for vLLM.
        adapter_name: which named adapter to export (default: the active one); the file holds it
            as PEFT's only adapter.

    Returns:
        The directory written.

    Raises:
        ValueError: as :func:`peft_state_dict`, or ``path`` is an existing file.
    """
    tensors, cfg = peft_state_dict(model, pad_to_max_rank, adapter_name)
    blob = st_save(to_saveable(tensors), metadata={"format": "pt"})
    if cfg["modules_to_save"]:
        logger.warning("export_peft: modules_to_save=%s; PEFT loads them but vLLM refuses adapters "
                       "with modules_to_save", cfg["modules_to_save"])
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    out = atomic_write_dir(path, [(PEFT_WEIGHTS_FILE, blob), (PEFT_CONFIG_FILE, text.encode())])
    logger.info("exported PEFT adapter (rank %d, lora_alpha %s, %d tensors) to %s",
                cfg["r"], cfg["lora_alpha"], len(tensors), out)
    return out
