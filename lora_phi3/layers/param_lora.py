"""LoRA on a parameter rather than a module: PEFT's ``target_parameters``, for MoE expert weights.

Mixture-of-experts models in transformers 5 hold their experts as 3-D parameters of one module,
not as one ``nn.Linear`` per expert: Phi-3.5-MoE's ``mlp.experts`` has ``gate_up_proj``
``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``, and its forward reads them directly. A module-level
LoRA layer cannot reach them, so an adapter is put on the parameter itself:

- :class:`ParamLoRA` is the adapter of one parameter, a :class:`~.base.LoRALayer` like every other
  layer (same state, merge protocol, named adapters, adapter files). For a 2-D parameter ``W``
  ``(out, in)`` the update is ``s * B @ A`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``; for a 3-D
  parameter ``(E, out, in)`` each expert ``e`` gets its own pair, ``A[:, e]`` ``(r, in)`` and
  ``B[:, :, e]`` ``(out, r)``, held as ``lora_A`` ``(r, E, in)`` and ``lora_B`` ``(out, r, E)``.
  The rank comes first in ``A`` and second in ``B`` as in every other layer, so rank padding (PEFT
  export, hot swap) is the same code, and PEFT's 2-D tensors are a reshape (:meth:`peft_factors`).
- The module that owns the parameters is replaced by a *host* that keeps the module's parameters,
  buffers and children under their own names (a base checkpoint loads with only adapter keys
  missing) and holds the adapters as ``param_lora.<parameter name>``.
  :class:`~.experts.LoRAExperts` hosts transformers' experts module: it runs the experts loop itself
  and adds ``s * (x @ A_e^T) @ B_e^T`` to each expert's tokens, so no dense per-expert delta is
  formed.
  :class:`LoRAParameters` hosts any other module (a plain 2-D weight): since only the module knows
  how it uses its parameter, it runs the module's own forward with ``W + s * B @ A`` in its place,
  which is PEFT's mechanism and the one place here where a forward forms the dense delta.

The semantics are PEFT 0.21's ``ParamWrapper`` exactly (``W[e] += s * B_e @ A_e``, ``s = lora_alpha /
r``), which is what makes PEFT's adapters import and ours export; PEFT refuses dropout, DoRA,
``lora_bias`` and mixed batches on parameters, and so does this.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .base import LoRALayer, new_lora_param

__all__ = ["ParamLoRA", "LoRAParameters", "PARAM_LORA", "param_lora_name", "split_param_lora_name",
           "from_peft_factors"]

#: The attribute of a host holding its adapters: ``<host path>.param_lora.<parameter name>``.
PARAM_LORA = "param_lora"


def param_lora_name(host: str, parameter_name: str) -> str:
    """The path of the adapter on ``host``'s parameter ``parameter_name``."""
    return f"{host}.{PARAM_LORA}.{parameter_name}" if host else f"{PARAM_LORA}.{parameter_name}"


def split_param_lora_name(name: str) -> tuple[str, str] | None:
    """``(host path, parameter name)`` for an adapter path made by :func:`param_lora_name`, else
    None."""
    host, sep, parameter = name.rpartition(f".{PARAM_LORA}.")
    if sep and host and parameter and "." not in parameter:
        return host, parameter
    return None


