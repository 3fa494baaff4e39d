"""How the base model is loaded: the recipe's ``model_kwargs`` section, as the Phi-3 Cookbook's
``sample_finetune.py`` writes it (``model_kwargs = dict(use_cache=False, trust_remote_code=True,
attn_implementation="flash_attention_2", torch_dtype=torch.bfloat16)``)::

    model: microsoft/Phi-3-mini-4k-instruct
    model_kwargs: {attn_implementation: sdpa, torch_dtype: bfloat16, use_cache: false,
                   trust_remote_code: false}

Each field has a ``finetune`` flag (``--attn-implementation``, ``--torch-dtype``,
``--use-cache``, ``--trust-remote-code``). ``torch_dtype`` left unset follows ``training.bf16``
(bf16 weights when bf16 is on and supported, fp32 otherwise), as before the section existed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelKwargs", "ATTN_IMPLEMENTATIONS", "TORCH_DTYPES", "FLASH_ATTN_PACKAGE",
           "check_attn_implementation", "attn_implementation_available"]

#: The attention implementations a recipe may name (transformers' ``attn_implementation``).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
#: Weight dtypes a recipe may name; "auto" is the checkpoint's own dtype.
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32"}
#: What ``flash_attention_2`` needs: (pip name, import name).
FLASH_ATTN_PACKAGE = ("flash-attn", "flash_attn")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fail(name: str, value: Any, what: str) -> None:
    raise ValueError(f"model_kwargs.{name} ({_flag(name)}) {what}, got {value!r}")


def attn_implementation_available(name: str) -> bool:
    """Whether ``name`` can run here: sdpa and eager always; flash_attention_2 when its package
    is installed (transformers itself still needs a CUDA device and fp16/bf16 weights for it)."""
    if name == "flash_attention_2":
        return importlib.util.find_spec(FLASH_ATTN_PACKAGE[1]) is not None
    return name in ATTN_IMPLEMENTATIONS


def check_attn_implementation(name: str) -> None:
    """Raise unless ``name`` is a known attention implementation that can run here.

    Raises:
        ValueError: an unknown name (listing the allowed ones), or ``flash_attention_2`` without
            the ``flash-attn`` package.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        _fail("attn_implementation", name, f"must be one of {list(ATTN_IMPLEMENTATIONS)}")
    if not attn_implementation_available(name):
        pip, module = FLASH_ATTN_PACKAGE
        raise ValueError(f"model_kwargs.attn_implementation (--attn-implementation) 'flash_attention_2' "
                         f"needs the {pip} package (import {module}), which is not installed; "
                         f"install it (pip install {pip} --no-build-isolation, on a CUDA machine) "
                         "or use 'sdpa' (the default) or 'eager'")


@dataclass
class ModelKwargs:
    """Settings for loading the base model (the recipe's ``model_kwargs`` section).

    Attributes:
        attn_implementation: ``"sdpa"`` (default: PyTorch's scaled-dot-product attention),
            ``"eager"`` (plain matmuls), or ``"flash_attention_2"`` (needs the ``flash-attn``
            package; refused with packing, see :meth:`check_packing`).
        torch_dtype: weight dtype, ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"auto"``
            (the checkpoint's own; the embedded tiny model is float32); None (default) follows
            ``training.bf16``: bf16 when it is on and supported, float32 otherwise.
        use_cache: the model config's ``use_cache``: off (default) while training, as in the
            Cookbook; training and evaluation never build a cache, generation always does.
        trust_remote_code: run modelling code shipped with a checkpoint (model and tokenizer);
            off by default. Only for checkpoints whose ``config.json`` has an ``auto_map``.
    """

    attn_implementation: str = "sdpa"
    torch_dtype: str | None = None
    use_cache: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            _fail("attn_implementation", self.attn_implementation,
                  f"must be one of {list(ATTN_IMPLEMENTATIONS)}")
        if self.torch_dtype is not None:
            name = self.torch_dtype
            if isinstance(name, torch.dtype):
                name = str(name).removeprefix("torch.")
            name = _DTYPE_ALIASES.get(name, name) if isinstance(name, str) else name
            if name not in TORCH_DTYPES:
                _fail("torch_dtype", self.torch_dtype,
                      f"must be null (follow training.bf16) or one of {list(TORCH_DTYPES)}")
            self.torch_dtype = name
        for name in ("use_cache", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")

    def check_available(self) -> None:
        """Raise ``ValueError`` if the attention implementation cannot run here."""
        check_attn_implementation(self.attn_implementation)

    def check_packing(self, packing: bool) -> None:
        """Packed rows are kept apart by a 4-D block-diagonal mask (:mod:`.packing`), which
        transformers' flash_attention_2 path does not take: refuse the pair rather than let
        examples attend to each other.

        Raises:
            ValueError: ``packing`` with ``flash_attention_2``.
        """
        if packing and self.attn_implementation == "flash_attention_2":
            raise ValueError("model_kwargs.attn_implementation 'flash_attention_2' cannot keep packed "
                             "examples apart (packing uses a 4-D block-diagonal mask, which only "
                             "'sdpa' and 'eager' take); use --no-packing with it, or 'sdpa'")

    def dtype(self, use_bf16: bool) -> torch.dtype | str:
        """The weight dtype to load with: ``torch_dtype``, or bf16/fp32 from ``use_bf16``."""
        if self.torch_dtype is None:
            return torch.bfloat16 if use_bf16 else torch.float32
        return "auto" if self.torch_dtype == "auto" else getattr(torch, self.torch_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelKwargs":
        """Build from a mapping.

        Raises:
            ValueError: not a mapping, unknown keys (named, with the allowed ones), bad values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"the 'model_kwargs' section must be a mapping, got {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"model_kwargs: unknown field(s) {unknown}; allowed: {known}")
        return cls(**data)
