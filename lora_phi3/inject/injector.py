"""Put LoRA layers into any model, and take them out again.

:func:`inject_lora` swaps the modules a :class:`~lora_phi3.config.LoraConfig` selects for LoRA layers
that share (never copy) the original weights, and freezes everything else. The rest of this module
runs the model-wide state: :func:`merge_lora`/:func:`unmerge_lora`, the :func:`disable_lora` context
for base-model outputs, and :func:`merge_and_unload`, which hands back the plain torch modules.

Which modules are chosen is :mod:`lora_phi3.inject.matching` (``docs/injection.md`` has the long
form); which layer replaces a module is :mod:`lora_phi3.inject.factory`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator

import torch
import torch.nn as nn

from . import phi3
from ..config import LoraConfig
from ..layers import LoRALayer, LoRAParameters, ParamLoRA, enable_input_recompute, lora_layers
from ..layers.base import is_data_init
from .factory import (check_lora_target, make_lora_module, plain_module, quantized_check,
                      quantized_factory)
from .matching import (ParamSpec, SliceSpec, TokenSpec, adaptable_names, is_hf_conv1d,
                       plan_targets, saved_module_names)
from ..utils import mark_only_lora_as_trainable

logger = logging.getLogger(__name__)

__all__ = ["inject_lora", "disable_lora", "merge_lora", "unmerge_lora", "merge_and_unload",
           "get_lora_config", "lora_modules", "check_not_disabled", "SliceSpec", "CONFIG_ATTR",
           "ADAPTERS_ATTR", "ACTIVE_ATTR", "check_adapter_name"]

CONFIG_ATTR = "_lora_phi3_config"  # where inject_lora keeps the (resolved) config on the model
# Named adapters (inject.named): {name: resolved LoraConfig}, and the active adapter's name.
ADAPTERS_ATTR = "_lora_phi3_adapters"
ACTIVE_ATTR = "_lora_phi3_active_adapter"
# Where inject_lora records the input-recompute hooks it added: {module path: [hook ids]}. Paths and
# ids, not handles: a deepcopy of the model copies its hook dicts with the same ids, while a handle
# would still point at the original's dicts.
RECOMPUTE_HOOKS_ATTR = "_lora_phi3_recompute_hooks"


def _paths(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is reachable under (shared modules have several)."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _inputs_require_grad(module: nn.Module, inputs, output):
    # With every base weight frozen, the embedding output does not require grad, and reentrant
    # activation checkpointing then returns outputs without a graph: LoRA grads silently vanish.
    # Under torch.compile it is skipped: requires_grad_ there is a graph break, and compiled
    # graphs use non-reentrant checkpointing, which does not need it.
    if torch.compiler.is_compiling():
        return
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) \
            and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def _add_recompute_hooks(model: nn.Module) -> None:
    """``enable_input_recompute(model)``, recording the hooks it adds so unloading removes them.

    It skips modules hooked already (the caller enabled recompute before injecting), so only the
    hooks added here are recorded, and unloading leaves the caller's own in place.
    """
    where = {id(m._forward_hooks): n for n, m in model.named_modules()}
    added: dict[str, list[int]] = {}
    for handle in enable_input_recompute(model):
        added.setdefault(where[id(handle.hooks_dict_ref())], []).append(handle.id)
    model.__dict__[RECOMPUTE_HOOKS_ATTR] = added


def _remove_recompute_hooks(model: nn.Module) -> None:
    for path, ids in model.__dict__.pop(RECOMPUTE_HOOKS_ATTR, {}).items():
        try:
            module = model.get_submodule(path)
        except AttributeError:  # the module was taken out of the model since
            continue
        for hook_id in ids:
            module._forward_hooks.pop(hook_id, None)


def _remove_input_grad_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook is _inputs_require_grad:
                del module._forward_hooks[key]


# -- public API -----------------------------------------------------------------------------------
def check_adapter_name(name: object) -> str:
    """``name`` if it can name an adapter (a non-empty str without ``"."``), else ``ValueError``."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    return name


