"""Hugging Face PEFT interop: export our adapters as PEFT LoRA adapters, import PEFT ones.

PEFT stores, per adapted module, ``base_model.model.<path>.lora_A.weight`` ``(R, in)`` and
``.lora_B.weight`` ``(out, R)`` (``lora_embedding_A``/``lora_embedding_B`` for embeddings) with one
scaling ``lora_alpha / R``. Our per-slice adapters on a fused projection (``MergedLinear``) export
exactly: the slices' ``A`` blocks are stacked and each ``B_i`` is placed block-diagonally in a full
``(out, r*k)`` matrix whose rows for unadapted slices are zero, so ``B_full @ A_stack`` is the
fused delta. Every module is zero-padded to the largest rank ``R`` and ``lora_alpha`` is set to
``scaling * R``: one rank and one alpha, which PEFT and vLLM (which ignores ``rank_pattern`` /
``alpha_pattern``) both read the same way. See ``docs/adapters.md``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as st_save

from ..atomic import atomic_write_dir
from .files import (adapter_state_dict, dtype_name, injected_preview,
                       is_bare, lora_layers, parse_safetensors, read_json, to_saveable)
from ..inject.injector import get_lora_config, inject_lora
from ..config import LoraConfig
from ..inject import phi3
from ..inject.matching import is_hf_conv1d
from ..layers.lora_layers import Embedding, Linear, LoRALayer, MergedLinear

logger = logging.getLogger(__name__)

__all__ = ["export_peft", "import_peft", "peft_state_dict", "PEFT_WEIGHTS_FILE", "PEFT_CONFIG_FILE"]

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# LoRA variants whose forward differs from plain LoRA: refused on import rather than mis-loaded.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "layer_replication", "target_parameters",
                "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                "kasa_config", "monteclora_config")
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMB_KEY = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)"
                      r"(?:\.(?P<adapter>[^.]+))?$")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _targetable(module: nn.Module) -> bool:
    # What PEFT's LoRA wraps: linear-like, embedding and conv modules.
    return isinstance(module, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)) \
        or is_hf_conv1d(module)


def _under(name: str, patterns: list[str] | None) -> bool:
    # PEFT: a module inside (or equal to) a modules_to_save entry is not a LoRA target.
    return bool(patterns) and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in patterns)


def _dropout_p(layer: LoRALayer) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))


def _full_factors(name: str, layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's update as one PEFT pair ``A (rank, in)``, ``B (out, rank)``; exact."""
    if isinstance(layer, MergedLinear):
        r = layer.r
        B = layer.lora_B.new_zeros(layer.out_features, r * len(layer.lora_slices))
        b0 = 0
        for i, (start, size) in enumerate(layer.lora_slices):
            # Block-diagonal: slice i's rows only see its own A_i (columns i*r .. (i+1)*r).
            B[start:start + size, i * r:(i + 1) * r] = layer.lora_B[b0:b0 + size]
            b0 += size
        return layer.lora_A.detach(), B.detach()
    if isinstance(layer, (Linear, Embedding)):
        return layer.lora_A.detach(), layer.lora_B.detach()
    raise ValueError(f"export_peft: {name} is a LoRA {type(layer).__name__}; PEFT factorises "
                     "convolutions differently (A is a full-kernel conv, B a 1x1 conv), so it cannot "
                     "be exported exactly. Allowed layer types: Linear, MergedLinear, Embedding")


