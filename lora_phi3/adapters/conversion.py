"""PiSSA/OLoRA adapters saved for the ORIGINAL base weights, and read back by the model that trained them.

A PiSSA or OLoRA layer trains against a residual base ``W_res = W - s B0 A0``; an adapter file of
its ``A``, ``B`` would need that residual, which nobody else has. So every save and export writes
the equivalent rank-``2r`` adapter for the original ``W`` (``[A; A0]``, ``[B, -B0]`` per slice,
``lora_alpha`` raised to keep the scaling; :meth:`~lora_phi3.layers.Linear.original_base_factors`),
with no second step for the user (PEFT asks for ``path_initial_model_for_weight_conversion``).
The file records it under ``init_conversion``:
``{"init_lora_weights": "pissa", "r": 16, "lora_alpha": 32}``, the run's own values.

Loading such a file:

- into a fresh original model: it is a plain rank-``2r`` LoRA adapter; nothing special happens.
- into a model injected with the same PiSSA/OLoRA config (a resumed fine-tune): the halves are
  split again; the second halves must equal this model's own ``A0``, ``-B0`` exactly (else its
  residual base is not the one the file was trained on, and the load is refused).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..layers import LoRALayer, lora_layers
from ..layers.base import is_data_init

__all__ = ["data_init_layers", "convert_for_original_base", "split_for_data_init"]


def data_init_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA layers of ``model`` whose base is a PiSSA/OLoRA residual."""
    return {n: m for n, m in lora_layers(model).items()
            if is_data_init(getattr(m, "init_lora_weights", True))}


def convert_for_original_base(model: nn.Module, tensors: dict[str, torch.Tensor],
                              modules: dict[str, dict[str, Any]], lora_config: dict[str, Any] | None
                              ) -> dict[str, Any] | None:
    """Rewrite a save's ``tensors``, ``modules`` and ``lora_config`` (in place) for the original base.

    Returns:
        The ``init_conversion`` record, or None when no layer needs converting.
    """
    layers = data_init_layers(model)
    if not layers:
        return None
    record: dict[str, Any] = {}
    for name, layer in layers.items():
        A2, B2, r2, alpha2 = layer.original_base_factors()
        prefix = f"{name}." if name else ""
        tensors[prefix + "lora_A"], tensors[prefix + "lora_B"] = A2, B2
        record = {"init_lora_weights": layer.init_lora_weights, "r": layer.r,
                  "lora_alpha": layer.lora_alpha}
        modules[name].update(r=r2, lora_alpha=alpha2)  # the scaling is unchanged
        if lora_config is not None:  # one config: every layer has its r and alpha
            lora_config.update(r=r2, lora_alpha=alpha2)
    if lora_config is not None:
        lora_config.pop("init_lora_weights", None)  # a plain (True) init on the original base
    return record


def split_for_data_init(model: nn.Module, doc: dict[str, Any], tensors: dict[str, torch.Tensor],
                        where: str) -> None:
    """Undo :func:`convert_for_original_base` (in place) for a model injected with PiSSA/OLoRA.

    Raises:
        ValueError: a converted module whose second half is not this model's initial factors
            (another base, init or seed), naming it; nothing in the model is changed.
    """
    record = doc.get("init_conversion")
    layers = data_init_layers(model)
    if record is None or not layers:
        return
    problems = []
    for name, layer in layers.items():
        meta = doc["modules"].get(name)
        prefix = f"{name}." if name else ""
        A2, B2 = tensors.get(prefix + "lora_A"), tensors.get(prefix + "lora_B")
        if meta is None or A2 is None or B2 is None or meta.get("r") != 2 * layer.r:
            continue  # the usual checks report it
        A0, B0 = layer._buffers["lora_A_init"], layer._buffers["lora_B_init"]
        r, As, Bs = layer.r, [], []
        for i, s in enumerate(layer.iter_slices()):
            a2 = A2[2 * r * i:2 * r * (i + 1)]  # (2r, in): [A_i; A0_i]
            b2 = B2[s.b_rows]  # (size, 2r): [B_i, -B0_i]
            if a2.shape[0] != 2 * r or b2.shape[1] != 2 * r or \
                    not torch.equal(a2[r:].to(A0.dtype), A0[s.a_rows]) or \
                    not torch.equal(b2[:, r:].to(B0.dtype), -B0[s.b_rows]):
                problems.append(name)
                break
            As.append(a2[:r])
            Bs.append(b2[:, :r])
        else:
            tensors[prefix + "lora_A"], tensors[prefix + "lora_B"] = torch.cat(As), torch.cat(Bs)
            meta.update(r=layer.r, lora_alpha=layer.lora_alpha)
    if problems:
        raise ValueError(f"{where} was converted from a {record['init_lora_weights']!r} "
                         f"initialisation other than this model's (its initial factors differ in "
                         f"{problems[:3]}: another base, init or seed), so this model's residual "
                         "base does not fit it; load it into the original model instead "
                         "(nothing was changed)")
    cfg = doc.get("lora_config")
    if cfg is not None:
        cfg.update(r=record["r"], lora_alpha=record["lora_alpha"],
                   init_lora_weights=record["init_lora_weights"])