def inject_lora(model: nn.Module, config: LoraConfig, input_recompute: bool = True,
                adapter_name: str = "default") -> nn.Module:
    """Swap the modules ``config`` selects for LoRA layers, in place, and freeze everything else.

    Weights are shared with the new layers, not copied. Afterwards only the LoRA parameters, the
    biases ``config.bias`` names and the parameters of ``config.modules_to_save`` require grad.
    Injected layers do not merge on ``eval()`` (``merge_weights=False``); call :func:`merge_lora`.
    On a transformers model a forward hook makes the input embeddings' output require grad, so
    activation checkpointing (reentrant or not) still reaches the adapters.

    By default the lean training path is on: :func:`~lora_phi3.layers.enable_input_recompute`
    hooks the norms and ``gate_up_proj`` modules, so an adapter fed by a norm or by SwiGLU keeps
    the tensor that is saved for backward anyway instead of its own input (a Phi-3-mini decoder
    layer then keeps about 1.08x the frozen layer's activations instead of 1.38x). Outputs and
    gradients are the same either way. :func:`merge_and_unload` removes these hooks again.

    Args:
        model: any ``nn.Module``; a Phi-3 model gets the fused-projection map.
        config: what to adapt. ``target_modules=None`` means ``phi3.DEFAULT_TARGETS`` on Phi-3,
            and no module at all when ``target_parameters`` is set (its parameters get adapters;
            the module holding them is replaced by a host, see :mod:`lora_phi3.layers.param_lora`).
        input_recompute: False opts out of the lean path (every adapter saves its own input);
            a run option, not part of the adapter, so it is not stored in ``config``.
        adapter_name: the adapter's name (PEFT's ``"default"``); more adapters join with
            :func:`~lora_phi3.inject.named.add_adapter`.

    Returns:
        ``model`` itself; :func:`get_lora_config` returns the config with targets resolved.

    Raises:
        TypeError: ``config`` is not a ``LoraConfig``, or ``input_recompute`` is not a bool.
        ValueError: the model already has LoRA layers (injecting twice would stack adapters); a
            target matched nothing; a matched module cannot take an adapter; no target on a
            non-Phi-3 model; a ``modules_to_save`` entry matched nothing or overlaps a target.
        NotImplementedError: ``quantize_base`` set but no quantized layer registered.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"inject_lora needs a LoraConfig, got {type(config).__name__}")
    if not isinstance(input_recompute, bool):
        raise TypeError(f"inject_lora: input_recompute must be a bool, got {input_recompute!r}")
    check_adapter_name(adapter_name)
    existing = [n or "<root>" for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    if existing or getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} already has LoRA layers ({existing[:3]}...); "
                         "inject_lora never stacks a second adapter. Call merge_and_unload(model) "
                         "first to bake the current one in, or load other weights into the same "
                         "layers with load_adapter")
    targets = config.target_modules
    if targets is None and not config.target_parameters:
        if not phi3.is_phi3(model):
            raise ValueError(f"LoraConfig.target_modules is None, which only has a default for "
                             f"Phi-3; {type(model).__name__} needs explicit target_modules (a list "
                             f"of names, a regex or 'all-linear'). Modules that can be adapted: "
                             f"{', '.join(adaptable_names(model, {}))}")
        targets = list(phi3.DEFAULT_TARGETS)
    if config.quantize_base is not None:
        quantized_factory(config)  # fail before any module is replaced
    plan = plan_targets(model, config, targets, with_parameters=True)
    check = quantized_check(config)
    if check is not None:
        for name, spec in plan.items():  # every refusal happens here, before the first replacement
            if not isinstance(spec, (TokenSpec, ParamSpec)):  # these keep their dense tensors
                check(model.get_submodule(name), name)
    for name, spec in plan.items():  # the layers' own refusals (DoRA, lora_bias), all first
        check_lora_target(model.get_submodule(name), name, config, spec)
    if is_data_init(config.init_lora_weights):
        _check_data_init_rank(model, config, plan)
    to_save = saved_module_names(model, config, plan)
    paths = _paths(model)
    for name, spec in plan.items():
        module = model.get_submodule(name)
        new = make_lora_module(module, name, config, spec)
        new.active_adapter = adapter_name
        for path in paths[id(module)]:  # a shared module is replaced everywhere it is used
            _replace(model, path, new)
    mark_only_lora_as_trainable(model, config.bias)
    for name in to_save:
        model.get_submodule(name).requires_grad_(True)
    embeddings = _input_embeddings(model)
    if embeddings is not None and not any(h is _inputs_require_grad
                                          for h in embeddings._forward_hooks.values()):
        embeddings.register_forward_hook(_inputs_require_grad)
    if input_recompute:
        _add_recompute_hooks(model)
    resolved = dataclasses.replace(config, target_modules=targets)
    setattr(model, CONFIG_ATTR, resolved)
    setattr(model, ADAPTERS_ATTR, {adapter_name: resolved})
    setattr(model, ACTIVE_ATTR, adapter_name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("inject_lora: adapted %d modules; %d of %d parameters trainable (%.3f%%)",
                len(plan), trainable, total, 100.0 * trainable / max(total, 1))
    return model


def _check_data_init_rank(model: nn.Module, config: LoraConfig, plan: dict) -> None:
    """PiSSA/OLoRA take ``r`` singular vectors (QR columns) of each adapted slice: refuse, before
    any base is rewritten into a residual, a slice narrower than ``r`` or a non-linear target."""
    for name, spec in plan.items():
        if isinstance(spec, TokenSpec):  # trainable tokens: rows of a table, no factorisation
            continue
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)) or weight is None \
                or weight.dim() != 2:
            raise ValueError(f"LoraConfig.init_lora_weights={config.init_lora_weights!r} is "
                             f"implemented for linear layers; {name} is {type(module).__name__}")
        out_f, in_f = (weight.shape[::-1] if is_hf_conv1d(module) else weight.shape)
        sizes = [n for n, e in zip(spec.split_sizes, spec.enable_lora) if e] \
            if spec is not None else [out_f]
        if config.r > min(min(sizes), in_f):
            raise ValueError(f"LoraConfig.r={config.r} is larger than {name}'s smallest adapted "
                             f"slice ({min(sizes)} x {in_f}); {config.init_lora_weights!r} needs "
                             f"r <= {min(min(sizes), in_f)}")


def get_lora_config(model: nn.Module) -> LoraConfig | None:
    """The config :func:`inject_lora` used (target_modules resolved), or None."""
    return getattr(model, CONFIG_ATTR, None)


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """Qualified name -> LoRA layer, for every layer holding an adapter (``r > 0``).

    The same answer as :func:`lora_phi3.layers.lora_layers`, under the injector's name.
    """
    return lora_layers(model)


def check_not_disabled(model: nn.Module, what: str) -> None:
    """Refuse ``what`` (e.g. ``"merge"``) while :func:`disable_lora` is active on ``model``.

    Raises:
        ValueError: some LoRA layer of ``model`` is disabled; names the first few.
    """
    disabled = [n for n, m in lora_modules(model).items() if m.lora_disabled]
    if disabled:
        raise ValueError(f"cannot {what} inside disable_lora (disabled: {disabled[:3]}...)")


def _shared_weights(model: nn.Module, layers: dict[str, LoRALayer]) -> list[str]:
    """LoRA layers whose weight another module also uses (tied embeddings): merging would change it."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append((mname, module))
    bad = []
    for name, layer in layers.items():
        own = (layer, getattr(layer, "host", layer))  # an adapter on a parameter: its host's weight
        others = [n for n, m in owners.get(id(layer.weight), []) if all(m is not o for o in own)]
        if others:
            bad.append(f"{name} (weight shared with {others})")
    return bad