def peft_state_dict(model: nn.Module, pad_to_max_rank: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT ``(tensors, adapter_config)`` that :func:`export_peft` writes.

    Args:
        model: a model with LoRA layers.
        pad_to_max_rank: zero-pad every module to the largest rank (one ``r``, one ``lora_alpha``;
            what vLLM reads). False keeps each module's rank and writes PEFT's ``rank_pattern`` /
            ``alpha_pattern`` instead: smaller, exact in PEFT, but vLLM ignores both patterns.

    Raises:
        ValueError: if the model holds no LoRA layer or a LoRA convolution.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("export_peft: the model holds no LoRA layer with r > 0")
    factors = {name: _full_factors(name, layer) for name, layer in layers.items()}
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
        tensors[f"{_PREFIX}{name}.{a_key}"] = A
        tensors[f"{_PREFIX}{name}.{b_key}"] = B
    # Biases and modules_to_save: PEFT keeps the bias of a wrapped module under ``base_layer``.
    for key, t in adapter_state_dict(model).items():
        module_name, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if leaf == "bias" and module_name in layers:
            key = f"{module_name}.base_layer.bias"
        tensors[_PREFIX + key] = t
    config = get_lora_config(model)
    to_save = config.modules_to_save if config is not None else None
    candidates: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        if n and _targetable(m) and not _under(n, to_save):  # PEFT never adapts modules_to_save
            candidates.setdefault(n.rpartition(".")[2], set()).add(n)
    targets = _compress_targets(list(layers), candidates)
    rank_pattern = {} if pad_to_max_rank else _rank_pattern(ranks, rank)
    alpha_pattern = {k: _number(s_ref * v) for k, v in rank_pattern.items()}  # alpha/r stays s
    model_cfg = getattr(model, "config", None)
    peft_cfg = {
        "alora_invocation_tokens": None, "alpha_pattern": alpha_pattern, "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": getattr(model_cfg, "_name_or_path", None) or None,
        "bias": config.bias if config is not None else "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": any(getattr(l, "fan_in_fan_out", False) for l in layers.values()),
        "inference_mode": True, "init_lora_weights": True, "kasa_config": None,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": _number(s_ref * rank), "lora_bias": False,
        "lora_dropout": config.lora_dropout if config is not None
        else _dropout_p(next(iter(layers.values()))),
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": list(config.modules_to_save) if config is not None
        and config.modules_to_save else None,
        "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": rank,
        "rank_pattern": rank_pattern, "revision": None, "target_modules": targets, "target_parameters": None,
        "task_type": "CAUSAL_LM" if _is_causal_lm(model) else None,
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }
    return tensors, peft_cfg


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


# -- import ----------------------------------------------------------------------------------------
def _check_peft_config(cfg: dict[str, Any], where: str) -> None:
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' is supported")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or isinstance(cfg.get(field), bool) \
                or cfg[field] <= 0:
            raise ValueError(f"{where}: {field} must be a positive number, got {cfg.get(field)!r}")
    for field in _UNSUPPORTED:
        if cfg.get(field):
            raise ValueError(f"{where}: {field}={cfg[field]!r} is a LoRA variant this library does "
                             f"not implement; only plain LoRA loads (set {field} to false/null)")


def _pattern_value(pattern: dict[str, Any], module: str) -> Any:
    # PEFT's get_pattern_key: the first key matching the end of the module path.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _peft_scaling(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module) or cfg["lora_alpha"]
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _group_keys(tensors: dict[str, torch.Tensor], where: str):
    """Split PEFT keys into ``{module: {"A", "B", "embedding"}}`` and other model keys."""
    modules: dict[str, dict[str, Any]] = {}
    extras: dict[str, torch.Tensor] = {}
    adapters: set[str] = set()
    for key, t in tensors.items():
        k = key.removeprefix(_PREFIX)
        if "lora_magnitude_vector" in k:
            raise ValueError(f"{where}: {key} is a DoRA magnitude; DoRA is not supported")
        m = _LORA_KEY.match(k) or _EMB_KEY.match(k)
        if m:
            if m["adapter"]:
                adapters.add(m["adapter"])
            entry = modules.setdefault(m["mod"], {"embedding": "embedding" in m["which"]})
            entry[m["which"][-1]] = t
            continue
        k = re.sub(r"\.modules_to_save\.(?:[^.]+\.)?(?=[^.]+$)", ".", k)
        extras[k.replace(".base_layer.", ".")] = t
    if len(adapters) > 1:
        raise ValueError(f"{where}: the file holds several adapters {sorted(adapters)}; "
                         "export one at a time")
    for name, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            raise ValueError(f"{where}: module {name} has only lora_{'A' if 'A' in entry else 'B'}")
    return modules, extras


def _base_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a base module as PEFT's A/B see it (A: (r, in), B: (out, r))."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        return tuple(module.weight.shape)  # (in, out): fan_in_fan_out
    return None


def _fit(name: str, layer: LoRALayer, A: torch.Tensor, B: torch.Tensor, s_peft: float,
         problems: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Express PEFT's ``s_peft * B @ A`` exactly in ``layer``'s own layout, or report why not."""
    if isinstance(layer, MergedLinear):
        slices, out = layer.lora_slices, layer.out_features
    elif isinstance(layer, Embedding):
        slices, out = [(0, layer.embedding_dim)], layer.embedding_dim
    elif isinstance(layer, Linear):
        slices, out = [(0, layer.out_features)], layer.out_features
    else:
        problems.append(f"{name}: PEFT adapters load into Linear, MergedLinear and Embedding "
                        f"layers, not {type(layer).__name__}")
        return None
    in_dim, r = layer.lora_A.shape[1], layer.r
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_dim or B.shape[0] != out \
            or A.shape[0] != B.shape[1]:
        problems.append(f"shape mismatch for {name}: file lora_A {tuple(A.shape)}, lora_B "
                        f"{tuple(B.shape)}; model needs lora_A (rank, {in_dim}), lora_B ({out}, rank)")
        return None
    covered = torch.zeros(out, dtype=torch.bool)
    for start, size in slices:
        covered[start:start + size] = True
    if (B[~covered] != 0).any():
        problems.append(f"{name}: the file updates output rows the model's MergedLinear does not "
                        f"adapt (enable_lora={getattr(layer, 'enable_lora', None)})")
        return None
    ratio = s_peft / layer.scaling
    As, Bs = [], []
    for start, size in slices:
        Ai, Bi = A, B[start:start + size]
        cols = (Bi != 0).any(0).nonzero().flatten()
        if cols.numel() > r:
            problems.append(f"{name}: rows [{start}, {start + size}) need rank {cols.numel()} "
                            f"but the model's layer has r={r}")
            return None
        if 0 < cols.numel() < A.shape[0]:
            # Only these columns of B act on this slice (e.g. one block of a block-diagonal
            # export): keep them and their rows of A, which recovers per-slice factors exactly.
            Ai, Bi = A[cols], Bi[:, cols]
        elif A.shape[0] > r:  # an all-zero slice (untrained B): any r rows of A keep it trainable
            Ai, Bi = A[:r], Bi[:, :r]
        Ai = F.pad(Ai.float(), (0, 0, 0, r - Ai.shape[0]))
        Bi = F.pad(Bi.float(), (0, r - Bi.shape[1]))
        As.append(Ai)
        Bs.append(Bi if ratio == 1.0 else Bi * ratio)
    return (torch.cat(As).to(layer.lora_A.dtype), torch.cat(Bs).to(layer.lora_B.dtype))


def _compress_targets(chosen: list[str], candidates: dict[str, set[str]]) -> list[str]:
    """A target list: a short name where it selects exactly the chosen paths, else full paths."""
    by_short: dict[str, set[str]] = {}
    for p in chosen:
        by_short.setdefault(p.rpartition(".")[2], set()).add(p)
    out: list[str] = []
    for short, paths in sorted(by_short.items()):
        out += [short] if paths == candidates.get(short) else sorted(paths)
    return out


def _nonzero_cols(B: torch.Tensor) -> int:
    return int((B != 0).any(0).sum())


def _derived_config(cfg: dict[str, Any], modules: dict[str, dict[str, Any]],
                    model: nn.Module) -> LoraConfig:
    """The LoraConfig that, injected into the bare ``model``, holds the PEFT adapter exactly.

    On Phi-3 a fused module gets adapters only on the slices whose rows of ``B`` are non-zero
    (all of them if ``B`` is all zero), so our own per-slice export comes back as it was. The rank
    is the most non-zero ``B`` columns any slice needs (PEFT's rank if ``B`` is all zero).
    """
    slice_map = phi3.phi3_slice_map(model) if phi3.is_phi3(model) else {}
    candidates: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        if n and _targetable(m):
            candidates.setdefault(n.rpartition(".")[2], set()).add(n)
        prefix = n[: len(n) - len(n.rpartition(".")[2])]
        for alias in slice_map[n].slice_names if n in slice_map else ():
            candidates.setdefault(alias, set()).add(prefix + alias)
    chosen, rank = [], 0
    for name in sorted(modules):
        B = modules[name]["B"]
        fused = slice_map.get(name)
        if fused is None:
            chosen.append(name)
            rank = max(rank, _nonzero_cols(B))
            continue
        offsets = [sum(fused.split_sizes[:i]) for i in range(len(fused.split_sizes))]
        parts = [B[o:o + s] for o, s in zip(offsets, fused.split_sizes)]
        live = [i for i, part in enumerate(parts) if (part != 0).any()] or list(range(len(parts)))
        prefix = name[: len(name) - len(name.rpartition(".")[2])]
        chosen += [name] if len(live) == len(parts) else [prefix + fused.slice_names[i] for i in live]
        rank = max([rank] + [_nonzero_cols(parts[i]) for i in live])
    rank = rank or max(e["A"].shape[0] for e in modules.values())
    first = sorted(modules)[0]
    s_ref = _peft_scaling(cfg, first, modules[first]["A"].shape[0])
    to_save = cfg.get("modules_to_save") or None
    return LoraConfig(r=rank, lora_alpha=_number(s_ref * rank),
                      lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                      target_modules=_compress_targets(chosen, candidates),
                      bias=cfg.get("bias") or "none", modules_to_save=list(to_save) if to_save else None,
                      fan_in_fan_out=bool(cfg.get("fan_in_fan_out")))


def import_peft(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, after checking all of it.

    A model without LoRA layers is first injected with a config derived from the file (the
    adapted modules, on Phi-3 only the slices the file updates, the rank its non-zero ``B``
    columns need, ``lora_alpha`` keeping the scaling); the file is checked against a weightless
    preview of that injection before the model is touched. Into an
    already-injected model each PEFT pair is mapped exactly onto the layer's layout (a fused
    PEFT update onto per-slice adapters, rank padding, a block-diagonal ``B`` back to its slices)
    or refused. Keys may carry the ``base_model.model.`` prefix and an adapter name
    (``lora_A.default.weight``).

    Args:
        model: a transformers model (e.g. ``Phi3ForCausalLM``) or any module.
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        strict: refuse model LoRA layers that the file does not cover.

    Returns:
        ``model``.

    Raises:
        ValueError: on any problem (unsupported variant, missing/unexpected/mis-shaped keys,
            non-float tensors, corrupt file); the model is then unchanged.
    """
    path = Path(path)
    where = f"PEFT adapter {str(path)!r}"
    cfg_path, st_path = path / PEFT_CONFIG_FILE, path / PEFT_WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ValueError(f"{where} lacks {PEFT_CONFIG_FILE!r}")
    if not st_path.is_file():
        hint = (" (it has adapter_model.bin, a pickle; re-save it with PEFT's "
                "save_pretrained(safe_serialization=True))" if (path / "adapter_model.bin").exists() else "")
        raise ValueError(f"{where} lacks {PEFT_WEIGHTS_FILE!r}{hint}")
    cfg = read_json(cfg_path)
    _check_peft_config(cfg, where)
    tensors = parse_safetensors(st_path.read_bytes(), str(st_path))
    bad = [f"{k} ({dtype_name(t.dtype)})" for k, t in tensors.items() if t.dtype not in _FLOATS]
    if bad:
        raise ValueError(f"{where}: non-floating tensors {bad}")
    modules, extras = _group_keys(tensors, where)
    if not modules:
        raise ValueError(f"{where} holds no lora_A/lora_B tensors")
    if cfg.get("init_lora_weights") == "loftq" or cfg.get("loftq_config"):
        logger.warning("%s was trained with LoftQ: it expects the LoftQ-initialised base weights", where)

    target, derived = model, None
    if is_bare(model):
        named, problems = dict(model.named_modules()), []
        for name, entry in modules.items():
            dims = _base_dims(named[name]) if name in named else None
            if dims is None:
                problems.append(f"module {name} does not exist in the model or is not linear/embedding")
            elif entry["A"].dim() != 2 or entry["B"].dim() != 2 or \
                    (entry["A"].shape[1], entry["B"].shape[0]) != dims:
                problems.append(f"shape mismatch for {name}: file lora_A {tuple(entry['A'].shape)}, "
                                f"lora_B {tuple(entry['B'].shape)}; the model's (in, out) is {dims}")
        problems += _extra_problems(model.state_dict(), extras)
        if problems:
            raise ValueError(f"{where} does not fit the model (nothing was changed): "
                             + "; ".join(problems))
        derived = _derived_config(cfg, modules, model)
        target = injected_preview(model, derived)  # validate against a weightless copy

    layers, problems, to_load = lora_layers(target), [], {}
    unexpected = sorted(set(modules) - set(layers))
    missing = sorted(set(layers) - set(modules))
    if unexpected:
        problems.append(f"unexpected modules (no LoRA layer in the model) {unexpected}")
    if strict and missing:
        problems.append(f"missing modules (LoRA layers the file does not cover) {missing}")
    for name in sorted(set(modules) & set(layers)):
        A, B = modules[name]["A"], modules[name]["B"]
        fitted = _fit(name, layers[name], A, B, _peft_scaling(cfg, name, A.shape[0]), problems)
        if fitted is not None:
            to_load[f"{name}.lora_A"], to_load[f"{name}.lora_B"] = fitted
    expected_extras = {k for k in adapter_state_dict(target) if k.rpartition(".")[2] not in
                       ("lora_A", "lora_B")}
    if strict and expected_extras - set(extras):
        problems.append(f"missing keys {sorted(expected_extras - set(extras))}")
    problems += _extra_problems(target.state_dict(), extras)
    if problems:
        raise ValueError(f"{where} does not fit the model (nothing was changed): " + "; ".join(problems))
    if derived is not None:
        inject_lora(model, derived)
    state = model.state_dict()
    to_load.update({k: v.to(state[k].dtype) for k, v in extras.items() if k in state})
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)  # LoRA layers unmerge/re-merge themselves
    logger.info("imported %d PEFT modules (+%d other tensors) from %s", len(modules), len(extras), path)
    return model


def _extra_problems(state: dict[str, torch.Tensor], extras: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    unknown = sorted(k for k in extras if k not in state)
    if unknown:
        problems.append(f"unexpected keys {unknown}")
    for k, t in extras.items():
        if k in state and tuple(state[k].shape) != tuple(t.shape):
            problems.append(f"shape mismatch for {k}: file {tuple(t.shape)}, model "
                            f"{tuple(state[k].shape)}")
    return problems
