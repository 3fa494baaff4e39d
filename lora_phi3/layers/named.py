"""Several named adapters in one layer: the active one in the layer's own attributes, the others stored.

A layer computes with exactly one adapter, its *active* one, held where a single-adapter layer holds
it (``lora_A``, ``lora_B``, ``lora_magnitude``, ``lora_bias``, ``r``, ``scaling``,
``lora_dropout``, the slices of a fused layer, ...), so every code path (forward, merge, DoRA,
adapter files, PEFT export) works on it unchanged and a model with one adapter keeps its
state-dict keys. Every other adapter of the layer
is a :class:`StoredAdapter` in ``layer.lora_adapters[name]`` (state-dict keys
``<layer>.lora_adapters.<name>.lora_A``, ...). :func:`activate` moves the tensors (the same
``Parameter`` objects, never copies) and settings between the two places, so an optimizer's state
follows its parameters.

A layer may lack the active adapter (another adapter targets other modules): its own adapter is then
empty (``r == 0``) and it computes its base function.

:func:`mixed_forward` runs a batch whose rows use different adapters: the rows are grouped per
adapter and each group runs through the ordinary forward with its adapter active.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = ["StoredAdapter", "ADAPTER_SETTINGS", "ADAPTER_TENSORS", "activate", "adapter_names",
           "mixed_forward"]

#: The settings that belong to one adapter (whichever a layer kind has).
ADAPTER_SETTINGS = ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "init_lora_weights",
                    "lora_slices", "enable_lora", "lora_layout")
#: Its parameters, buffers and modules, under the names the layer gives them.
ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude", "lora_bias", "lora_A_init",
                   "lora_B_init", "lora_dropout")


class StoredAdapter(nn.Module):
    """An adapter of a layer that is not its active one: the same names as on the layer."""

    def extra_repr(self) -> str:
        return f"r={getattr(self, 'r', 0)}, lora_alpha={getattr(self, 'lora_alpha', None)}"


def _move(src: nn.Module, dst: nn.Module) -> None:
    """Move one adapter's tensors and settings from ``src`` to ``dst`` (``dst`` holds none)."""
    for name in ADAPTER_TENSORS:
        for store in (src._parameters, src._buffers, src._modules):
            if store.get(name) is not None:
                value = store.pop(name)
                if isinstance(value, nn.Parameter):
                    dst.register_parameter(name, value)
                elif isinstance(value, nn.Module):
                    dst.add_module(name, value)
                else:
                    dst.register_buffer(name, value, persistent=name not in ("lora_A_init",
                                                                            "lora_B_init"))
                break
    for name in ADAPTER_SETTINGS:
        if name in src.__dict__:
            dst.__dict__[name] = src.__dict__[name]


def _empty(layer: nn.Module) -> None:
    """Give ``layer`` no adapter of its own: its base function (``r == 0``)."""
    layer.r, layer.scaling = 0, 0.0
    layer.add_module("lora_dropout", nn.Identity())
    if "lora_slices" in layer.__dict__:
        layer.lora_slices = ()
    if "enable_lora" in layer.__dict__:
        layer.enable_lora = [False] * len(layer.enable_lora)


def adapter_names(layer: nn.Module) -> list[str]:
    """The names of the adapters ``layer`` holds: its active one (if it has one) and the stored."""
    stored = list(layer._modules["lora_adapters"]) if "lora_adapters" in layer._modules else []
    own = [layer.active_adapter] if layer.r > 0 and layer.adapter_params() else []
    return own + stored


def store_adapter(layer: nn.Module, name: str, holder: nn.Module) -> None:
    """Keep ``holder``'s active adapter (a layer of the same kind sharing ``layer``'s base) as
    ``layer``'s stored adapter ``name``."""
    stored = StoredAdapter()
    _move(holder, stored)
    if "lora_adapters" not in layer._modules:
        layer.add_module("lora_adapters", nn.ModuleDict())
    layer._modules["lora_adapters"][name] = stored


def activate(layer: nn.Module, name: str | None) -> None:
    """Make ``name`` the layer's active adapter (None or a name it lacks: no adapter, the base).

    Raises:
        ValueError: the layer is merged (its weight holds the active adapter's update).
    """
    current = layer.active_adapter
    if name == current:
        return
    if layer.merged:
        raise ValueError(f"{type(layer).__name__} is merged with adapter {current!r}; unmerge "
                         "(merge_lora(..., False) / unmerge_lora) before switching adapters")
    stored_all = layer._modules.get("lora_adapters")
    if layer.r > 0 and layer.adapter_params():
        store_adapter(layer, current, layer)
        stored_all = layer._modules["lora_adapters"]
    _empty(layer)
    if stored_all is not None and name in stored_all:
        _move(stored_all[name], layer)
        del stored_all[name]
        if not len(stored_all):  # back to the single-adapter layout and keys
            del layer._modules["lora_adapters"]
    layer.active_adapter = name


def delete_stored(layer: nn.Module, name: str) -> bool:
    """Drop ``layer``'s stored adapter ``name`` (freeing its tensors); True if it had it."""
    stored_all = layer._modules.get("lora_adapters")
    if stored_all is None or name not in stored_all:
        return False
    del stored_all[name]
    if not len(stored_all):
        del layer._modules["lora_adapters"]
    return True


def mixed_forward(layer: nn.Module, x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]
                  ) -> torch.Tensor:
    """``forward(x)`` with row ``i`` of ``x`` computed by adapter ``layer.mixed_groups``' choice.

    ``layer.mixed_groups`` is ``(names, [(name, row indices), ...])`` (set by
    :func:`lora_phi3.mixed_batch`). Each group of rows runs once, with its adapter active (None: the
    base), and lands in its rows of the output; the active adapter is restored afterwards.

    Raises:
        ValueError: the batch does not have one row per name.
    """
    names, groups = layer.mixed_groups
    if x.shape[0] != len(names):
        raise ValueError(f"mixed_batch got {len(names)} adapter names for a batch of {x.shape[0]} "
                         "rows; pass one name (or None) per row")
    active, out = layer.active_adapter, None
    # Rows sorted by adapter (the usual layout) are contiguous ranges: views in, one cat out.
    spans = [(int(rows[0]), len(rows)) for _, rows in groups]
    contiguous = all(int(rows[-1]) - int(rows[0]) + 1 == len(rows) for _, rows in groups) and \
        sorted(spans) == spans
    layer.mixed_groups = None  # the inner calls are ordinary forwards
    try:
        if contiguous:
            parts = []
            for (name, _), (start, n) in zip(groups, spans):
                activate(layer, name)
                parts.append(forward(x.narrow(0, start, n)))
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            for name, rows in groups:
                activate(layer, name)
                rows = rows.to(x.device)
                y = forward(x.index_select(0, rows))
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out.index_copy_(0, rows, y)
    finally:
        activate(layer, active)
        layer.mixed_groups = (names, groups)
    return out