def _merge_is_finite(layer: LoRALayer) -> bool:
    # merged_weight() is what merge() would write (dense or quantized base alike).
    return bool(torch.isfinite(layer.merged_weight()).all())


@torch.no_grad()
def merge_lora(model: nn.Module, safe_merge: bool = True) -> None:
    """Fold every adapter into its base weight (idempotent); forwards then skip the adapter path.

    Args:
        model: a model with LoRA layers.
        safe_merge: check every layer's merged weight for NaN/Inf *before* touching any weight.

    Raises:
        ValueError: a merged weight would be non-finite (no weight is changed); a LoRA layer's weight
            is tied to another module (merging would change that module too); inside ``disable_lora``.
    """
    check_not_disabled(model, "merge")
    pending = {n: m for n, m in lora_modules(model).items() if not m.merged}
    shared = _shared_weights(model, pending)
    if shared:
        raise ValueError(f"cannot merge LoRA into tied weights: {shared}; keep these adapters "
                         "unmerged, or untie the weights first")
    if safe_merge:
        bad = [n for n, m in pending.items() if not _merge_is_finite(m)]
        if bad:
            raise ValueError(f"safe_merge refused: merged weights would contain NaN or Inf in {bad}; "
                             "no weight was changed")
    done = []
    try:
        for layer in pending.values():
            layer.merge(safe_merge=False)
            done.append(layer)
    except ValueError:  # a layer that cannot merge (e.g. a grouped conv in PEFT's layout)
        for layer in reversed(done):
            layer.unmerge()  # bit for bit: the model is as it was
        raise


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged adapter from its base weight again, restoring the original bits."""
    for layer in lora_modules(model).values():
        layer.unmerge()


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which the model computes its base outputs (adapters skipped).

    Merged layers are unmerged on entry and merged again on exit; every layer's state is restored
    on exit, also when the body raises. ``modules_to_save`` are trained in place, so they keep their
    trained values here (they are not reverted).
    """
    saved = [(m, m.merged, m.lora_disabled, m.merge_weights) for m in lora_modules(model).values()]
    try:
        for layer, merged, _, _ in saved:
            layer.merge_weights = False  # an eval() inside must not merge the adapter back in
            if merged:
                layer.unmerge()
            layer.lora_disabled = True
        yield model
    finally:
        for layer, merged, disabled, merge_weights in reversed(saved):
            layer.lora_disabled = False
            layer.merge() if merged else layer.unmerge()
            layer.lora_disabled = disabled
            layer.merge_weights = merge_weights


