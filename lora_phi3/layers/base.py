"""What every LoRA layer shares: its state, the merge/unmerge protocol and which parameters are its own.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes a pretrained weight ``W`` and learns a low-rank
update ``delta W = B @ A * scaling`` with ``A`` of shape ``(r, in)``, ``B`` of shape ``(out, r)`` and
``scaling = lora_alpha / r`` (section 4.1). ``B`` starts at zero, so training starts from the
pretrained function.

:class:`LoRALayer` is a mixin put before the torch module in each layer's bases; each layer adds
only its shapes, its :meth:`~LoRALayer.delta_weight` (the single source of the dense update, used
by merge and by the tests) and its forward.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from .data_init import parse_init_lora_weights

__all__ = ["LoRALayer", "lora_layers", "check_lora_args", "new_lora_param"]


def check_lora_args(r: Any, lora_alpha: Any, lora_dropout: Any) -> None:
    """Raise ``ValueError`` naming the bad value of ``r``, ``lora_alpha`` or ``lora_dropout``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0 (0 means no adapter), got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")


#: ``init_lora_weights`` values every layer implements (PEFT's names). Linear layers also take
#: the data-driven ``"pissa"``, ``"pissa_niter_K"`` and ``"olora"`` (see :mod:`.data_init`).
INIT_LORA_WEIGHTS = (True, False, "gaussian")


def is_data_init(value: object) -> bool:
    """True for a data-driven ``init_lora_weights`` (a string other than ``"gaussian"``)."""
    return isinstance(value, str) and value != "gaussian"


def check_init_lora_weights(value: object, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is an ``init_lora_weights`` this
    library implements: True, False, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``."""
    if any(value is v or (isinstance(v, str) and value == v) for v in INIT_LORA_WEIGHTS):
        return
    if isinstance(value, str):
        try:
            parse_init_lora_weights(value)
            return
        except ValueError:
            pass
    raise ValueError(f"{where} must be one of True, False, 'gaussian', 'pissa', 'pissa_niter_K' "
                     f"(K a positive int) or 'olora', got {value!r} (PEFT's other data-driven "
                     "initialisations such as 'loftq', 'eva' and 'corda' are not implemented)")


def new_lora_param(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A zero-filled adapter parameter (initialised by ``reset_lora_parameters``)."""
    return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))


