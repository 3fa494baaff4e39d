"""``Linear`` and ``MergedLinear``: LoRA on linear layers and on single slices of fused projections.

Both are ``nn.Linear`` subclasses with loralib's names, arguments and ``weight``/``bias`` keys, and
both run the one LoRA computation (:func:`~lora_phi3.layers.lora_function.apply_lora_linear`) over
their slices: ``Linear`` is the one-slice case. How the frozen base weight is stored is a property
of the base, not of the class:

- a dense ``weight`` Parameter (what the constructors, ``from_linear`` and loralib build);
- or ``weight`` is None and ``quantized_weight`` is a module holding the frozen
  ``(out_features, in_features)`` weight in another format (e.g.
  :class:`~lora_phi3.quant.NF4Weight`), with ``matmul(x, bias)`` and ``dequantize()``. Merging
  then stores a dense merged ``weight`` beside it, and unmerging drops it again.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from .base import LoRALayer, is_data_init, new_lora_param
from .named import mixed_forward
from .data_init import olora_factors, parse_init_lora_weights, pissa_factors, to_original_base
from .dora import cached, dora_norm, dora_rescale, version_key, weight_row_sq
from .lora_function import apply_lora_linear, base_linear
from .slices import LoraSlice, iter_slices

__all__ = ["Linear", "MergedLinear"]


class _LinearLoRA(LoRALayer, nn.Linear):
    """What ``Linear`` and ``MergedLinear`` share: the base, construction, the forward and the delta."""

    fan_in_fan_out: bool
    lora_slices: tuple[tuple[int, int], ...]  # (start, size) of each adapted output slice
    supports_dora = True
    supports_lora_bias = True
    supports_data_init = True

    @property
    def quantized_weight(self) -> nn.Module | None:
        """The module holding the frozen base when it is not a dense ``weight`` (else None)."""
        return self._modules.get("quantized_weight")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def _wrap(cls, linear: nn.Module, fan_in_fan_out: bool):
        """A bare instance sharing ``linear``'s weight and bias; the caller runs ``_setup``."""
        weight = linear.weight
        if weight.dim() != 2:
            raise ValueError(f"from_linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        shape = weight.shape[::-1] if fan_in_fan_out else weight.shape  # (out, in)
        self = cls._bare(*shape, getattr(linear, "bias", None))
        self.weight = weight
        return self

    @classmethod
    def with_base(cls, base: nn.Module, bias: torch.Tensor | None, **lora_kwargs: Any):
        """A layer over a frozen base stored by ``base`` (e.g. an NF4 weight), sharing ``bias``.

        Args:
            base: a module holding the frozen ``(out_features, in_features)`` weight, with
                ``shape``, ``compute_dtype``, ``device``, ``matmul(x, bias) -> (..., out)``,
                ``input_grad(dy) -> dy @ W`` (the fused backward), ``dequantize() -> (out, in)``
                and ``load_dense(weight)``; :class:`~lora_phi3.quant.NF4Weight` is one.
            bias: ``(out_features,)`` or None.
            **lora_kwargs: the class's ``from_linear`` LoRA arguments (``r``, ``lora_alpha``, ...).
        """
        self = cls._bare(*base.shape, bias)
        self.register_parameter("weight", None)  # the base lives in quantized_weight
        self.quantized_weight = base
        self._setup(**lora_kwargs)
        if self.r > 0:
            self.reset_lora_parameters()
        return self

    @classmethod
    def _bare(cls, out_features: int, in_features: int, bias: torch.Tensor | None):
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(out_features), int(in_features)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)
        return self

    def _init_lora_params(self, r: int, n_slices: int, b_rows: int,
                          lora_dtype: torch.dtype | None, lora_bias: bool = False) -> None:
        if self.weight is not None:
            dtype, device = self.weight.dtype, self.weight.device
            self.weight.requires_grad = False
        else:  # the adapter follows a quantized base's compute dtype, as it would a dense weight's
            dtype, device = self.quantized_weight.compute_dtype, self.quantized_weight.device
        self.lora_A = new_lora_param((r * n_slices, self.in_features), lora_dtype or dtype, device)
        self.lora_B = new_lora_param((b_rows, r), lora_dtype or dtype, device)
        if self.use_dora:  # DoRA's magnitude: one value per adapted output row, in B's row order
            self.lora_magnitude = new_lora_param((b_rows,), lora_dtype or dtype, device)
        if lora_bias:  # PEFT's bias on B: one value per adapted output row, in B's row order
            self.lora_bias = new_lora_param((b_rows,), lora_dtype or dtype, device)

    def _finish_init(self, fan_in_fan_out: bool) -> None:
        # loralib's order: reset everything once more (base weight, bias, then A), then transpose,
        # so the same seed gives loralib's initial weights (the fan-in is read in (out, in) layout).
        # DoRA's magnitude is read off the final weight, so it waits for the transpose.
        self._defer_magnitude = True
        self.reset_parameters()
        if fan_in_fan_out:  # stored (in, out), as GPT-2's Conv1D and loralib keep it
            self.weight.data = self.weight.data.transpose(0, 1).contiguous()
        del self._defer_magnitude
        if self.r > 0 and is_data_init(self.init_lora_weights):
            self._data_init()
        if self.use_dora and self.r > 0:
            self.reset_dora_magnitude()

    # -- the base ----------------------------------------------------------------------------------
    def _frozen_base(self):
        """What the forward multiplies by: the dense ``(out, in)`` weight (a view for
        ``fan_in_fan_out``; while a quantized layer is merged, its dense merged weight), else the
        quantized base."""
        weight = self.weight
        if weight is None:
            return self.quantized_weight
        return weight.T if self.fan_in_fan_out else weight

    def dense_base_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        dense = self.quantized_weight.dequantize()  # (out, in)
        return dense.T if self.fan_in_fan_out else dense

    @torch.no_grad()
    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Replace the frozen base weight with ``weight`` (the module's layout), quantising it
        for a quantized base.

        Raises:
            ValueError: a shape other than the layer's, or a merged layer (its merged weight would
                go stale).
        """
        if self.merged:
            raise ValueError(f"{type(self).__name__}.set_base_weight on a merged layer; unmerge() first")
        want = (self.in_features, self.out_features) if self.fan_in_fan_out \
            else (self.out_features, self.in_features)
        if tuple(weight.shape) != want:
            raise ValueError(f"weight must have shape {want} for this layer, got {tuple(weight.shape)}")
        if self.weight is not None:
            self.weight.copy_(weight)
        else:
            self.quantized_weight.load_dense(weight.T if self.fan_in_fan_out else weight)

    def _store_merged(self, merged: torch.Tensor, delta: torch.Tensor) -> None:
        if self.weight is not None:
            return super()._store_merged(merged, delta)
        # A quantized base is never rounded into (that would round the update away): the dense
        # merged weight is kept beside it, and unmerge drops it again.
        self.weight = nn.Parameter(merged, requires_grad=False)

    def _restore_unmerged(self) -> None:
        if self.quantized_weight is None:
            super()._restore_unmerged()
        else:
            self.weight = None

    # -- PiSSA / OLoRA ------------------------------------------------------------------------------
    def reset_lora_parameters(self) -> None:
        # In the constructor (_defer_magnitude) the base is not final yet: the data-driven init and
        # DoRA's magnitude wait for _finish_init.
        if not is_data_init(getattr(self, "init_lora_weights", True)):
            super().reset_lora_parameters()  # A, B, lora_bias, and DoRA's magnitude
        elif not getattr(self, "_defer_magnitude", False):
            self._data_init()
            if getattr(self, "use_dora", False):
                self.reset_dora_magnitude()

    @torch.no_grad()
    def _data_init(self) -> None:
        """PiSSA / OLoRA: ``A`` and ``B`` from the base weight of each adapted slice, and the base
        replaced by the residual, so ``W_res + s B A`` is the original weight (PEFT's arithmetic,
        :mod:`.data_init`). The initial factors are kept (``lora_A_init``/``lora_B_init``, not in the
        state dict) for the conversion back to the original base when saving."""
        kind, niter = parse_init_lora_weights(self.init_lora_weights)
        weight = self.dense_base_weight()
        if weight.is_meta:  # a weightless preview: shapes only
            return
        dense = (weight.T if self.fan_in_fan_out else weight).clone()  # (out, in), becomes W_res
        for s in self.iter_slices():
            if kind == "pissa":
                A, B, residual = pissa_factors(dense[s.out_rows], self.r, self.scaling, niter)
            else:
                A, B, residual = olora_factors(dense[s.out_rows], self.r, self.scaling)
            # PEFT moves the fp32 factors to the base's dtype and back to the adapter's.
            self.lora_A[s.a_rows] = A.to(weight.dtype).to(self.lora_A.dtype)
            self.lora_B[s.b_rows] = B.to(weight.dtype).to(self.lora_B.dtype)
            dense[s.out_rows] = residual
        self.set_base_weight(dense.T if self.fan_in_fan_out else dense)
        self.register_buffer("lora_A_init", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("lora_B_init", self.lora_B.detach().clone(), persistent=False)

    @torch.no_grad()
    def adopt_data_init(self, dense: "_LinearLoRA") -> None:
        """Take the PiSSA/OLoRA factors of ``dense``, a layer of the same shapes built over the
        full-precision weight (whose base is now the residual this layer's base was built from).
        QLoRA + PiSSA: factorise before quantising, so only the residual is rounded to 4 bits."""
        self.init_lora_weights = dense.init_lora_weights
        self.lora_A.copy_(dense.lora_A)
        self.lora_B.copy_(dense.lora_B)
        for name in ("lora_A_init", "lora_B_init"):
            self.register_buffer(name, dense._buffers[name].to(self.lora_A.dtype), persistent=False)
        if getattr(self, "use_dora", False):
            self.reset_dora_magnitude()

    def original_base_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(A, B, r, lora_alpha)`` that give this layer's function on the ORIGINAL base weight.

        For plain initialisations that is the layer's own adapter. After PiSSA/OLoRA (whose base is
        a residual) it is the rank-``2r`` adapter ``[A; A0]``, ``[B, -B0]`` per slice, with
        ``lora_alpha`` raised so the scaling is unchanged (PEFT's conversion, done here
        automatically).
        """
        A, B = self.lora_A.detach(), self.lora_B.detach()
        if not is_data_init(getattr(self, "init_lora_weights", True)):
            return A, B, self.r, self.lora_alpha
        A0, B0 = self._buffers["lora_A_init"], self._buffers["lora_B_init"]
        As, Bs, alpha2 = [], [], self.lora_alpha
        for s in self.iter_slices():
            A2, B2, _, alpha2 = to_original_base(A[s.a_rows], B[s.b_rows], A0[s.a_rows],
                                                 B0[s.b_rows], self.r, self.lora_alpha,
                                                 self.use_rslora)
            As.append(A2)
            Bs.append(B2)
        return torch.cat(As), torch.cat(Bs), 2 * self.r, alpha2

    # -- DoRA --------------------------------------------------------------------------------------
    def _base_row_sq(self) -> torch.Tensor:
        """``||W_i||^2`` of the frozen base per output row, fp32 ``(out,)``, cached until the base
        changes (a new tensor, an in-place write, or new quantized storage)."""
        base = self._frozen_base()
        storage = base if isinstance(base, torch.Tensor) else base._field("codes")
        return cached(self, "_row_sq_cache", version_key(storage), lambda: weight_row_sq(
            base if isinstance(base, torch.Tensor) else base.dequantize()))

    def _dora_norm(self) -> torch.Tensor:
        """``||W_i + s B_i A||`` per adapted row, detached, fp32 (see :func:`~.dora.dora_norm`).

        Cached until ``A``, ``B``, the base or the scaling change (an optimizer step bumps the
        tensors' versions), so generation with an unmerged DoRA layer computes it once."""
        A, B = self.lora_A, self.lora_B
        row_sq = self._base_row_sq()
        key = (version_key(A), version_key(B), id(row_sq), self.scaling, self.lora_slices)
        return cached(self, "_dora_norm_cache", key, lambda: dora_norm(
            self._frozen_base(), row_sq, A, B, self.scaling, self.lora_slices))

    def _adapted_rows(self, device: torch.device) -> torch.Tensor:
        """The output rows the slices adapt, in ``lora_B``'s row order: ``(sum of slice sizes,)``."""
        return torch.cat([torch.arange(start, start + size, device=device)
                          for start, size in self.lora_slices])

    def _adapts_all_rows(self) -> bool:
        return len(self.lora_slices) == 1 and self.lora_slices[0][1] == self.out_features

    @torch.no_grad()
    def _dora_weight_gain(self, dtype: torch.dtype) -> torch.Tensor:
        """The gain of every output row, 1 exactly for rows no slice adapts, as ``(out, 1)``
        (``(1, out)`` for ``fan_in_fan_out``)."""
        gain = self.dora_gain().to(dtype)
        if not self._adapts_all_rows():
            gain = gain.new_ones(self.out_features).index_copy_(
                0, self._adapted_rows(gain.device), gain)
        return gain[None, :] if self.fan_in_fan_out else gain[:, None]

    # -- lora_bias ---------------------------------------------------------------------------------
    def lora_bias_delta(self) -> torch.Tensor | None:
        """``scaling * lora_bias`` on the adapted rows, 0 on the others: ``(out,)``, fp32."""
        delta = super().lora_bias_delta()
        if delta is None or self._adapts_all_rows():
            return delta
        return delta.new_zeros(self.out_features).index_add(0, self._adapted_rows(delta.device),
                                                            delta)

    # -- LoRA ----------------------------------------------------------------------------------
    def iter_slices(self) -> Iterator[LoraSlice]:
        """The :class:`~lora_phi3.layers.slices.LoraSlice` of each adapted output slice."""
        return iter_slices(self.lora_slices, self.r)

    def delta_weight(self) -> torch.Tensor:
        A, B = self._acc(self.lora_A), self._acc(self.lora_B)
        if self._adapts_all_rows():
            delta = B @ A * self.scaling  # (out, in)
        else:
            delta = A.new_zeros((self.out_features, self.in_features))
            for s in self.iter_slices():
                delta[s.out_rows] = B[s.b_rows] @ A[s.a_rows] * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features) -> (..., out_features)``; the adapter never forms the dense delta."""
        if self.mixed_groups is not None:  # rows with different adapters (lora_phi3.mixed_batch)
            return mixed_forward(self, x, self.forward)
        base = self._frozen_base()
        if not self.lora_active:
            return base_linear(x, base, self.bias)
        # PEFT's lora_bias is folded into the base product's bias: scaling * lora_bias is the
        # adapter's only x-independent term, so y = x W^T + (b + s lora_bias) + s h B^T.
        bias = self._bias_with_lora(self.weight.dtype if self.weight is not None
                                    else self.quantized_weight.compute_dtype)
        out = apply_lora_linear(x, base, bias, self.lora_A, self.lora_B, self.scaling,
                                self.lora_dropout, self.lora_slices)
        if getattr(self, "use_dora", False):
            return dora_rescale(out, self.dora_gain(), self.bias, self.lora_slices)
        return out


class Linear(_LinearLoRA):
    """``nn.Linear`` with a LoRA update: ``y = x @ W.T + b + scaling * dropout(x) @ A.T @ B.T``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: rank; 0 (the default, as in loralib) adds no adapter.
        lora_alpha: scaling numerator; ``scaling = lora_alpha / r``.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)`` (rsLoRA).
        lora_dropout: dropout probability on the adapter's input.
        fan_in_fan_out: True if ``weight`` is stored as ``(in_features, out_features)`` (GPT-2 Conv1D).
        merge_weights: merge on ``eval()`` and unmerge on ``train()``.
        lora_dtype: dtype of ``lora_A``/``lora_B`` (default: the weight's dtype, as in loralib).
        use_dora: DoRA (see :mod:`~lora_phi3.layers.dora`); adds ``lora_magnitude`` ``(out_features,)``.
        lora_bias: PEFT's bias on ``B``: adds ``lora_bias`` ``(out_features,)``, and the adapter's
            output becomes ``scaling * (dropout(x) @ A.T @ B.T + lora_bias)``; merging adds
            ``scaling * lora_bias`` to ``bias``. Not with ``use_dora`` (PEFT refuses the pair).
        **kwargs: passed to ``nn.Linear`` (``bias``, ``device``, ``dtype``).

    Shapes: ``lora_A`` is ``(r, in_features)`` (kaiming-uniform), ``lora_B`` is ``(out_features, r)``
    (zeros); input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, use_dora: bool = False,
                 lora_bias: bool = False, **kwargs: Any) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._setup(r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights, use_dora, lora_bias)
        self._finish_init(fan_in_fan_out)

    def _setup(self, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
               fan_in_fan_out: bool = False, merge_weights: bool = True,
               lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
               init_lora_weights: bool | str = True, use_dora: bool = False,
               lora_bias: bool = False) -> None:
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora,
                        init_lora_weights, use_dora, lora_bias)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_slices = ((0, self.out_features),)
        if r > 0:
            self._init_lora_params(r, 1, self.out_features, lora_dtype, lora_bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    fan_in_fan_out: bool = False, merge_weights: bool = True,
                    lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
                    init_lora_weights: bool | str = True, use_dora: bool = False,
                    lora_bias: bool = False) -> "Linear":
        """Wrap an existing linear-like module, sharing (not copying) its ``weight`` and ``bias``.

        ``linear`` may be an ``nn.Linear`` or anything with a 2-D ``weight`` and optional ``bias``,
        such as transformers' GPT-2 ``Conv1D`` (pass ``fan_in_fan_out=True``).
        """
        self = cls._wrap(linear, fan_in_fan_out)
        self._setup(r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights, lora_dtype, use_rslora,
                    init_lora_weights, use_dora, lora_bias)
        if r > 0:
            self.reset_lora_parameters()
        return self