@torch.no_grad()
def merge_and_unload(model: nn.Module, safe_merge: bool = True) -> nn.Module:
    """Merge every adapter and put the plain torch modules back (same storage, no copies).

    Each LoRA layer made by :func:`inject_lora` is replaced by the very module it replaced
    (``nn.Linear``, transformers ``Conv1D``, an experts module, ...) now holding the merged weight,
    so the state dict has the vanilla model's keys. The hooks :func:`inject_lora` added (input grad, input recompute)
    and the stored config are removed; ``requires_grad`` flags are left as they are.

    Args:
        model: a model with LoRA layers.
        safe_merge: as in :func:`merge_lora`.

    Returns:
        ``model`` (or the unloaded module, if ``model`` itself was a LoRA layer).

    Raises:
        ValueError: as :func:`merge_lora`.
    """
    check_not_disabled(model, "merge_and_unload")
    merge_lora(model, safe_merge=safe_merge)
    _remove_recompute_hooks(model)
    paths = _paths(model)
    # An adapter on a parameter leaves with its host (which gives back the module it stands for).
    layers = {id(m): m for m in model.modules()
              if isinstance(m, (LoRALayer, LoRAParameters)) and not isinstance(m, ParamLoRA)}
    for key, layer in layers.items():
        plain = plain_module(layer)
        for path in paths[key]:
            if not path:
                model = plain
            else:
                _replace(model, path, plain)
    _remove_input_grad_hooks(model)
    for attr in (CONFIG_ATTR, ADAPTERS_ATTR, ACTIVE_ATTR):
        model.__dict__.pop(attr, None)
    return model
