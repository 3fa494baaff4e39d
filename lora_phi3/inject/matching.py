"""Which modules of a model get an adapter: the matching rules of :class:`LoraConfig`.

A list of names matches dotted-path suffixes (``"qkv_proj"`` matches
``model.layers.0.self_attn.qkv_proj``); one string is a regex ``re.fullmatch``-ed against the full
path; ``"all-linear"`` takes every linear-like module except the LM head. ``exclude_modules`` and
``layers_to_transform`` narrow the choice. On Phi-3 the fused projections also answer to their
slice names (``q_proj`` is rows of ``qkv_proj``, see :mod:`lora_phi3.inject.phi3`). An
``nn.MultiheadAttention`` is targeted by its own name (its ``in_proj_weight`` and ``out_proj`` are
adapted together, as in PEFT). ``trainable_token_indices`` adds the embeddings it names
(:class:`TokenSpec`). A target that
matches nothing is an error that lists what the model has. A subclass of a supported type that
defines its own ``forward`` (a MoE router) is never swapped: ``"all-linear"`` skips it, and naming
it is an error. The same suffix rules decide which parameters ``modules_to_save`` covers, in the
adapter files and in the PEFT export (:func:`matches`, :func:`under_any`). ``target_parameters``
selects parameters as PEFT does: an entry matches the path ``<module>.<parameter>`` of a module's
own parameter if equal to it or a dotted suffix of it (:class:`ParamSpec`, :func:`param_plan`).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import NamedTuple

import torch
import torch.nn as nn

from . import phi3
from ..config import LoraConfig
from ..layers.tokens import check_token_indices
from ..layers import LoRALayer


logger = logging.getLogger(__name__)

__all__ = ["SliceSpec", "TokenSpec", "ParamSpec", "SUPPORTED_TYPES", "plan_targets", "param_plan", "saved_module_names", "adaptable_names",
           "is_supported", "is_linear_like", "is_hf_conv1d", "overridden_forward", "matched_entries",
           "matches", "under_any"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

SUPPORTED_TYPES = ("nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention "
                   "and transformers' GPT-2 Conv1D")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class SliceSpec(NamedTuple):
    """Which output slices of a fused projection get an adapter (``MergedLinear`` arguments)."""

    split_sizes: list[int]
    enable_lora: list[bool]


class TokenSpec(NamedTuple):
    """An embedding whose rows ``token_indices`` are trained (``LoraConfig.trainable_token_indices``)."""

    token_indices: list[int]


class ParamSpec(NamedTuple):
    """A module whose own parameters ``parameter_names`` get adapters (``LoraConfig.target_parameters``),
    in the order the module registers them."""

    parameter_names: list[str]


# -- what can be adapted --------------------------------------------------------------------------
def _hf_conv1d_class() -> type | None:
    # transformers is not imported for this: a module can only be an instance of that class if
    # transformers has already loaded it, so ``import lora_phi3`` stays free of transformers.
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (a linear layer whose weight is ``(in, out)``)."""
    conv1d = _hf_conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and transformers' ``Conv1D``: what ``all-linear`` takes."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def is_supported(module: nn.Module) -> bool:
    """True if ``module``'s type is one a LoRA layer exists for (see ``SUPPORTED_TYPES``)."""
    return is_linear_like(module) or isinstance(module, (nn.Embedding, nn.MultiheadAttention,
                                                         *_CONV_TYPES))


def overridden_forward(module: nn.Module) -> type | None:
    """The supported torch class whose ``forward`` ``type(module)`` overrides, or None.

    A LoRA layer replaces the module and runs the plain linear/embedding/conv forward, so a subclass
    with a forward of its own (Phi-3.5-MoE's ``PhimoeTopKRouter(nn.Linear)`` returns routing
    weights, Gemma's scaled ``nn.Embedding`` multiplies its output) would silently lose it. Only
    the class is looked at: a forward patched onto an instance (accelerate's hooks) is not.

    Args:
        module: any module.

    Returns:
        The base class (``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d`` ... or transformers'
        ``Conv1D``) when ``module`` is an instance of it whose class redefines ``forward``; None
        for the base classes themselves, subclasses that keep their forward, and other types.
    """
    conv1d = _hf_conv1d_class()
    for base in (nn.Linear, nn.Embedding, nn.MultiheadAttention, *_CONV_TYPES,
                 *([conv1d] if conv1d is not None else [])):
        if isinstance(module, base):
            return base if type(module).forward is not base.forward else None
    return None


