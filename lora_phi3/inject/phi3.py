"""The Phi-3 map: default targets, and the slices of Phi-3's two fused projections.

Phi-3 fuses the attention input projections into one ``qkv_proj`` and the MLP's gate and up
projections into one ``gate_up_proj``. Their output rows are, in order (``n_heads`` query heads,
``n_kv`` key/value heads under grouped-query attention, ``head_dim`` each)::

    qkv_proj.weight rows:     | q: n_heads*head_dim | k: n_kv*head_dim | v: n_kv*head_dim |
    gate_up_proj.weight rows: | gate: intermediate_size | up: intermediate_size |

(the row order of ``Phi3Attention.forward``, which slices ``q, k, v`` off the fused output, and of
``Phi3MLP.forward``, which ``chunk(2)``s the output into ``gate, up``). The Llama-style names
``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` therefore name *slices*; the injector
turns a fused module into a :class:`~lora_phi3.layers.MergedLinear` with one adapter per selected
slice. Only module names and config fields are used, which transformers 4.41-5.x all keep.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn as nn

__all__ = ["DEFAULT_TARGETS", "FUSED_SLICES", "FusedSlices", "is_phi3", "phi3_slice_map"]

# The four linear projections of every Phi-3 decoder layer (all of them; none is left out).
DEFAULT_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

# fused module name -> names of its slices, in row order.
FUSED_SLICES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class FusedSlices(NamedTuple):
    """How one fused projection splits its output rows.

    Attributes:
        split_sizes: rows of each slice, in order (they sum to ``out_features``).
        slice_names: the Llama-style name of each slice, e.g. ``("q_proj", "k_proj", "v_proj")``.
    """

    split_sizes: list[int]
    slice_names: tuple[str, ...]


def is_phi3(model: nn.Module) -> bool:
    """True if ``model.config.model_type == "phi3"`` (any Phi-3 model class, base or causal LM)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "phi3"


def _split_sizes(config: Any, fused: str) -> list[int]:
    if fused == "qkv_proj":
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        # Phi3Attention: head_dim from the config when set, else hidden_size // num_attention_heads.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
    return [config.intermediate_size, config.intermediate_size]


def _out_features(module: nn.Module) -> int | None:
    out = getattr(module, "out_features", None)
    if out is None and getattr(module, "weight", None) is not None:
        out = module.weight.shape[0]
    return out


def phi3_slice_map(model: nn.Module) -> dict[str, FusedSlices]:
    """The fused projections of a Phi-3 model and how their rows split.

    Works on the vanilla model and on one whose fused projections are already LoRA layers.

    Args:
        model: a Phi-3 model (``model.config.model_type == "phi3"``).

    Returns:
        ``{qualified module name: FusedSlices}``, e.g.
        ``{"model.layers.0.self_attn.qkv_proj": FusedSlices([3072, 1024, 1024], ("q_proj", ...))}``.

    Raises:
        ValueError: if ``model`` is not Phi-3, or a fused module's size disagrees with the config.
    """
    if not is_phi3(model):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"phi3_slice_map needs a Phi-3 model (config.model_type == 'phi3'), "
                         f"got model_type={model_type!r}")
    result: dict[str, FusedSlices] = {}
    for name, module in model.named_modules():
        fused = name.rpartition(".")[2]
        if fused not in FUSED_SLICES:
            continue
        sizes = _split_sizes(model.config, fused)
        out = _out_features(module)
        if out is not None and sum(sizes) != out:
            raise ValueError(f"{name} has {out} output rows but the Phi-3 config gives slices "
                             f"{dict(zip(FUSED_SLICES[fused], sizes))} summing to {sum(sizes)}")
        result[name] = FusedSlices(sizes, FUSED_SLICES[fused])
    return result
