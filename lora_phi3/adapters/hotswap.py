"""Hot swap: new weights into an existing named adapter, in place, so a compiled model does not recompile.

``load_adapter(model, path, adapter_name=existing)`` lands here. The file must adapt the same
modules (and slices) with the same variant; its rank may be smaller than the adapter's (it is
zero-padded, as PEFT's hotswap pads: padding adds nothing to ``B @ A`` nor to a DoRA norm), and its
scaling may differ (the ratio is folded into ``B``, so the layer's Python-float ``scaling``, which a
compiled graph guards on, never changes). Every parameter keeps its identity, shape and dtype:
``torch.compile`` sees the same graph inputs and reuses its graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..inject.named import using_adapter
from ..layers import LoRALayer, lora_layers
from ..layers.base import is_data_init
from .files import read_adapter
from .state import module_meta

logger = logging.getLogger(__name__)

__all__ = ["hotswap_adapter"]

_SAME = ("kind", "in_features", "out_features", "num_embeddings", "embedding_dim", "in_channels",
         "out_channels", "kernel_size", "groups", "fan_in_fan_out", "split_sizes", "enable_lora")


def _padded(layer: LoRALayer, A: torch.Tensor, B: torch.Tensor, r_file: int, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's per-slice ``A`` ``(r_f * k, in)`` and ``B`` ``(rows, r_f)`` at the layer's rank."""
    k = max(len(getattr(layer, "lora_slices", ())) or 1, 1)
    r = layer.r
    A_new = layer.lora_A.new_zeros(layer.lora_A.shape)
    B_new = layer.lora_B.new_zeros(layer.lora_B.shape)
    for i in range(k):
        A_new[i * r:i * r + r_file] = A[i * r_file:(i + 1) * r_file]
    rows = B.shape[0]
    B_new[:rows, :r_file] = (B.float() * scale).to(B_new.dtype) if scale != 1.0 else B
    return A_new, B_new


def hotswap_adapter(model: nn.Module, path: str | Path, adapter_name: str) -> nn.Module:
    """Replace the weights of ``model``'s adapter ``adapter_name`` with the file's, in place.

    Raises:
        ValueError: the file adapts other modules or slices, another variant (DoRA or not), a
            larger rank, trained tensors beyond the adapter's (biases, modules_to_save), or the
            adapter's layers are merged or PiSSA/OLoRA residuals; nothing is changed then.
    """
    doc, tensors = read_adapter(path)
    where = f"hot swap of adapter {adapter_name!r} from {str(path)!r}"
    with using_adapter(model, adapter_name):
        layers = lora_layers(model)
        saved = doc["modules"]
        problems = []
        if set(saved) != set(layers):
            problems.append(f"the file adapts {sorted(set(saved) ^ set(layers))[:4]} differently "
                            "(a hot swap keeps the adapted modules)")
        updates: dict[nn.Parameter, torch.Tensor] = {}
        extra = sorted(k for k in tensors if k.rpartition(".")[0] not in layers or
                       (k.rpartition(".")[2] not in ("lora_A", "lora_B", "lora_magnitude",
                                                     "lora_bias")))
        if extra:
            problems.append(f"tensors beyond the adapter's ({extra[:3]}) cannot be hot swapped")
        for name in sorted(set(saved) & set(layers)):
            layer, meta, have = layers[name], saved[name], module_meta(layers[name])
            diff = {k: (meta.get(k), have.get(k)) for k in _SAME if meta.get(k) != have.get(k)}
            prefix = f"{name}." if name else ""
            dora = f"{prefix}lora_magnitude" in tensors
            bias = f"{prefix}lora_bias" in tensors
            if diff:
                problems.append(f"module {name} differs (file, model): {diff}")
            elif dora != getattr(layer, "use_dora", False):
                problems.append(f"module {name}: the file is {'' if dora else 'not '}DoRA, the "
                                f"adapter is{'' if layer.use_dora else ' not'}")
            elif bias != ("lora_bias" in layer.adapter_params()):
                problems.append(f"module {name}: the file has {'a' if bias else 'no'} lora_bias, "
                                f"the adapter {'has' if not bias else 'has none'}")
            elif meta["r"] > layer.r:
                problems.append(f"module {name}: the file's rank {meta['r']} exceeds the adapter's "
                                f"{layer.r}; hot swap pads smaller ranks only")
            elif layer.merged or is_data_init(getattr(layer, "init_lora_weights", True)):
                problems.append(f"module {name} is merged or a PiSSA/OLoRA residual")
            else:
                A, B = _padded(layer, tensors[prefix + "lora_A"], tensors[prefix + "lora_B"],
                               meta["r"], meta["scaling"] / layer.scaling)
                updates[layer.lora_A], updates[layer.lora_B] = A, B
                if dora:
                    updates[layer.lora_magnitude] = tensors[prefix + "lora_magnitude"]
                if bias:  # added as scaling * lora_bias: the scaling ratio folds in as into B
                    ratio = meta["scaling"] / layer.scaling
                    updates[layer.lora_bias] = tensors[prefix + "lora_bias"].float() * ratio
        for param, value in updates.items():
            if tuple(value.shape) != tuple(param.shape):
                problems.append(f"a tensor of shape {tuple(value.shape)} for a parameter of shape "
                                f"{tuple(param.shape)}")
        if problems:
            raise ValueError(f"{where} refused (nothing was changed): " + "; ".join(problems))
        with torch.no_grad():
            for param, value in updates.items():
                param.copy_(value.to(param.dtype))
    logger.info("hot-swapped %d tensors into adapter %r from %s", len(updates), adapter_name, path)
    return model