class LoRALayer(nn.Module):
    """Mixin holding the LoRA state shared by every layer and the merge/unmerge protocol.

    Put it before the torch module in a layer's bases (``class Linear(LoRALayer, nn.Linear)``): its
    ``super()`` calls then reach that module.

    Attributes:
        r: rank of the update; 0 means the layer behaves exactly like its torch module.
        lora_alpha: numerator of the scaling.
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), computed once
            here.
        use_rslora: rank-stabilised scaling (rsLoRA).
        use_dora: weight-decomposed LoRA (DoRA, see :mod:`~lora_phi3.layers.dora`): the layer
            also holds ``lora_magnitude``.
        lora_dropout: ``nn.Dropout`` (or ``nn.Identity`` for p=0) applied to the adapter's input.
            A module, not a lambda, so layers pickle and deepcopy.
        merged: True while ``delta_weight()`` is folded into ``weight``.
        merge_weights: if True, ``eval()`` merges and ``train()`` unmerges, as in loralib.
        lora_disabled: if True, the forward skips the adapter (see ``inject.disable_lora``).
    """

    r: int
    weight: torch.Tensor | None
    #: The name of the adapter the layer computes with (see :mod:`.named`); others are stored in
    #: ``lora_adapters``.
    active_adapter: str | None = "default"
    #: While :func:`lora_phi3.mixed_batch` runs: ``(names per row, [(name, rows), ...])``.
    mixed_groups = None

    #: True for the layer kinds that implement DoRA (``use_dora=True``).
    supports_dora: bool = False
    #: True for the layer kinds that implement PiSSA/OLoRA (a data-driven ``init_lora_weights``).
    supports_data_init: bool = False

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool,
                   use_rslora: bool = False, init_lora_weights: bool | str = True,
                   use_dora: bool = False) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
        if use_dora and not self.supports_dora:
            raise ValueError(f"use_dora=True is not supported by {type(self).__name__}; DoRA is "
                             "implemented for Linear and MergedLinear (dense or NF4 base)")
        self.use_dora = use_dora
        check_init_lora_weights(init_lora_weights, "init_lora_weights")
        if is_data_init(init_lora_weights) and not self.supports_data_init:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported by "
                             f"{type(self).__name__}; PiSSA and OLoRA are implemented for Linear "
                             "and MergedLinear (dense or NF4 base)")
        self.init_lora_weights = init_lora_weights
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        # rsLoRA (Kalajdzievski 2023, arXiv:2312.03732, Thm 3.2): alpha / sqrt(r) keeps the
        # update's scale stable as r grows; the original LoRA (section 4.1) uses alpha / r.
        self.scaling = (lora_alpha / (math.sqrt(r) if use_rslora else r)) if r > 0 else 0.0
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.merge_weights = merge_weights
        self.merged = False
        self.lora_disabled = False

    # -- the dense update: one method per layer type -------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` in ``weight``'s layout, in fp32 (fp64 for fp64 adapters)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """The torch module's own init (next in the MRO), then the adapter's, as loralib does.

        loralib's constructors call this once more after creating ``A`` and ``B``, so a layer built
        under ``torch.manual_seed(s)`` draws base weight, bias, base weight, bias, ``A``: ours too.
        A layer whose base is not a dense weight (a quantized one) resets only its adapter.
        """
        if self._parameters.get("weight") is not None:
            super().reset_parameters()  # type: ignore[misc]  # the torch module's, next in the MRO
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Initialise ``A`` and ``B`` as ``init_lora_weights`` says (PEFT's meanings).

        ``True``: section 4.1 of the paper, A kaiming-uniform and B = 0, so delta W = 0 at the
        start. ``"gaussian"``: A ~ N(0, 1/r^2), B = 0. ``False``: B initialised like A (as an
        ``nn.Linear(r, out)`` weight), so the adapter changes the function from the start (for
        tests and for studying the init).
        """
        init = getattr(self, "init_lora_weights", True)  # layers pickled before the switch
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    # -- which parameters are the adapter's: the one answer, asked of the layer -------------------
    adapter_param_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_magnitude")

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """This layer's own adapter parameters by attribute name (empty for ``r == 0``).

        Callers (``mark_only_lora_as_trainable``, ``lora_state_dict``, adapter files, PEFT export)
        ask the layer rather than matching ``"lora_"`` in names, so a new variant that adds a
        parameter (a DoRA magnitude, a second adapter) declares it here and nowhere else.
        """
        params = self._parameters
        return {n: params[n] for n in self.adapter_param_names if params.get(n) is not None}

    @property
    def lora_active(self) -> bool:
        """True when the forward must add the adapter's output (rank > 0, not merged, not disabled)."""
        return self.r > 0 and not self.merged and not self.lora_disabled

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.Tensor:
        """``t`` in the dtype the update is formed in: fp32, or fp64 for fp64 adapters."""
        return t.to(torch.promote_types(t.dtype, torch.float32))

    # -- merge protocol --------------------------------------------------------------------------
    def dense_base_weight(self) -> torch.Tensor:
        """The frozen base weight as a dense tensor in ``weight``'s layout (a dense layer's own
        ``weight``; a quantized base dequantises)."""
        return self.weight

    @torch.no_grad()
    def merged_weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """What :meth:`merge` stores: ``W + delta_weight()`` formed in fp32, rounded once to ``W``'s dtype.

        ``merge_lora`` checks every layer's merged weight for NaN/Inf with this before any merge.
        ``delta``: ``delta_weight()`` when the caller has it already.
        """
        base = self.dense_base_weight()
        delta = self.delta_weight() if delta is None else delta
        return (base.to(delta.dtype) + delta).to(base.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the update into ``weight``. Idempotent.

        The sum is formed in fp32 and rounded once to the weight's dtype (:meth:`merged_weight`).

        Raises:
            ValueError: with ``safe_merge=True``, if the merged weight would hold NaN or Inf; the
                weight is left untouched.
        """
        if self.merged or self.r == 0:
            return
        delta = self.delta_weight()  # formed once, for the sum and for the round-trip check
        merged = self.merged_weight(delta)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"safe_merge refused {type(self).__name__}: the merged weight would "
                             "contain NaN or Inf; the weight is unchanged")
        self._store_merged(merged, delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight`` again, restoring the original bits. Idempotent."""
        if not self.merged:
            return
        self._restore_unmerged()
        self.merged = False

    def _store_merged(self, merged: torch.Tensor, delta: torch.Tensor) -> None:
        # In place. Where rounding would keep unmerge from landing exactly on the original value
        # (it happens when W + delta moves to a coarser binade), the original values are kept
        # aside as a sparse (indices, values) pair, so unmerge restores the weight bit for bit
        # however many eval/train cycles run (loralib drifts by ~4e-3 over 50 in bf16).
        round_trip = self._unmerged_from(merged, delta).to(self.weight.dtype)
        lost = (round_trip != self.weight).flatten().nonzero().squeeze(1)
        self._unmerge_fix = (lost, self.weight.flatten()[lost].clone())
        self.weight.copy_(merged)

    def _unmerged_from(self, merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merged_weight`, in ``delta``'s dtype: ``merged - delta``."""
        return merged.to(delta.dtype) - delta

    def _restore_unmerged(self) -> None:
        delta = self.delta_weight()
        restored = self._unmerged_from(self.weight, delta).to(self.weight.dtype)
        lost, values = getattr(self, "_unmerge_fix", (None, None))
        if lost is not None and lost.numel():
            restored.view(-1)[lost.to(restored.device)] = values.to(restored.device)
        self.weight.copy_(restored)
        self._unmerge_fix = (None, None)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    # -- state dict ------------------------------------------------------------------------------
    _legacy_keys: dict[str, str] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loading while merged would leave the old delta baked into `weight` (loralib #190-style
        # corruption on the next train()). Unmerge first, load, then merge the new delta.
        was_merged = self.merged
        self.unmerge()
        for old, new in self._legacy_keys.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, r={self.r}, lora_alpha={self.lora_alpha}" if self.r > 0 else base


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Qualified name -> LoRA layer, for every layer of ``model`` holding an adapter (``r > 0``).

    The single answer to "which layers carry an adapter"; ``inject.lora_modules`` is this.
    """
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALayer) and m.r > 0 and m.adapter_params()}