class MergedLinear(_LinearLoRA):
    """A fused projection (e.g. Phi-3's ``qkv_proj``) with LoRA on a chosen subset of its slices.

    The output features are split into ``len(enable_lora)`` slices: equal ones as in loralib, or
    the sizes given by ``split_sizes`` (e.g. ``[q, k, v]`` for grouped-query attention, which
    loralib cannot do). Each enabled slice ``i`` gets its own ``A_i`` ``(r, in)`` and ``B_i``
    ``(size_i, r)``; they are stored stacked as in loralib (see :mod:`~lora_phi3.layers.slices`):

    - ``lora_A``: ``(r * k, in_features)`` for ``k`` enabled slices;
    - ``lora_B``: ``(sum of enabled slice sizes, r)``; with ``lora_bias=True``, ``lora_bias`` has
      that many rows too (the adapted rows only; the others get no lora bias).

    The forward runs one matmul with the stacked ``A`` and then each slice's ``B`` adds into its
    own output slice; the dense ``(out, in)`` delta is never built.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True,
                 split_sizes: Sequence[int] | None = None, lora_dtype: torch.dtype | None = None,
                 use_rslora: bool = False, init_lora_weights: bool | str = True,
                 use_dora: bool = False, lora_bias: bool = False, **kwargs: Any) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._setup(r, lora_alpha, lora_dropout, enable_lora, fan_in_fan_out, merge_weights,
                    split_sizes, lora_dtype, use_rslora,
                    init_lora_weights, use_dora, lora_bias)
        self._finish_init(fan_in_fan_out)

    def _setup(self, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
               enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
               merge_weights: bool = True, split_sizes: Sequence[int] | None = None,
               lora_dtype: torch.dtype | None = None, use_rslora: bool = False,
               init_lora_weights: bool | str = True, use_dora: bool = False,
               lora_bias: bool = False) -> None:
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, use_rslora,
                        init_lora_weights, use_dora, lora_bias)
        self.fan_in_fan_out = fan_in_fan_out
        enable_lora = [bool(e) for e in enable_lora]
        if not enable_lora:
            raise ValueError("enable_lora must name at least one slice, got []")
        if split_sizes is None:
            if self.out_features % len(enable_lora) != 0:
                raise ValueError(f"enable_lora has {len(enable_lora)} slices, which does not divide "
                                 f"out_features={self.out_features}; pass split_sizes")
            split_sizes = [self.out_features // len(enable_lora)] * len(enable_lora)
        split_sizes = [int(s) for s in split_sizes]
        if len(split_sizes) != len(enable_lora):
            raise ValueError(f"split_sizes={split_sizes} has {len(split_sizes)} entries but "
                             f"enable_lora={enable_lora} has {len(enable_lora)}")
        if sum(split_sizes) != self.out_features or any(s <= 0 for s in split_sizes):
            raise ValueError(f"split_sizes={split_sizes} must be positive and sum to "
                             f"out_features={self.out_features}")
        self.enable_lora = enable_lora
        self.split_sizes = split_sizes
        offsets = [sum(split_sizes[:i]) for i in range(len(split_sizes))]
        self.lora_slices = tuple((offsets[i], split_sizes[i]) for i, e in enumerate(enable_lora) if e)
        if r > 0 and self.lora_slices:
            self._init_lora_params(r, len(self.lora_slices), sum(s for _, s in self.lora_slices),
                                   lora_dtype, lora_bias)
        elif r > 0:
            self.r = 0  # no slice enabled: behaves as the plain layer, like loralib
            self.scaling = 0.0

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0,
                    enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                    merge_weights: bool = True, split_sizes: Sequence[int] | None = None,
                    lora_dtype: torch.dtype | None = None,
                    use_rslora: bool = False, init_lora_weights: bool | str = True,
                    use_dora: bool = False, lora_bias: bool = False) -> "MergedLinear":
        """Wrap an existing fused linear module, sharing (not copying) its ``weight`` and ``bias``."""
        self = cls._wrap(linear, fan_in_fan_out)
        self._setup(r, lora_alpha, lora_dropout, enable_lora, fan_in_fan_out, merge_weights,
                    split_sizes, lora_dtype, use_rslora,
                    init_lora_weights, use_dora, lora_bias)
        if self.r > 0:
            self.reset_lora_parameters()
        return self