def _unsupported_reason(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot take an adapter, or None if it can."""
    if isinstance(module, LoRALayer):  # already adapted: it takes more named adapters
        return None
    if not is_supported(module):
        return f"its type {type(module).__name__} is not supported; supported: {SUPPORTED_TYPES}"
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return (f"its q, k and v weights are separate (kdim={module.kdim}, vdim={module.vdim}, "
                    f"embed_dim={module.embed_dim}); LoRA on nn.MultiheadAttention needs the fused "
                    "in_proj_weight, as in PEFT")
        weight = module.in_proj_weight
    else:
        weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        kind = type(weight).__name__ if not isinstance(weight, torch.Tensor) else weight.dtype
        return f"its weight is {kind}, not a floating-point tensor (already quantized?)"
    base = overridden_forward(module)
    if base is not None:
        return (f"{type(module).__name__} subclasses {base.__name__} but defines its own forward(), "
                "which a LoRA layer would replace and drop; exclude it, or target its sibling "
                "modules by name")
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention reads out_proj.weight directly and never calls out_proj's forward.
        return ("nn.MultiheadAttention uses its out_proj weight without calling the module; target "
                f"the attention module itself ({parent_name!r}), which adapts in_proj and out_proj")
    return None


def adaptable_names(model: nn.Module, slice_map: dict[str, phi3.FusedSlices]) -> list[str]:
    """Deduplicated last path components of the modules that can take an adapter, for errors."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and is_supported(module) and overridden_forward(module) is None:
            names[name.rpartition(".")[2]] = None
            for alias in slice_map.get(name, phi3.FusedSlices([], ())).slice_names:
                names[alias] = None
    return list(names)


def _input_embedding_name(model: nn.Module) -> str | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    return next((n for n, m in model.named_modules() if m is embedding and n), None)


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            pass
    for name, module in model.named_modules():
        if name == "lm_head" or name.endswith(".lm_head"):
            return module
    return None


# -- matching -------------------------------------------------------------------------------------
def matched_entries(name: str, spec: list[str] | str | None) -> list[str]:
    """The entries of ``spec`` that select the qualified module path ``name``.

    Args:
        name: a dotted module path, e.g. ``"model.layers.0.self_attn.qkv_proj"``.
        spec: a list of names, each matching paths equal to it or ending in ``"." + name`` (so
            ``"c1"`` does not match ``"fc1"``); or one regex, ``re.fullmatch``-ed against the path;
            or None (nothing matches).

    Returns:
        The matching list entries, or ``[spec]`` for a matching regex; empty if none match.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec] if re.fullmatch(spec, name) else []
    return [t for t in spec if name == t or name.endswith("." + t)]


def matches(name: str, spec: list[str] | str | None) -> bool:
    """True if ``spec`` (a suffix list or one regex, see :func:`matched_entries`) selects ``name``."""
    return bool(matched_entries(name, spec))


def under_any(name: str, patterns: list[str] | None) -> bool:
    """True if the module path ``name`` is, or lies inside, a module that ``patterns`` names.

    This is ``modules_to_save``: an entry selects a module by dotted suffix, and with it everything
    below it, so ``"lm_head"`` covers ``"lm_head"`` and ``"model.lm_head.proj"``. It is also how
    PEFT decides that a module inside a ``modules_to_save`` entry is not a LoRA target.

    Args:
        name: a dotted module path ("" is the root, which no entry names).
        patterns: names matched as dotted suffixes of ``name`` or of one of its ancestors.
    """
    parts = name.split(".") if name else []
    return any(matches(".".join(parts[:i]), patterns or []) for i in range(1, len(parts) + 1))


def plan_targets(model: nn.Module, config: LoraConfig, targets: list[str] | str | None,
                 with_parameters: bool = False
                 ) -> dict[str, SliceSpec | TokenSpec | ParamSpec | None]:
    """Which modules of ``model`` get an adapter, checked before anything is replaced.

    Args:
        model: the model to inject into.
        config: supplies ``exclude_modules``, ``layers_to_transform``, ``trainable_token_indices``
            and ``target_parameters``.
        targets: ``config.target_modules`` with ``None`` resolved (a suffix list, a regex, or
            ``"all-linear"``); None adapts no module (only with ``target_parameters``).
        with_parameters: also plan ``config.target_parameters`` (:func:`param_plan`), as
            ``inject_lora`` does. A caller that cannot build adapters on parameters leaves it
            False, and a config with ``target_parameters`` is then refused.

    Returns:
        Qualified module name -> its :class:`SliceSpec` (fused Phi-3 projections), None (the
        whole module), a :class:`TokenSpec` (an embedding of ``trainable_token_indices``) or a
        :class:`ParamSpec` (a module whose parameters ``target_parameters`` selects).

    Raises:
        ValueError: a target matched nothing (listing what can be adapted); a matched module cannot
            take an adapter (unsupported type, non-float weight, a forward of its own, an
            ``nn.MultiheadAttention`` projection); exclusions left nothing; a bad
            ``trainable_token_indices`` (see :func:`token_plan`) or ``target_parameters`` (see
            :func:`param_plan`); a module both ``target_modules`` and ``target_parameters`` adapt.
    """
    if config.target_parameters and not with_parameters:
        raise ValueError(f"LoraConfig.target_parameters={config.target_parameters!r}: adapters on "
                         "parameters are built by inject_lora only (the model's first adapter); "
                         "add_adapter cannot add them. Set target_parameters=None here")
    plan: dict[str, SliceSpec | ParamSpec | None] = {}
    if targets is not None:
        plan.update(_module_plan(model, config, targets))
    if with_parameters and config.target_parameters:
        params = param_plan(model, config)
        both = sorted(set(plan) & set(params))
        if both:
            raise ValueError(f"LoraConfig: {both} are adapted by target_modules={targets!r} and "
                             f"their parameters by target_parameters={config.target_parameters!r}; "
                             "a module takes one or the other (PEFT refuses both too)")
        plan.update(params)
    if not plan:
        params = f" and target_parameters={config.target_parameters!r}" \
            if config.target_parameters else ""
        raise ValueError(f"LoraConfig: target_modules={targets!r}{params} matched, but "
                         f"exclude_modules={config.exclude_modules!r} and layers_to_transform="
                         f"{config.layers_to_transform!r} left none to adapt")
    return {**plan, **token_plan(model, config, plan)}


def _layer_filter(config: LoraConfig, plan: dict) -> dict:
    """``plan`` without the modules outside ``config.layers_to_transform`` (all, if it is None)."""
    if config.layers_to_transform is None:
        return plan
    keep = set(config.layers_to_transform)
    return {n: s for n, s in plan.items()
            if (m := _LAYER_INDEX.search(n)) is not None and int(m.group(1)) in keep}


def _module_plan(model: nn.Module, config: LoraConfig,
                 targets: list[str] | str) -> dict[str, SliceSpec | None]:
    """The modules ``targets`` (``target_modules``) selects, after exclusions (see
    :func:`plan_targets`); empty if the exclusions left none."""
    slice_map = phi3.phi3_slice_map(model) if phi3.is_phi3(model) else {}
    all_linear = targets == "all-linear"
    head = _output_embedding(model) if all_linear else None
    used: set[str] = set()
    excluded_by: set[str] = set()
    plan: dict[str, SliceSpec | None] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        fused = slice_map.get(name)
        # A fused module answers to its own name (all slices) and to each slice's name.
        prefix = name[: len(name) - len(name.rpartition(".")[2])]
        aliases = [prefix + s for s in fused.slice_names] if fused else []
        if all_linear:
            whole = is_linear_like(module) and module is not head \
                and _unsupported_reason(model, name, module) is None
            hit = [whole] + [False] * len(aliases)
            used.update(["all-linear"] if whole else [])
        else:
            hit = []
            for candidate in [name] + aliases:
                matched = matched_entries(candidate, targets)
                used.update(matched)
                hit.append(bool(matched))
        excl = []
        for candidate in [name] + aliases:
            matched = matched_entries(candidate, config.exclude_modules)
            excluded_by.update(matched)
            excl.append(bool(matched))
        if fused:
            enable = [(hit[0] or hit[1 + i]) and not (excl[0] or excl[1 + i])
                      for i in range(len(aliases))]
            if any(enable):
                plan[name] = SliceSpec(list(fused.split_sizes), enable)
        elif hit[0] and not excl[0]:
            plan[name] = None

    wanted = ["all-linear"] if all_linear else [targets] if isinstance(targets, str) else targets
    missing = [t for t in wanted if t not in used]
    if missing:
        if all_linear:
            what = "target_modules='all-linear' found no nn.Linear or Conv1D (LM head aside)"
        elif isinstance(targets, str):
            what = f"target_modules regex {targets!r} fullmatched no module path"
        else:
            what = f"target_modules entr{'y' if len(missing) == 1 else 'ies'} {missing} matched no module"
        raise ValueError(f"LoraConfig.{what} in {type(model).__name__}. Modules that can be adapted "
                         f"here: {', '.join(adaptable_names(model, slice_map)) or 'none'}")
    exclude = config.exclude_modules
    for entry in [exclude] if isinstance(exclude, str) else exclude or []:
        if entry not in excluded_by:  # harmless, but likely a typo worth seeing
            logger.warning("LoraConfig.exclude_modules entry %r matched no module", entry)
    plan = _layer_filter(config, plan)
    for name in plan:
        reason = _unsupported_reason(model, name, model.get_submodule(name))
        if reason is not None:
            raise ValueError(f"LoraConfig.target_modules matched {name!r} "
                             f"({type(model.get_submodule(name)).__name__}), which cannot take an "
                             f"adapter: {reason}")
    return plan


def _param_problem(module: nn.Module, param: torch.Tensor) -> str | None:
    """Why a matched parameter cannot take an adapter, or None if it can."""
    if isinstance(module, LoRALayer):
        return (f"its module is a LoRA {type(module).__name__} already (a target_modules target); "
                "a module takes target_modules or target_parameters, not both")
    if not param.is_floating_point():
        return f"it is {param.dtype}, not floating point (already quantized?)"
    if param.dim() not in (2, 3):
        return (f"it has shape {tuple(param.shape)}; LoRA on a parameter needs a 2-D (out, in) or a "
                "3-D (experts, out, in) one")
    if param.dim() == 3 and getattr(module, "is_transposed", False):
        return (f"{type(module).__name__} stores its experts transposed (experts, in, out); only "
                "(experts, out, in) is supported")
    return None


def param_plan(model: nn.Module, config: LoraConfig) -> dict[str, ParamSpec]:
    """The modules whose own parameters ``config.target_parameters`` selects, as PEFT selects them.

    An entry matches the path ``<module>.<parameter>`` of a parameter registered on the module
    itself if it equals it or is a dotted suffix of it (``"mlp.experts.gate_up_proj"`` matches
    ``model.layers.0.mlp.experts.gate_up_proj``). ``exclude_modules`` (the module's path) and
    ``layers_to_transform`` narrow the choice as they narrow ``target_modules``.

    Returns:
        Module path -> :class:`ParamSpec` of its selected parameters, in registration order.

    Raises:
        ValueError: an entry matched no parameter (listing parameters that can be adapted); a
            matched parameter on the model itself, not 2-D or 3-D, not floating point, stored
            transposed, or on a module that is a LoRA layer already; exclusions left none.
    """
    targets = config.target_parameters or []
    used: set[str] = set()
    plan: dict[str, ParamSpec] = {}
    adaptable: dict[str, None] = {}
    for name, module in model.named_modules():
        for pname, param in module._parameters.items():
            if param is None:
                continue
            key = f"{name}.{pname}" if name else pname
            if param.dim() in (2, 3) and name:
                adaptable[".".join(key.split(".")[-2:])] = None
            matched = matched_entries(key, targets)
            if not matched:
                continue
            used.update(matched)
            if not name:
                raise ValueError(f"LoraConfig.target_parameters {matched} matched {pname!r}, a "
                                 f"parameter of the model itself ({type(model).__name__}); only "
                                 "parameters of its submodules can be adapted (as in PEFT)")
            if matches(name, config.exclude_modules):
                continue
            reason = _param_problem(module, param)
            if reason is not None:
                raise ValueError(f"LoraConfig.target_parameters {matched} matched {key!r}, which "
                                 f"cannot take an adapter: {reason}")
            plan.setdefault(name, ParamSpec([])).parameter_names.append(pname)
    missing = [t for t in targets if t not in used]
    if missing:
        shown = list(adaptable)[:20]
        raise ValueError(f"LoraConfig.target_parameters entr{'y' if len(missing) == 1 else 'ies'} "
                         f"{missing} matched no parameter of {type(model).__name__} (an entry is "
                         f"a dotted suffix of '<module>.<parameter>'). 2-D and 3-D parameters here: "
                         f"{', '.join(shown) or 'none'}{' ...' if len(adaptable) > 20 else ''}")
    return _layer_filter(config, plan)


def token_plan(model: nn.Module, config: LoraConfig,
               plan: dict[str, SliceSpec | ParamSpec | None]) -> dict[str, TokenSpec]:
    """The embeddings ``config.trainable_token_indices`` selects, with their token ids.

    A list of ids selects the model's input embeddings (``get_input_embeddings()``); a dict maps
    names, matched as dotted-path suffixes, to ids.

    Raises:
        ValueError: a name matched nothing, or matched a module that is not a plain
            ``nn.Embedding``, that is also a LoRA target, or whose table is tied to another module;
            a list on a model without ``get_input_embeddings``; ids out of range.
    """
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    if isinstance(spec, list):
        name = _input_embedding_name(model)
        if name is None:
            raise ValueError(f"LoraConfig.trainable_token_indices is a list of token ids, which "
                             f"selects the input embeddings, but {type(model).__name__} has no "
                             "get_input_embeddings(); give {embedding name: [token ids]} instead")
        spec = {name: spec}
    named = dict(model.named_modules())
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append((mname, module))
    out: dict[str, TokenSpec] = {}
    for entry, ids in spec.items():
        where = f"LoraConfig.trainable_token_indices[{entry!r}]"
        found = [n for n in named if n and matches(n, [entry])]
        if not found:
            raise ValueError(f"{where} matched no module of {type(model).__name__}")
        for n in found:
            module = named[n]
            if not isinstance(module, nn.Embedding) or overridden_forward(module) is not None:
                raise ValueError(f"{where} matched {n!r} ({type(module).__name__}); trainable tokens "
                                 "need an nn.Embedding")
            if n in plan:
                raise ValueError(f"{where}: {n!r} is also a LoRA target (target_modules or "
                                 "target_parameters); an embedding takes either a LoRA adapter or "
                                 "trainable tokens")
            tied = [o for o, m in owners.get(id(module.weight), []) if m is not module]
            if tied:
                raise ValueError(f"{where}: the table of {n!r} is tied to {tied}; trainable tokens on "
                                 "tied weights are not supported (untie them first)")
            check_token_indices(ids, module.num_embeddings, where)
            if n in out and out[n].token_indices != ids:
                raise ValueError(f"{where}: {n!r} is selected by two entries with different ids")
            out[n] = TokenSpec(list(ids))
    return out


def saved_module_names(model: nn.Module, config: LoraConfig, plan: dict) -> list[str]:
    """The qualified names of the modules ``config.modules_to_save`` selects (by dotted suffix).

    Raises:
        ValueError: an entry matched no module, or a selected module contains a LoRA target.
    """
    names: list[str] = []
    for entry in config.modules_to_save or []:
        found = [n for n, _ in model.named_modules() if n and matches(n, [entry])]
        if not found:
            raise ValueError(f"LoraConfig.modules_to_save entry {entry!r} matched no module of "
                             f"{type(model).__name__}")
        for n in found:
            clash = [t for t in plan if t == n or t.startswith(n + ".")]
            if clash:
                raise ValueError(f"LoraConfig.modules_to_save entry {entry!r} ({n}) contains LoRA "
                                 f"targets {clash}; a module is either trained fully or adapted")
        names += found
    return names
