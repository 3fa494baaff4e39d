"""What every LoRA layer shares: its state, the merge/unmerge protocol and which parameters are its own.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes a pretrained weight ``W`` and learns a low-rank
update ``delta W = B @ A * scaling`` with ``A`` of shape ``(r, in)``, ``B`` of shape ``(out, r)`` and
``scaling = lora_alpha / r`` (section 4.1). ``B`` starts at zero, so training starts from the
pretrained function.

:class:`LoRALayer` is a mixin put before the torch module in each layer's bases; each layer adds
only its shapes, its :meth:`~LoRALayer.delta_weight` (the single source of the dense update, used
by merge and by the tests) and its forward. Two variants are shared here too: DoRA's merge (a
layer gives its norm, :meth:`~LoRALayer._dora_norm`, and the gain's layout,
:meth:`~LoRALayer._dora_weight_gain`) and PEFT's ``lora_bias`` (a trained bias on ``B``'s output,
``lora_bias``, which merges into the layer's ``bias``).
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
        lora_bias: (a parameter, present only when the layer was built with ``lora_bias=True``)
            PEFT's bias on ``B``: the adapter adds ``scaling * (h @ B.T + lora_bias)``, shape
            ``(rows of lora_B,)``.
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
    #: True for the layer kinds that implement PEFT's ``lora_bias=True`` (a bias on ``B``).
    supports_lora_bias: bool = False
    #: True for the layer kinds that implement PiSSA/OLoRA (a data-driven ``init_lora_weights``).
    supports_data_init: bool = False

    @classmethod
    def check_variants(cls, use_dora: object = False, lora_bias: object = False) -> None:
        """Raise the ``ValueError`` this layer kind gives for a ``use_dora``/``lora_bias`` it does not
        take, without building anything (so an injection can check every target first).

        Raises:
            ValueError: a non-bool switch; DoRA or ``lora_bias`` on a kind without it; both at once
                (PEFT refuses the pair).
        """
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
        if use_dora and not cls.supports_dora:
            raise ValueError(f"use_dora=True is not supported by {cls.__name__}; DoRA is "
                             "implemented for Linear and MergedLinear (dense or NF4 base), "
                             "Embedding, and Conv1d/2d/3d in lora_layout='peft'")
        if not isinstance(lora_bias, bool):
            raise ValueError(f"lora_bias must be True or False, got {lora_bias!r}")
        if lora_bias and not cls.supports_lora_bias:
            raise ValueError(f"lora_bias=True is not supported by {cls.__name__}; a bias on lora_B "
                             "is implemented for Linear and MergedLinear (dense or NF4 base) and "
                             "Conv1d/2d/3d, as in PEFT (which refuses it on embeddings too)")
        if lora_bias and use_dora:
            raise ValueError("lora_bias=True cannot be combined with use_dora=True (PEFT refuses "
                             "the pair too); set one of them to False")

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool,
                   use_rslora: bool = False, init_lora_weights: bool | str = True,
                   use_dora: bool = False, lora_bias: bool = False) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        self.check_variants(use_dora, lora_bias)
        check_init_lora_weights(init_lora_weights, "init_lora_weights")
        if is_data_init(init_lora_weights) and not self.supports_data_init:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported by "
                             f"{type(self).__name__}; PiSSA and OLoRA are implemented for Linear "
                             "and MergedLinear (dense or NF4 base)")
        if lora_bias and init_lora_weights is not True and init_lora_weights is not False:
            raise ValueError(f"lora_bias=True needs init_lora_weights True or False (PEFT's rule), "
                             f"got {init_lora_weights!r}")
        if lora_bias and merge_weights and getattr(self, "bias", None) is None:
            raise ValueError(f"lora_bias=True on a {type(self).__name__} without a bias cannot merge "
                             "(the lora bias is merged into the layer's bias; PEFT refuses that "
                             "merge too): pass merge_weights=False, or give the layer a bias")
        self.use_dora = use_dora
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
        tests and for studying the init). A ``lora_bias`` starts at 0, or for ``False`` as that
        ``nn.Linear``'s bias (uniform in +-1/sqrt(fan_in)), as PEFT leaves it. DoRA's magnitude is
        then read off the new adapter.
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
        lora_bias = self._parameters.get("lora_bias")
        if lora_bias is not None and init is False:
            bound = 1 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(self.lora_B)[0])
            nn.init.uniform_(lora_bias, -bound, bound)
        elif lora_bias is not None:
            nn.init.zeros_(lora_bias)
        if getattr(self, "use_dora", False) and not getattr(self, "_defer_magnitude", False):
            self.reset_dora_magnitude()

    # -- which parameters are the adapter's: the one answer, asked of the layer -------------------
    adapter_param_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_magnitude", "lora_bias")

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

    # -- DoRA: each layer gives its norm and the gain's layout; the rest is shared ---------------
    def _dora_norm(self) -> torch.Tensor:
        """``||W + s B A||`` per output row (the layer's meaning of a row, see :mod:`.dora`),
        detached, fp32 (fp64 for fp64 adapters), shaped as ``lora_magnitude``."""
        raise NotImplementedError

    def _dora_weight_gain(self, dtype: torch.dtype) -> torch.Tensor:
        """The gain ``m / ||W + s B A||`` in ``dtype``, shaped to broadcast against ``weight``
        (1 exactly for rows the layer does not adapt)."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_dora_magnitude(self) -> None:
        """``m = ||W + s B A||`` per adapted row (section 4.1 of the DoRA paper): the layer's
        function is then exactly the LoRA function it had before, since the gain is ``m / m``."""
        self.lora_magnitude.copy_(self._dora_norm())

    def dora_gain(self) -> torch.Tensor:
        """``m / ||W + s B A||`` per adapted row, ``lora_magnitude``'s shape; differentiable in ``m``."""
        return self.lora_magnitude / self._dora_norm().to(self.lora_magnitude.dtype)

    # -- PEFT's lora_bias ------------------------------------------------------------------------
    def lora_bias_delta(self) -> torch.Tensor | None:
        """``scaling * lora_bias`` over all ``out`` outputs ``(out,)``, fp32 (fp64 for fp64
        adapters), differentiable; None without a lora bias. What merge adds to ``bias``."""
        lora_bias = self._parameters.get("lora_bias")
        return None if lora_bias is None else self._acc(lora_bias) * self.scaling

    def _bias_with_lora(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias the forward's base product adds: ``bias + scaling * lora_bias`` while the adapter
        is active (summed in fp32, rounded once to ``dtype``), else ``bias``. Folding the lora bias
        in here keeps one product and one autograd node; its gradient flows through the sum."""
        delta = self.lora_bias_delta() if self.lora_active else None
        if delta is None:
            return self.bias
        total = delta if self.bias is None else self.bias.to(delta.dtype) + delta
        return total.to(dtype)

    # -- merge protocol --------------------------------------------------------------------------
    def dense_base_weight(self) -> torch.Tensor:
        """The frozen base weight as a dense tensor in ``weight``'s layout (a dense layer's own
        ``weight``; a quantized base dequantises)."""
        return self.weight

    @torch.no_grad()
    def merged_weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """What :meth:`merge` stores: ``W + delta_weight()`` formed in fp32, rounded once to ``W``'s dtype.

        ``merge_lora`` checks every layer's merged weight for NaN/Inf with this before any merge.
        ``delta``: ``delta_weight()`` when the caller has it already. With DoRA it is
        ``gain * (W + delta)`` per output row (rows the layer does not adapt keep ``W`` bit for bit).
        """
        base = self.dense_base_weight()
        delta = self.delta_weight() if delta is None else delta
        merged = base.to(delta.dtype) + delta
        if getattr(self, "use_dora", False):
            merged = merged * self._dora_weight_gain(delta.dtype)
        return merged.to(base.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the update into ``weight`` (and a lora bias into ``bias``). Idempotent.

        The sum is formed in fp32 and rounded once to the weight's dtype (:meth:`merged_weight`).

        Raises:
            ValueError: with ``safe_merge=True``, if the merged weight or bias would hold NaN or
                Inf; a lora bias on a layer without a bias (nothing to merge it into, as in PEFT).
                The layer is then left untouched.
        """
        if self.merged or self.r == 0:
            return
        delta = self.delta_weight()  # formed once, for the sum and for the round-trip check
        merged = self.merged_weight(delta)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"safe_merge refused {type(self).__name__}: the merged weight would "
                             "contain NaN or Inf; the weight is unchanged")
        bias_delta, merged_bias = self.lora_bias_delta(), None
        if bias_delta is not None:
            if self.bias is None:
                raise ValueError(f"{type(self).__name__} has lora_bias but no bias to merge it "
                                 "into (PEFT cannot merge it either); keep the layer unmerged")
            merged_bias = (self.bias.to(bias_delta.dtype) + bias_delta).to(self.bias.dtype)
            if safe_merge and not torch.isfinite(merged_bias).all():
                raise ValueError(f"safe_merge refused {type(self).__name__}: the merged bias "
                                 "would contain NaN or Inf; the layer is unchanged")
        if getattr(self, "use_dora", False):  # the gain this merge applies, for the exact unmerge
            self._dora_merged_gain = self._dora_weight_gain(delta.dtype)
        self._store_merged(merged, delta)
        if merged_bias is not None:  # the bias is small: keep the original bits for unmerge
            self._unmerge_bias = self.bias.detach().clone()
            self.bias.copy_(merged_bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight`` (and ``bias``) again, restoring the original bits.
        Idempotent."""
        if not self.merged:
            return
        self._restore_unmerged()
        self._dora_merged_gain = None
        original_bias = self.__dict__.pop("_unmerge_bias", None)
        if original_bias is not None:
            self.bias.copy_(original_bias)
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
        """The inverse of :meth:`merged_weight`, in ``delta``'s dtype: ``merged - delta`` (with DoRA,
        divided by the gain the merge applied first)."""
        if getattr(self, "use_dora", False):
            return merged.to(delta.dtype) / self._dora_merged_gain - delta
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
        if self.r == 0:
            return base
        variants = "".join(f", {name}=True" for name, on in (
            ("use_dora", getattr(self, "use_dora", False)),
            ("lora_bias", self._parameters.get("lora_bias") is not None)) if on)
        return f"{base}, r={self.r}, lora_alpha={self.lora_alpha}{variants}"


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Qualified name -> LoRA layer, for every layer of ``model`` holding an adapter (``r > 0``).

    The single answer to "which layers carry an adapter"; ``inject.lora_modules`` is this.
    """
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoRALayer) and m.r > 0 and m.adapter_params()}
