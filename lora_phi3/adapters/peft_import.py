"""Import Hugging Face PEFT LoRA adapters, after checking all of them against the model.

A PEFT file holds one ``lora_A`` ``(R, in)`` / ``lora_B`` ``(out, R)`` pair per module (conv kernels
for a convolution), with DoRA a magnitude and with ``lora_bias`` a ``lora_B.bias`` per module, and
trainable tokens' values (the format is described in :mod:`.peft_export`).
Into an injected model each pair is mapped exactly onto the layer's own layout (a fused update onto
per-slice adapters, rank padding, a block-diagonal ``B`` back to its slices) or refused; adapters on
parameters (``target_parameters``) are found by PEFT's rules on the model and renamed to
:class:`~lora_phi3.layers.ParamLoRA` layers (``<module>.param_lora.<parameter>``); a bare
model is first injected with a config derived from the file; into a model with other named
adapters the file becomes a new one (``adapter_name``).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LoraConfig
from ..inject import phi3
from ..inject.injector import check_adapter_name, inject_lora
from ..inject.matching import is_hf_conv1d, param_plan
from ..inject.named import add_adapter, adapter_names, delete_adapter, using_adapter
from ..layers import (Embedding, Linear, LoRALayer, MergedLinear, MultiheadAttention, ParamLoRA,
                      TrainableTokens, lora_layers)
from ..layers.conv import _ConvLoRA
from ..layers.param_lora import from_peft_factors, param_lora_name
from .peft_export import (PEFT_CONFIG_FILE, PEFT_PREFIX, PEFT_TOKENS_KEY, PEFT_WEIGHTS_FILE,
                          compress_targets, json_number, pad_rank, parameter_candidates,
                          peft_param_paths, peft_targetable)
from .schema import is_int, is_number, is_positive_number
from .state import adapter_param_keys, adapter_state_dict, injected_preview, is_bare
from .validate import decode_safetensors, non_float_keys, read_json

logger = logging.getLogger(__name__)

__all__ = ["import_peft"]

# LoRA variants whose forward differs from plain LoRA: refused on import rather than mis-loaded.
_UNSUPPORTED = ("use_qalora", "layer_replication",
                "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config",
                "monteclora_config")
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_BIAS_KEY = re.compile(r"^(?P<mod>.+)\.lora_B(?:\.(?P<adapter>[^.]+))?\.bias$")
_MAG_KEY = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+)\.weight)?$")
_EMB_KEY = re.compile(r"^(?P<mod>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)"
                      r"(?:\.(?P<adapter>[^.]+))?$")
_TOKENS_KEY = re.compile(rf"^(?P<mod>.+)\.{re.escape(PEFT_TOKENS_KEY)}(?:\.(?P<adapter>[^.]+))?$")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_int(i, 0) for i in value)


def _check_peft_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse a PEFT config this import cannot read as plain LoRA: wrong types included."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' is supported")
    if not is_int(cfg.get("r"), 1):
        raise ValueError(f"{where}: r must be a positive int, got {cfg.get('r')!r}")
    if not is_positive_number(cfg.get("lora_alpha")):
        raise ValueError(f"{where}: lora_alpha must be a positive number, got {cfg.get('lora_alpha')!r}")
    for field, ok, kind in (("rank_pattern", lambda v: is_int(v, 1), "int"),
                            ("alpha_pattern", is_positive_number, "number")):
        pattern = cfg.get(field)
        if pattern is not None and not (isinstance(pattern, dict)
                                        and all(ok(v) for v in pattern.values())):
            raise ValueError(f"{where}: {field} must be an object {{module regex: positive "
                             f"{kind}}} or null, got {pattern!r}")
        for key in pattern or {}:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{where}: {field} key {key!r} is not a valid regex ({e})") from None
    for field in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        if cfg.get(field) is not None and not isinstance(cfg[field], bool):
            raise ValueError(f"{where}: {field} must be a bool, got {cfg[field]!r}")
    if cfg.get("lora_bias") and cfg.get("use_dora"):
        raise ValueError(f"{where}: lora_bias=true with use_dora=true, a pair PEFT itself refuses; "
                         "set one of them to false")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not (is_number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1) or null, got {dropout!r}")
    to_save = cfg.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list)
                                    and all(isinstance(n, str) and n for n in to_save)):
        raise ValueError(f"{where}: modules_to_save must be a list of module names or null, "
                         f"got {to_save!r}")
    tokens = cfg.get("trainable_token_indices")
    if tokens is not None and not (_token_ids(tokens) or isinstance(tokens, dict) and all(
            isinstance(k, str) and _token_ids(v) for k, v in tokens.items())):
        raise ValueError(f"{where}: trainable_token_indices must be a list of token ids, an object "
                         f"{{module name: [token ids]}} or null, got {tokens!r}")
    params = cfg.get("target_parameters")
    if params is not None and not (isinstance(params, list) and all(isinstance(n, str) and n
                                                                    for n in params)):
        raise ValueError(f"{where}: target_parameters must be a list of parameter names or null, "
                         f"got {params!r}")
    for field in ("lora_dropout", "use_dora", "lora_bias"):
        if params and cfg.get(field):
            raise ValueError(f"{where}: target_parameters with {field}={cfg[field]!r}, which PEFT "
                             "refuses on parameters too")
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


def _peft_rank(cfg: dict[str, Any], module: str) -> int:
    """The rank PEFT gives ``module``: its ``rank_pattern`` entry, else ``r``."""
    return _pattern_value(cfg.get("rank_pattern") or {}, module) or cfg["r"]


def _peft_scaling(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module) or cfg["lora_alpha"]
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _pattern_name(name: str, entry: dict[str, Any]) -> str:
    """The module whose ``rank_pattern``/``alpha_pattern`` entry applies: an MHA's out_proj adapter
    takes its attention's; an adapter on a parameter, the parameter's path."""
    return entry.get("pattern") or entry.get("owner") or name


def _token_indices_for(cfg: dict[str, Any], name: str) -> list[int] | None:
    """The ids PEFT's ``trainable_token_indices`` gives the embedding at ``name`` (PEFT matches a
    dict key as a plain suffix of the path; a list means the input embeddings)."""
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, dict):
        return next((ids for key, ids in spec.items() if name.endswith(key)), None)
    return spec


def _group_keys(tensors: dict[str, torch.Tensor], where: str, use_dora: bool, lora_bias: bool):
    """Split PEFT keys into ``{module: {"A", "B", "M" (DoRA), "bias" (lora_bias), "embedding",
    "owner"}}``, trainable tokens' values ``{embedding: (k, dim)}`` and other model keys.

    PEFT keeps a wrapped module under ``base_layer``; an adapter nested in another's wrapped module
    (an MHA's ``out_proj``) is renamed to our path (``mha.base_layer.out_proj`` -> ``mha.out_proj``)
    and keeps its ``owner``.
    """
    modules: dict[str, dict[str, Any]] = {}
    extras: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}
    adapters: set[str] = set()
    magnitudes: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key.removeprefix(PEFT_PREFIX)
        tok = _TOKENS_KEY.match(k)
        if tok:
            if tok["adapter"]:
                adapters.add(tok["adapter"])
            tokens[tok["mod"]] = t
            continue
        mag = _MAG_KEY.match(k)
        if mag:
            if not use_dora:
                raise ValueError(f"{where}: {key} is a DoRA magnitude but the config has "
                                 "use_dora false")
            if mag["adapter"]:
                adapters.add(mag["adapter"])
            magnitudes[mag["mod"]] = t
            continue
        bias = _BIAS_KEY.match(k)
        if bias:
            if not lora_bias:
                raise ValueError(f"{where}: {key} is a lora_B bias but the config has lora_bias "
                                 "false")
            if bias["adapter"]:
                adapters.add(bias["adapter"])
            biases[bias["mod"].replace(".base_layer.", ".")] = t
            continue
        m = _LORA_KEY.match(k) or _EMB_KEY.match(k)
        if m:
            if m["adapter"]:
                adapters.add(m["adapter"])
            owner, nested, _ = m["mod"].partition(".base_layer.")
            entry = modules.setdefault(m["mod"].replace(".base_layer.", "."),
                                       {"embedding": "embedding" in m["which"]})
            if nested:
                entry["owner"] = owner
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
    stray = sorted(set(magnitudes) - set(modules))
    if stray:
        raise ValueError(f"{where}: DoRA magnitudes for modules without lora_A/lora_B: {stray}")
    stray = sorted(set(biases) - set(modules))
    if stray:
        raise ValueError(f"{where}: lora_B biases for modules without lora_A/lora_B: {stray}")
    for name, entry in modules.items():
        if use_dora:
            if name not in magnitudes:
                raise ValueError(f"{where}: use_dora is true but module {name} has no "
                                 "lora_magnitude_vector")
            entry["M"] = magnitudes[name]
        if lora_bias and entry["embedding"]:
            raise ValueError(f"{where}: lora_bias is true but module {name} is an embedding, "
                             "which PEFT's lora_bias does not cover (PEFT refuses it)")
        if lora_bias:
            if name not in biases:
                raise ValueError(f"{where}: lora_bias is true but module {name} has no "
                                 "lora_B.bias")
            entry["bias"] = biases[name]
    return modules, extras, tokens


def _pair_problem(A: torch.Tensor, B: torch.Tensor,
                  bias: torch.Tensor | None = None) -> str | None:
    """Why ``A``, ``B`` (and ``B``'s bias) are no PEFT pair: ``(rank, in)``, ``(out, rank)``, or for a
    convolution ``(rank, in, *kernel)``, ``(out, rank // groups, 1, ...)``; a bias ``(out,)``. None if
    they are one."""
    if bias is not None and tuple(bias.shape) != (B.shape[0],):
        return (f"lora_B.bias {tuple(bias.shape)} does not fit lora_B {tuple(B.shape)}: "
                f"needs ({B.shape[0]},)")
    if A.dim() == B.dim() == 2 and A.shape[0] == B.shape[1]:
        return None
    if 3 <= A.dim() == B.dim() <= 5 and all(d == 1 for d in B.shape[2:]) and B.shape[1] > 0 \
            and A.shape[0] % B.shape[1] == 0:
        return None
    return (f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a (rank, in), (out, rank) "
            "pair, nor a convolution's (rank, in, *kernel), (out, rank // groups, 1, ...)")


def _pair_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The ``(lora_A, lora_B)`` shapes PEFT gives ``module`` at ``rank``, or None for a type it
    has no LoRA pair for here."""
    if isinstance(module, nn.Embedding):
        return (rank, module.num_embeddings), (module.embedding_dim, rank)
    if isinstance(module, nn.MultiheadAttention):  # the fused in-projection, (3E, E)
        return (rank, module.embed_dim), (3 * module.embed_dim, rank)
    if isinstance(module, nn.modules.conv._ConvNd):
        ones = (1,) * len(module.kernel_size)
        return ((rank, module.in_channels, *module.kernel_size),
                (module.out_channels, rank // module.groups, *ones))
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    if is_hf_conv1d(module):  # weight (in, out): fan_in_fan_out
        return (rank, module.weight.shape[0]), (module.weight.shape[1], rank)
    return None


def _fit(name: str, layer: LoRALayer, A: torch.Tensor, B: torch.Tensor, s_peft: float,
         problems: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Express PEFT's ``s_peft * B @ A`` exactly in ``layer``'s own layout, or report why not."""
    if isinstance(layer, _ConvLoRA):
        return _fit_conv(name, layer, A, B, s_peft, problems)
    if isinstance(layer, ParamLoRA):
        return _fit_parameter(name, layer, A, B, s_peft, problems)
    if isinstance(layer, MergedLinear):
        slices, out = layer.lora_slices, layer.out_features
    elif isinstance(layer, Embedding):
        slices, out = [(0, layer.embedding_dim)], layer.embedding_dim
    elif isinstance(layer, (Linear, MultiheadAttention)):
        slices, out = [(0, layer.out_features)], layer.out_features
    else:
        problems.append(f"{name}: PEFT adapters load into Linear, MergedLinear, Embedding, "
                        f"Conv1d/2d/3d and MultiheadAttention layers, not {type(layer).__name__}")
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


def _fit_conv(name: str, layer: _ConvLoRA, A: torch.Tensor, B: torch.Tensor, s_peft: float,
              problems: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PEFT's conv pair in a ``lora_layout="peft"`` layer: the same kernels, zero-padded to the
    layer's rank, with any scaling ratio folded into ``B``."""
    if layer.lora_layout != "peft":
        problems.append(f"{name}: the model's {type(layer).__name__} uses lora_layout="
                        f"{layer.lora_layout!r}, which PEFT's conv factorisation does not map to "
                        "(build it with lora_layout='peft', as inject_lora does)")
        return None
    want = _pair_shapes(layer, A.shape[0])
    if want != (tuple(A.shape), tuple(B.shape)):
        problems.append(f"shape mismatch for {name}: file lora_A {tuple(A.shape)}, lora_B "
                        f"{tuple(B.shape)}; model needs lora_A {want[0]}, lora_B {want[1]}")
        return None
    if A.shape[0] > layer.r:
        problems.append(f"{name}: the file's rank {A.shape[0]} exceeds the model's layer r={layer.r}")
        return None
    A, B = pad_rank(A.float(), B.float(), layer.r, layer.groups)  # r % groups: the layer checked
    ratio = s_peft / layer.scaling
    return A.to(layer.lora_A.dtype), (B if ratio == 1.0 else B * ratio).to(layer.lora_B.dtype)


def _fit_parameter(name: str, layer: ParamLoRA, A: torch.Tensor, B: torch.Tensor, s_peft: float,
                   problems: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A pair already in :class:`ParamLoRA`'s layout (see :func:`_parameter_entries`) at the layer's
    rank, zero-padded, with any scaling ratio folded into ``B``."""
    want_A, want_B = tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)
    if A.shape[1:] != want_A[1:] or B.shape[0] != want_B[0] or B.shape[2:] != want_B[2:] \
            or A.shape[0] != B.shape[1]:
        problems.append(f"shape mismatch for {name}: file lora_A {tuple(A.shape)}, lora_B "
                        f"{tuple(B.shape)} (in this layout); model needs lora_A {want_A}, lora_B "
                        f"{want_B} at rank <= {layer.r}")
        return None
    if A.shape[0] > layer.r:
        problems.append(f"{name}: the file's rank {A.shape[0]} exceeds the model's layer r={layer.r}")
        return None
    A, B = pad_rank(A.float(), B.float(), layer.r)
    ratio = s_peft / layer.scaling
    return A.to(layer.lora_A.dtype), (B if ratio == 1.0 else B * ratio).to(layer.lora_B.dtype)


def _parameter_entries(model: nn.Module, cfg: dict[str, Any], modules: dict[str, dict[str, Any]],
                       where: str) -> dict[str, dict[str, Any]]:
    """``modules`` with PEFT's adapters on parameters renamed to our layers and re-laid out.

    PEFT keys such an adapter by its module's path with one ``.base_layer`` per adapted parameter
    registered after it; the parameters are found on ``model`` by PEFT's rule (a dotted suffix of
    ``<module>.<parameter>``), and each pair becomes ``<module>.param_lora.<parameter>`` in
    :class:`~lora_phi3.layers.ParamLoRA`'s layout (``(R, E, in)``, ``(out, R, E)``). The ranks
    ``_read_peft`` left unchecked are checked here.

    Raises:
        ValueError: an entry matches no parameter of the model, or a pair does not fit its parameter.
    """
    if not cfg.get("target_parameters"):
        return modules
    try:
        plan = param_plan(model, LoraConfig(target_parameters=list(cfg["target_parameters"])))
    except ValueError as e:
        raise ValueError(f"{where} does not fit the model (nothing was changed): {e}") from None
    modules, problems = dict(modules), []
    for host, spec in plan.items():
        holder = model.get_submodule(host)
        # the parameters the file's entries select, in registration order: PEFT's nesting
        for parameter, path in peft_param_paths(host, spec.parameter_names).items():
            entry = modules.pop(path, None)
            if entry is None:
                continue  # strict loading reports the missing adapter by our name
            rank = _peft_rank(cfg, f"{host}.{parameter}")
            shape = holder._parameters[parameter].shape
            experts = shape[0] if len(shape) == 3 else 1
            try:
                if entry["A"].shape[0] != rank * experts:
                    raise ValueError(f"lora_A has {entry['A'].shape[0]} rows, the config's rank "
                                     f"{rank} (r, or its rank_pattern entry) x {experts} expert(s)")
                A, B = from_peft_factors(entry["A"], entry["B"], shape)
            except ValueError as e:
                problems.append(f"{path} (adapting {host}.{parameter}): {e}")
                continue
            modules[param_lora_name(host, parameter)] = {
                "A": A, "B": B, "embedding": False, "parameter": parameter,
                "pattern": f"{host}.{parameter}"}
    for name, entry in modules.items():  # the module entries' ranks, deferred by _read_peft
        rank = _peft_rank(cfg, _pattern_name(name, entry))
        if "parameter" not in entry and entry["A"].shape[0] != rank:
            problems.append(f"{name}: lora_A has rank {entry['A'].shape[0]}, the config says {rank} "
                            "(r, or its rank_pattern entry)")
    if problems:
        raise ValueError(f"{where} does not fit the model (nothing was changed): "
                         + "; ".join(problems))
    return modules


def _base_rows(module: nn.Module) -> torch.Tensor:
    """A (real, not previewed) module's frozen weight as dense ``(out, in)``."""
    if isinstance(module, LoRALayer):
        w = module.dense_base_weight()
        return w.T if getattr(module, "fan_in_fan_out", False) else w
    return module.weight.T if is_hf_conv1d(module) else module.weight


def _rescaled_rows(M: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows where a DoRA magnitude ``M`` differs from ``||W_i||`` (a gain other than 1)."""
    norm = torch.linalg.vector_norm(weight.detach().float(), dim=1)
    return (M.float() - norm).abs() > 1e-5 * norm.clamp_min(1e-12)


def _magnitude_shape(layer: LoRALayer) -> tuple[int, ...]:
    """The shape of PEFT's ``lora_magnitude_vector`` for ``layer``: ``(out,)``; ``(embedding_dim,)``
    for an embedding; ``(1, out_channels, 1, ...)`` for a convolution."""
    if isinstance(layer, _ConvLoRA):
        return (1, layer.out_channels, *(1,) * len(layer.kernel_size))
    if isinstance(layer, Embedding):
        return (layer.embedding_dim,)
    return (layer.out_features,)


def _fit_magnitude(name: str, layer: LoRALayer, M: torch.Tensor, module: nn.Module,
                   problems: list[str]) -> torch.Tensor | None:
    """PEFT's DoRA magnitude as the layer's ``lora_magnitude`` (flat; on a ``MergedLinear``
    ``(sum of slice sizes,)``), or report why not: rows the layer does not adapt must keep gain 1
    (``M_i = ||W_i||``), as our export writes. ``module``: the real (not previewed) module, whose
    base weight that check reads."""
    want = _magnitude_shape(layer)
    if tuple(M.shape) != want:
        problems.append(f"shape mismatch for {name}.lora_magnitude_vector: file {tuple(M.shape)}, "
                        f"model needs {want}")
        return None
    if not isinstance(layer, MergedLinear):
        return M.reshape(-1).to(layer.lora_magnitude.dtype)
    slices, covered = layer.lora_slices, torch.zeros(M.shape[0], dtype=torch.bool)
    for start, size in slices:
        covered[start:start + size] = True
    if (_rescaled_rows(M, _base_rows(module)) & ~covered).any():
        problems.append(f"{name}: the file's DoRA magnitude rescales output rows the model's "
                        f"MergedLinear does not adapt (enable_lora={getattr(layer, 'enable_lora', None)})")
        return None
    return torch.cat([M[start:start + size] for start, size in slices]).to(layer.lora_magnitude.dtype)


def _fit_bias(name: str, layer: LoRALayer, bias: torch.Tensor, s_peft: float,
              problems: list[str]) -> torch.Tensor | None:
    """PEFT's ``lora_B.bias`` ``(out,)`` as the layer's ``lora_bias`` (on a ``MergedLinear`` the
    adapted rows only, which needs 0 on the others), the scaling ratio folded in; or report why
    not."""
    own = layer._parameters.get("lora_bias")
    if own is None:
        problems.append(f"{name}: the file has lora_B.bias (lora_bias true) but the model's "
                        f"{type(layer).__name__} has no lora_bias (inject with "
                        "LoraConfig(lora_bias=True))")
        return None
    if isinstance(layer, MergedLinear):
        covered = torch.zeros(bias.shape[0], dtype=torch.bool)
        for start, size in layer.lora_slices:
            covered[start:start + size] = True
        if (bias[~covered] != 0).any():
            problems.append(f"{name}: the file's lora_B.bias is non-zero on output rows the model's "
                            f"MergedLinear does not adapt (enable_lora={layer.enable_lora})")
            return None
        bias = torch.cat([bias[start:start + size] for start, size in layer.lora_slices])
    ratio = s_peft / layer.scaling
    return (bias if ratio == 1.0 else bias.float() * ratio).to(own.dtype)


def _nonzero_cols(B: torch.Tensor) -> int:
    return int((B != 0).any(0).sum())


def _derived_config(cfg: dict[str, Any], modules: dict[str, dict[str, Any]],
                    tokens: dict[str, list[int]], model: nn.Module) -> LoraConfig:
    """The LoraConfig that, injected into the bare ``model``, holds the PEFT adapter exactly.

    On Phi-3 a fused module gets adapters only on the slices whose rows of ``B`` are non-zero
    (all of them if ``B`` is all zero), so our own per-slice export comes back as it was. The rank
    is the most non-zero ``B`` columns any slice needs (PEFT's rank if ``B`` is all zero; a
    convolution keeps its rank, which its groups split). An MHA's out_proj adapter comes with its
    attention's target. ``tokens``: the embeddings' trainable token ids.
    """
    slice_map = phi3.phi3_slice_map(model) if phi3.is_phi3(model) else {}
    named = dict(model.named_modules())
    candidates: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        if n and peft_targetable(m):
            candidates.setdefault(n.rpartition(".")[2], set()).add(n)
        prefix = n[: len(n) - len(n.rpartition(".")[2])]
        for alias in slice_map[n].slice_names if n in slice_map else ():
            candidates.setdefault(alias, set()).add(prefix + alias)
    chosen, parameters, rank = [], [], 0
    for name in sorted(modules):
        B = modules[name]["B"]
        fused = slice_map.get(name)
        if "parameter" in modules[name]:  # an adapter on a parameter keeps PEFT's rank
            parameters.append(modules[name]["pattern"])
            rank = max(rank, modules[name]["A"].shape[0])
            continue
        if B.dim() > 2:  # a convolution: A's rank, in blocks of its groups
            chosen.append(name)
            rank = max(rank, modules[name]["A"].shape[0])
            continue
        if fused is None:
            chosen += [] if "owner" in modules[name] else [name]
            rank = max(rank, _nonzero_cols(B))
            continue
        offsets = [sum(fused.split_sizes[:i]) for i in range(len(fused.split_sizes))]
        parts = [B[o:o + s] for o, s in zip(offsets, fused.split_sizes)]
        rescaled = _rescaled_rows(modules[name]["M"], _base_rows(named[name])) \
            if "M" in modules[name] else torch.zeros(B.shape[0], dtype=torch.bool)
        if "bias" in modules[name]:  # a slice with a non-zero lora bias is adapted too
            rescaled = rescaled | (modules[name]["bias"] != 0)
        live = [i for i, part in enumerate(parts)
                if (part != 0).any() or rescaled[offsets[i]:offsets[i] + fused.split_sizes[i]].any()] \
            or list(range(len(parts)))
        prefix = name[: len(name) - len(name.rpartition(".")[2])]
        chosen += [name] if len(live) == len(parts) else [prefix + fused.slice_names[i] for i in live]
        rank = max([rank] + [_nonzero_cols(parts[i]) for i in live])
    rank = rank or max(e["A"].shape[0] for e in modules.values())
    first = sorted(modules)[0]
    s_ref = _peft_scaling(cfg, _pattern_name(first, modules[first]), modules[first]["A"].shape[0])
    to_save = cfg.get("modules_to_save") or None
    rslora = bool(cfg.get("use_rslora"))  # kept, so a re-export is rsLoRA again
    return LoraConfig(r=rank, lora_alpha=json_number(s_ref * (math.sqrt(rank) if rslora else rank)),
                      use_rslora=rslora, use_dora=bool(cfg.get("use_dora")),
                      lora_bias=bool(cfg.get("lora_bias")),
                      lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                      target_modules=compress_targets(chosen, candidates) or None,
                      target_parameters=compress_targets(parameters,
                                                         parameter_candidates(model)) or None,
                      bias=cfg.get("bias") or "none", modules_to_save=list(to_save) if to_save else None,
                      fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
                      trainable_token_indices=dict(tokens) or None)


def import_peft(model: nn.Module, path: str | Path, strict: bool = True,
                adapter_name: str | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, after checking all of it.

    A model without LoRA layers is first injected with a config derived from the file (the
    adapted modules, on Phi-3 only the slices the file updates, the rank its non-zero ``B``
    columns need, ``lora_alpha`` keeping the scaling); the file is checked against a weightless
    preview of that injection before the model is touched. Into an
    already-injected model each PEFT pair is mapped exactly onto the layer's layout (a fused
    PEFT update onto per-slice adapters, rank padding, a block-diagonal ``B`` back to its slices)
    or refused. Keys may carry the ``base_model.model.`` prefix and an adapter name
    (``lora_A.default.weight``). Convolutions load into ``lora_layout="peft"`` layers,
    ``nn.MultiheadAttention`` adapters into :class:`~lora_phi3.layers.MultiheadAttention`,
    ``trainable_token_indices`` into :class:`~lora_phi3.layers.TrainableTokens`, and
    ``target_parameters`` adapters (e.g. MoE experts) into :class:`~lora_phi3.layers.ParamLoRA`
    layers; DoRA magnitudes (linear, embedding, convolution) and ``lora_bias`` load too.

    Args:
        model: a transformers model (e.g. ``Phi3ForCausalLM``) or any module.
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        strict: refuse model LoRA layers that the file does not cover.
        adapter_name: None loads into the model's active adapter (a bare model gets ``"default"``).
            A name: into a bare model, the file is injected under it; into a model with other
            adapters, it is added as a new adapter (:func:`~lora_phi3.inject.named.add_adapter`,
            with the config derived from the file), loaded, and left inactive, as
            :func:`~lora_phi3.adapters.load_adapter` adds one.

    Returns:
        ``model``.

    Raises:
        ValueError: on any problem (unsupported variant, missing/unexpected/mis-shaped keys,
            non-float tensors, corrupt file; ``adapter_name`` malformed or already the model's);
            the model is then unchanged.
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    path = Path(path)
    where = f"PEFT adapter {str(path)!r}"
    cfg, modules, extras, tokens, token_ids = _read_peft(path, where)
    modules = _parameter_entries(model, cfg, modules, where)
    if adapter_name is not None and not is_bare(model):
        if adapter_name in adapter_names(model):
            raise ValueError(f"import_peft: the model already has an adapter {adapter_name!r} "
                             f"(adapters: {adapter_names(model)}); import under a new name, or "
                             "delete_adapter it first (load_adapter(model, path, adapter_name=...) "
                             "hot-swaps our own adapter files into an existing adapter)")
        return _import_as_new_adapter(model, path, where, cfg, modules, extras, tokens, token_ids,
                                      strict, adapter_name)
    target, derived = model, None
    if is_bare(model):
        problems = _model_problems(model, modules, extras, tokens)
        if problems:
            raise ValueError(f"{where} does not fit the model (nothing was changed): "
                             + "; ".join(problems))
        derived = _derived_config(cfg, modules, token_ids, model)
        try:
            target = injected_preview(model, derived)  # validate against a weightless copy
        except ValueError as e:  # a layer refuses the file's variant (e.g. lora_bias on attention)
            raise ValueError(f"{where} does not fit the model (nothing was changed): {e}") from None
    to_load = _checked_tensors(model, target, cfg, modules, extras, tokens, token_ids, strict, where)
    if derived is not None:
        inject_lora(model, derived, adapter_name=adapter_name or "default")
    _load(model, to_load, extras, where, len(modules), len(tokens))
    return model


def _read_peft(path: Path, where: str):
    """The file's ``(config, modules, extras, trainable tokens, token ids)``, checked on its own
    (before any model is looked at)."""
    cfg_path, st_path = path / PEFT_CONFIG_FILE, path / PEFT_WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ValueError(f"{where} lacks {PEFT_CONFIG_FILE!r}")
    if not st_path.is_file():
        hint = (" (it has adapter_model.bin, a pickle; re-save it with PEFT's "
                "save_pretrained(safe_serialization=True))" if (path / "adapter_model.bin").exists() else "")
        raise ValueError(f"{where} lacks {PEFT_WEIGHTS_FILE!r}{hint}")
    cfg = read_json(cfg_path)
    _check_peft_config(cfg, where)
    tensors = decode_safetensors(st_path.read_bytes(), str(st_path))
    bad = non_float_keys(tensors)
    if bad:
        raise ValueError(f"{where}: non-floating tensors {bad}")
    modules, extras, tokens = _group_keys(tensors, where, bool(cfg.get("use_dora")),
                                          bool(cfg.get("lora_bias")))
    if not modules:
        raise ValueError(f"{where} holds no lora_A/lora_B tensors")
    problems = []
    for name, entry in sorted(modules.items()):
        A, B, rank = entry["A"], entry["B"], _peft_rank(cfg, _pattern_name(name, entry))
        pair = _pair_problem(A, B, entry.get("bias"))
        if pair is not None:
            problems.append(f"{name}: {pair}")
        elif A.shape[0] != rank and not cfg.get("target_parameters"):
            # (with target_parameters, an expert parameter's A has rank * experts rows, and which
            # entries are parameters only the model tells: _parameter_entries checks them)
            problems.append(f"{name}: lora_A has rank {A.shape[0]}, the config says {rank} "
                            "(r, or its rank_pattern entry)")
        owner = entry.get("owner")
        if owner is not None and owner not in modules:
            problems.append(f"{name} is nested in {owner}, which has no lora_A/lora_B")
    token_ids: dict[str, list[int]] = {}
    for name, values in sorted(tokens.items()):
        ids = _token_indices_for(cfg, name)
        if ids is None:
            problems.append(f"{name}: trainable tokens, but trainable_token_indices has no entry "
                            "for it")
        elif values.dim() != 2 or values.shape[0] != len(ids):
            problems.append(f"{name}: {PEFT_TOKENS_KEY} {tuple(values.shape)} does not hold one "
                            f"row per token id ({len(ids)})")
        else:
            token_ids[name] = ids
    if problems:
        raise ValueError(f"{where} disagrees with itself: " + "; ".join(problems))
    if cfg.get("init_lora_weights") == "loftq" or cfg.get("loftq_config"):
        logger.warning("%s was trained with LoftQ: it expects the LoftQ-initialised base weights", where)
    return cfg, modules, extras, tokens, token_ids


def _model_problems(model: nn.Module, modules: dict[str, dict[str, Any]],
                    extras: dict[str, torch.Tensor], tokens: dict[str, torch.Tensor]) -> list[str]:
    """Why the file's modules, trainable tokens and other tensors do not fit ``model``'s modules
    (checked before a config is derived from the file and injected)."""
    named, problems = dict(model.named_modules()), []
    for name, entry in modules.items():
        if "parameter" in entry:  # matched and shape-checked against the model already
            continue
        A, B = entry["A"], entry["B"]
        want = _pair_shapes(named[name], A.shape[0]) if name in named else None
        if want is None:
            problems.append(f"module {name} does not exist in the model or is no type PEFT's "
                            "LoRA adapts (linear, embedding, convolution, MultiheadAttention)")
        elif want != (tuple(A.shape), tuple(B.shape)):
            problems.append(f"shape mismatch for {name}: file lora_A {tuple(A.shape)}, "
                            f"lora_B {tuple(B.shape)}; the model needs lora_A {want[0]}, "
                            f"lora_B {want[1]}")
    for name, values in tokens.items():
        emb = named.get(name)
        if not isinstance(emb, nn.Embedding):
            problems.append(f"trainable tokens for {name}, which is no nn.Embedding of the model")
        elif values.shape[1:] != (emb.embedding_dim,):
            problems.append(f"shape mismatch for {name}.{PEFT_TOKENS_KEY}: file "
                            f"{tuple(values.shape)}, the model's embedding_dim is {emb.embedding_dim}")
    return problems + _extra_problems(model.state_dict(), extras)


def _import_as_new_adapter(model: nn.Module, path: Path, where: str, cfg: dict[str, Any],
                           modules: dict[str, dict[str, Any]], extras: dict[str, torch.Tensor],
                           tokens: dict[str, torch.Tensor], token_ids: dict[str, list[int]],
                           strict: bool, adapter_name: str) -> nn.Module:
    """The file as a new, inactive adapter of a model that has others; a refused load deletes it
    again, so the model is as it was."""
    problems = _model_problems(model, modules, extras, tokens)
    if problems:
        raise ValueError(f"{where} does not fit the model (nothing was changed): "
                         + "; ".join(problems))
    add_adapter(model, _derived_config(cfg, modules, token_ids, model), adapter_name)
    try:
        with using_adapter(model, adapter_name):
            to_load = _checked_tensors(model, model, cfg, modules, extras, tokens, token_ids,
                                       strict, where)
            _load(model, to_load, extras, where, len(modules), len(tokens))
    except ValueError:
        delete_adapter(model, adapter_name)  # a refused load leaves the model as it was
        raise
    return model


def _checked_tensors(model: nn.Module, target: nn.Module, cfg: dict[str, Any],
                     modules: dict[str, dict[str, Any]], extras: dict[str, torch.Tensor],
                     tokens: dict[str, torch.Tensor], token_ids: dict[str, list[int]],
                     strict: bool, where: str) -> dict[str, torch.Tensor]:
    """The file's tensors in ``target``'s layers' layouts (``target``: ``model`` itself, or a
    weightless preview of its injection), keyed as ``model.load_state_dict`` takes them.

    Raises:
        ValueError: listing every problem; nothing has been changed.
    """
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()) and \
            any("owner" in entry for entry in modules.values()):
        logger.warning("%s adapts nn.MultiheadAttention: PEFT <= 0.21 adds its out_proj update twice "
                       "in the forward (huggingface/peft#3774); this import adds it once, as the "
                       "adapter's tensors define it", where)
    every, problems, to_load = lora_layers(target), [], {}
    token_layers = {n: l for n, l in every.items() if isinstance(l, TrainableTokens)}
    layers = {n: l for n, l in every.items() if n not in token_layers}
    problems += _token_problems(token_layers, tokens, token_ids, strict, to_load)
    real = dict(model.named_modules())  # the preview is weightless: norms read the real bases
    unexpected = sorted(set(modules) - set(layers))
    missing = sorted(set(layers) - set(modules))
    if unexpected:
        problems.append(f"unexpected modules (no LoRA layer in the model) {unexpected}")
    if strict and missing:
        problems.append(f"missing modules (LoRA layers the file does not cover) {missing}")
    for name in sorted(set(modules) & set(layers)):
        entry, layer = modules[name], layers[name]
        A, B = entry["A"], entry["B"]
        s_peft = _peft_scaling(cfg, _pattern_name(name, entry), A.shape[0])
        fitted = _fit(name, layer, A, B, s_peft, problems)
        if fitted is not None:
            to_load[f"{name}.lora_A"], to_load[f"{name}.lora_B"] = fitted
        M, layer_dora = entry.get("M"), getattr(layer, "use_dora", False)
        if layer_dora != (M is not None):
            problems.append(f"{name}: the file is {'' if M is not None else 'not '}DoRA but the "
                            f"model's layer has use_dora={layer_dora}")
        elif M is not None:
            m = _fit_magnitude(name, layer, M, real[name], problems)
            if m is not None:
                to_load[f"{name}.lora_magnitude"] = m
        bias = entry.get("bias")
        if bias is None and layer._parameters.get("lora_bias") is not None:
            problems.append(f"{name}: the model's layer has a lora_bias but the file has no "
                            "lora_B.bias (lora_bias false)")
        elif bias is not None:
            fitted_bias = _fit_bias(name, layer, bias, s_peft, problems)
            if fitted_bias is not None:
                to_load[f"{name}.lora_bias"] = fitted_bias
    expected_extras = set(adapter_state_dict(target)) - adapter_param_keys(target)
    if strict and expected_extras - set(extras):
        problems.append(f"missing keys {sorted(expected_extras - set(extras))}")
    problems += _extra_problems(target.state_dict(), extras)
    if problems:
        raise ValueError(f"{where} does not fit the model (nothing was changed): " + "; ".join(problems))
    return to_load


def _load(model: nn.Module, to_load: dict[str, torch.Tensor], extras: dict[str, torch.Tensor],
          where: str, n_modules: int, n_tokens: int) -> None:
    state = model.state_dict()
    to_load.update({k: v.to(state[k].dtype) for k, v in extras.items() if k in state})
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)  # LoRA layers unmerge/re-merge themselves
    logger.info("imported %d PEFT modules (+%d trainable-token tables, %d other tensors) from %s",
                n_modules, n_tokens, len(extras), where)


def _token_problems(layers: dict[str, TrainableTokens], tokens: dict[str, torch.Tensor],
                    token_ids: dict[str, list[int]], strict: bool,
                    to_load: dict[str, torch.Tensor]) -> list[str]:
    """Match the file's trainable tokens to the model's layers (same ids, one row each); what fits
    goes into ``to_load``."""
    problems = []
    unexpected = sorted(set(tokens) - set(layers))
    if unexpected:
        problems.append(f"trainable tokens for {unexpected}, which have no TrainableTokens layer in "
                        "the model")
    missing = sorted(set(layers) - set(tokens))
    if strict and missing:
        problems.append(f"missing trainable tokens (TrainableTokens layers the file does not cover) "
                        f"{missing}")
    for name in sorted(set(tokens) & set(layers)):
        layer, values = layers[name], tokens[name]
        if name in token_ids and token_ids[name] != list(layer.token_indices):
            problems.append(f"{name}: the file trains tokens {token_ids[name]}, the model's layer "
                            f"{list(layer.token_indices)}")
        elif tuple(values.shape) != tuple(layer.token_values.shape):
            problems.append(f"shape mismatch for {name}.{PEFT_TOKENS_KEY}: file "
                            f"{tuple(values.shape)}, model {tuple(layer.token_values.shape)}")
        else:
            to_load[f"{name}.token_values"] = values.to(layer.token_values.dtype)
    return problems


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