def from_peft_factors(A: torch.Tensor, B: torch.Tensor, shape: tuple[int, ...] | torch.Size
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``ParamWrapper`` pair (any rank ``R``) for a parameter of ``shape`` in
    :class:`ParamLoRA`'s layout: the inverse of :meth:`ParamLoRA.peft_factors`.

    Args:
        A: PEFT's ``lora_A`` ``(E * R, in)`` (``(R, in)`` for a 2-D parameter).
        B: PEFT's ``lora_B`` ``(out, R * E)`` (``(out, R)``).
        shape: the parameter's shape, ``(out, in)`` or ``(E, out, in)``.

    Returns:
        ``(A, B)``: ``(R, E, in)`` and ``(out, R, E)``, or unchanged for a 2-D parameter.

    Raises:
        ValueError: the pair does not fit ``shape``.
    """
    E = shape[0] if len(shape) == 3 else 1
    out, in_features = shape[-2:]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape[0] != out \
            or A.shape[0] != B.shape[1] or A.shape[0] % E:
        raise ValueError(f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit a parameter "
                         f"of shape {tuple(shape)}: PEFT's pair for it is lora_A (rank * {E}, "
                         f"{in_features}) and lora_B ({out}, rank * {E})")
    if len(shape) == 2:
        return A, B
    rank = A.shape[0] // E
    return A.reshape(E, rank, in_features).transpose(0, 1), B.reshape(out, rank, E)


class ParamLoRA(LoRALayer):
    """The LoRA adapter of one 2-D ``(out, in)`` or 3-D ``(E, out, in)`` parameter of a host module.

    It holds no weight of its own: ``weight`` is the host's parameter, which merge updates in place.

    Args:
        host: the module holding the parameter (a :class:`LoRAParameters`).
        parameter_name: the parameter's attribute name on ``host``.
        r, lora_alpha, use_rslora, init_lora_weights: as for every layer (no data-driven init).
        merge_weights: merge on ``eval()``, unmerge on ``train()`` (loralib's switch).
        lora_dtype: the adapters' dtype (default: the parameter's).

    Raises:
        ValueError: the parameter is missing, not floating point, or not 2-D or 3-D; a bad ``r``,
            ``lora_alpha`` or ``init_lora_weights``.
    """

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, host: nn.Module, parameter_name: str, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = False, lora_dtype: torch.dtype | None = None,
                 use_rslora: bool = False, init_lora_weights: bool | str = True) -> None:
        super().__init__()
        param = host._parameters.get(parameter_name)
        if param is None or not param.is_floating_point() or param.dim() not in (2, 3):
            what = "missing" if param is None else f"{param.dtype} of shape {tuple(param.shape)}"
            owner = type(host.__dict__.get("_base_module", host)).__name__
            raise ValueError(f"ParamLoRA needs a floating-point 2-D (out, in) or 3-D (experts, out, "
                             f"in) parameter; {owner}.{parameter_name} is {what}")
        self.__dict__["_host"] = host  # not a child: the host owns this layer
        self.parameter_name = parameter_name
        self.num_experts: int | None = param.shape[0] if param.dim() == 3 else None
        self.out_features, self.in_features = param.shape[-2:]
        self._init_lora(r, lora_alpha, 0.0, merge_weights, use_rslora, init_lora_weights)
        if r > 0:
            experts = () if self.num_experts is None else (self.num_experts,)
            dtype = lora_dtype or param.dtype
            self.lora_A = new_lora_param((r, *experts, self.in_features), dtype, param.device)
            self.lora_B = new_lora_param((self.out_features, r, *experts), dtype, param.device)
            self.reset_lora_parameters()

    @property
    def weight(self) -> nn.Parameter:
        """The adapted parameter, read from the host (so a host moved or reloaded stays in step)."""
        return getattr(self.__dict__["_host"], self.parameter_name)

    @property
    def host(self) -> nn.Module:
        """The module holding :attr:`weight`."""
        return self.__dict__["_host"]

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation of its ``nn.Linear(in, r * E)`` / ``nn.Linear(r * E, out)`` pair.

        ``True``: every expert's ``A`` kaiming-uniform over its ``in`` inputs (bound
        ``1 / sqrt(in)``), ``B = 0``; ``"gaussian"``: ``A ~ N(0, 1/r^2)``, ``B = 0``; ``False``: ``B``
        uniform in ``+-1 / sqrt(r * E)`` too, as PEFT leaves it, so the adapter acts from the start.
        """
        init = self.init_lora_weights
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) of (r, in)
            nn.init.uniform_(self.lora_A, -bound, bound)
        if init is False:
            bound = 1 / math.sqrt(self.r * (self.num_experts or 1))
            nn.init.uniform_(self.lora_B, -bound, bound)
        else:
            nn.init.zeros_(self.lora_B)

    # -- the maths -------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` ``(out, in)``, or per expert ``s * B_e @ A_e`` ``(E, out, in)``; fp32
        (fp64 for fp64 adapters), differentiable. For merge and tests; the experts forward never
        forms it."""
        A, B = self._acc(self.lora_A), self._acc(self.lora_B)
        if self.num_experts is None:
            return (B @ A) * self.scaling
        return torch.einsum("ore,rei->eoi", B, A) * self.scaling

    def lora_update(self, x: torch.Tensor, expert: int | torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's output ``s * (x @ A_e^T) @ B_e^T`` for inputs ``x`` ``(n, in)`` of expert
        ``expert`` (None for a 2-D parameter): ``(n, out)`` in ``x``'s dtype, in rank-r space."""
        A, B = self.lora_A, self.lora_B
        if expert is not None:
            A, B = A[:, expert], B[:, :, expert]  # (r, in), (out, r)
        return (F.linear(F.linear(x.to(A.dtype), A), B) * self.scaling).to(x.dtype)

    def adapted_weight(self) -> torch.Tensor:
        """``W + delta_weight()`` in ``W``'s dtype, differentiable in the adapter (the dense
        substitute :class:`LoRAParameters` runs its module with)."""
        weight, delta = self.weight, self.delta_weight()
        return (weight.to(delta.dtype) + delta).to(weight.dtype)

    def peft_factors(self, A: torch.Tensor | None = None, B: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` (default: this layer's, detached) in PEFT's layout: ``lora_A`` ``(E * r, in)``
        with expert ``e``'s rows at ``[e * r, (e + 1) * r)``, ``lora_B`` ``(out, r * E)`` with
        expert ``e``'s column ``k`` at ``k * E + e``; 2-D parameters are unchanged. The inverse is
        :func:`from_peft_factors`."""
        A = self.lora_A.detach() if A is None else A
        B = self.lora_B.detach() if B is None else B
        if self.num_experts is None:
            return A, B
        return A.transpose(0, 1).reshape(-1, A.shape[-1]), B.reshape(B.shape[0], -1)

    def extra_repr(self) -> str:
        experts = "" if self.num_experts is None else f"experts={self.num_experts}, "
        return (f"{self.parameter_name!r}, {experts}in_features={self.in_features}, "
                f"out_features={self.out_features}, r={self.r}, lora_alpha={self.lora_alpha}")


class LoRAParameters(nn.Module):
    """Stands for a module some of whose parameters carry a :class:`ParamLoRA` adapter.

    It keeps the module's parameters, buffers and children under their own names (the same
    objects, so the state dict has the module's keys plus ``param_lora.*``), holds the adapters in
    the order the module registers the parameters (PEFT's nesting order), and computes the module's
    own forward with ``W + s * B @ A`` in place of each adapted ``W``. Reads of plain attributes the
    host lacks (``num_experts``, ``config``, ...) fall through to the module.

    Args:
        module: the module to stand for (kept, without its parameters, for :meth:`to_base_module`).
        parameter_names: which of its direct parameters to adapt.
        **lora_kwargs: :class:`ParamLoRA`'s arguments.

    Raises:
        ValueError: ``module`` is a LoRA layer already; a name is no direct parameter of it or is
            given twice; a 3-D parameter stored ``(E, in, out)`` (``is_transposed``); and
            :class:`ParamLoRA`'s refusals.
    """

    def __init__(self, module: nn.Module, parameter_names: Iterable[str], **lora_kwargs: Any) -> None:
        super().__init__()
        names = list(parameter_names)
        if isinstance(module, (LoRALayer, LoRAParameters)):
            raise ValueError(f"{type(module).__name__} already holds adapters; target_parameters "
                             "cannot also adapt it")
        own = [n for n, p in module._parameters.items() if p is not None]
        unknown = [n for n in names if n not in own]
        if unknown or len(set(names)) != len(names) or not names:
            raise ValueError(f"parameter_names must name distinct direct parameters of "
                             f"{type(module).__name__} (it has {own}), got {names}")
        if getattr(module, "is_transposed", False) and any(module._parameters[n].dim() == 3
                                                           for n in names):
            raise ValueError(f"{type(module).__name__} stores its experts transposed (experts, in, "
                             "out); LoRA on parameters supports (experts, out, in) only")
        self.__dict__["_base_module"] = module
        self._parameters.update(module._parameters)
        self._buffers.update(module._buffers)
        self._non_persistent_buffers_set |= module._non_persistent_buffers_set
        self._modules.update(module._modules)
        self.param_lora = nn.ModuleDict()
        for name in own:  # the module's registration order: PEFT nests its wrappers in it
            if name in names:
                self.param_lora[name] = ParamLoRA(self, name, **lora_kwargs)
        for key in module._parameters:  # they live here now; to_base_module puts them back
            module._parameters[key] = None
        self.train(module.training)

    @property
    def base_module(self) -> nn.Module:
        """The module this host stands for (without its parameters while hosted)."""
        return self.__dict__["_base_module"]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base_module")
            if base is not None and not name.startswith("_") and name in base.__dict__:
                return base.__dict__[name]
            raise

    def train(self, mode: bool = True) -> "LoRAParameters":
        super().train(mode)
        self.base_module.training = mode  # its forward runs outside this tree; children are shared
        return self

    def active_adapters(self) -> dict[str, ParamLoRA]:
        """Parameter name -> its adapter, for the adapters the forward must add.

        Raises:
            ValueError: inside ``mixed_batch`` (rows of a batch cannot take different adapters on
                parameters; PEFT refuses it too).
        """
        if any(lora.mixed_groups is not None for lora in self.param_lora.values()):
            raise ValueError(f"mixed_batch is not supported by adapters on parameters "
                             f"({type(self.base_module).__name__}: {list(self.param_lora)}); run "
                             "one adapter per batch (set_adapter)")
        return {name: lora for name, lora in self.param_lora.items() if lora.lora_active}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tensors = {k: t for k, t in (*self._parameters.items(), *self._buffers.items())
                   if t is not None}
        for name, lora in self.active_adapters().items():
            tensors[name] = lora.adapted_weight()
        return functional_call(self.base_module, tensors, args, kwargs, tie_weights=False)

    def to_base_module(self) -> nn.Module:
        """The module this host stands for, holding its (merged or not) parameters, buffers and
        children again: the inverse of the constructor, for ``merge_and_unload``."""
        base = self.base_module
        for store, own in ((base._parameters, self._parameters), (base._buffers, self._buffers),
                           (base._modules, self._modules)):
            for key in store:
                store[key] = own.get(key)
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        return f"{type(self.base_module).__name__}, parameters={list(self.param_lora)}"
