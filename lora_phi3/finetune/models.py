"""Loading the base model: the embedded tiny Phi-3 (offline) or a real checkpoint.

The embedded model is the real ``transformers.Phi3ForCausalLM`` class with a small config, so it
runs every code path of the real Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``, rotary
embeddings, grouped-query attention) with no download. Its weights are shipped in
``assets/tiny_phi3_base.safetensors``: pretrained by ``scripts/make_assets.py`` as a plain language
model on the toy tasks' operations (``reverse k v s = s v k``), so it knows the building blocks
but not the chat format, which is what the demo's LoRA fine-tune teaches. It is a demonstration
model, always logged as such. With size overrides (tests) it is built with a random initialisation.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from .model_kwargs import check_attn_implementation

logger = logging.getLogger(__name__)

__all__ = ["load_model", "load_training_model", "build_tiny_phi3", "load_tiny_base", "tiny_phi3_config", "TINY_PHI3",
           "TINY_BASE_FILE", "REAL_PHI3_MINI", "DEMO_NOTICE", "resolve_dtype", "count_parameters"]

#: The hub id of the model the tool is built for.
REAL_PHI3_MINI = "microsoft/Phi-3-mini-4k-instruct"
#: What the job prints whenever it runs on the embedded model, so no one mistakes it for Phi-3-mini.
DEMO_NOTICE = (
    "This is the embedded TINY DEMONSTRATION model (a 2M-parameter Phi-3 pretrained on toy "
    "operations, fine-tuned here to answer them as chat), not Phi-3-mini: it shows the pipeline "
    "end to end, offline, in a few minutes on a CPU. "
    f"For the real model run: lora-phi3 finetune --model {REAL_PHI3_MINI} --data your_chats.jsonl "
    "(or --config recipes/phi3-mini.yaml)"
)

#: Shape of the embedded demo model (vocab size comes from the tokenizer). Phi-3-mini is
#: hidden 3072, 32 layers, 32 heads (no GQA), intermediate 8192. The tiny one keeps Phi-3's
#: structure with grouped-query attention (6 query heads over 2 KV heads, so q and k/v slices of
#: ``qkv_proj`` differ in size). 4 layers of width 192 are about the smallest that learn the toy
#: operations (sorting, 2-digit addition) in ~35 CPU minutes of pretraining.
TINY_PHI3: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "sliding_window": None,
}
#: The pretrained weights of the embedded model, in ``lora_phi3/finetune/assets/``.
TINY_BASE_FILE = "tiny_phi3_base.safetensors"
TINY_SEED = 1234

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Map ``"bf16"``/``"bfloat16"``/``"fp32"``/... or a ``torch.dtype`` to a ``torch.dtype``.

    Raises:
        ValueError: for any other value, naming the allowed ones.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def tiny_phi3_config(vocab_size: int, *, pad_token_id: int = 0, eos_token_id: int = 0,
                     bos_token_id: int | None = None, **overrides: Any) -> Phi3Config:
    """The ``Phi3Config`` of the embedded model.

    Args:
        vocab_size: the tokenizer's ``len(tokenizer)``.
        pad_token_id, eos_token_id, bos_token_id: the tokenizer's special ids.
        **overrides: any ``Phi3Config`` field, replacing :data:`TINY_PHI3` values (tests use this
            to shrink the model further).

    Raises:
        ValueError: if ``vocab_size`` is not a positive int.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    fields = {**TINY_PHI3, **overrides}
    return Phi3Config(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                      bos_token_id=bos_token_id, **fields)


def build_tiny_phi3(vocab_size: int, *, seed: int = TINY_SEED, dtype: torch.dtype = torch.float32,
                    pad_token_id: int = 0, eos_token_id: int = 0,
                    attn_implementation: str = "sdpa", **overrides: Any) -> Phi3ForCausalLM:
    """Build the embedded tiny Phi-3 with a fixed-seed initialisation.

    The global RNG is left as it was (the weights come from a forked RNG), so building the model
    never changes what a seeded training run does afterwards.

    Returns:
        A ``Phi3ForCausalLM`` in ``dtype``, eval mode, ``attn_implementation`` attention (SDPA by
        default).
    """
    check_attn_implementation(attn_implementation)
    config = tiny_phi3_config(vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                              **overrides)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config)
    model.to(dtype)
    model.config.dtype = dtype  # as from_pretrained records it
    model.eval()
    return model


def load_tiny_base(tokenizer: Any, *, dtype: torch.dtype = torch.float32,
                   attn_implementation: str = "sdpa") -> Phi3ForCausalLM:
    """The embedded pretrained tiny Phi-3 (``assets/tiny_phi3_base.safetensors``).

    Args:
        tokenizer: the embedded tokenizer (its vocabulary must be the one the base was trained with).
        dtype: weight dtype (the file holds bf16).
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.

    Raises:
        FileNotFoundError: the asset is missing.
        ValueError: the asset does not fit the tokenizer or :data:`TINY_PHI3` (regenerate both
            with ``python scripts/make_assets.py``).
    """
    from safetensors import safe_open

    path = resources.files("lora_phi3.finetune").joinpath("assets", TINY_BASE_FILE)
    with resources.as_file(path) as file:
        if not file.is_file():
            raise FileNotFoundError(f"embedded base model {file} is missing; regenerate it with "
                                    "`python scripts/make_assets.py`")
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    stored = json.loads(meta.get("config", "{}"))
    wanted = {"vocab_size": len(tokenizer), **TINY_PHI3}
    differ = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
    if differ:
        raise ValueError(f"embedded base model {TINY_BASE_FILE} was built for another config "
                         f"(field: (file, expected) = {differ}); regenerate the assets with "
                         "`python scripts/make_assets.py`")
    # Built like the random-init model (a forked RNG: loading never changes a seeded run's
    # numbers), then every persistent tensor is replaced by the file's.
    model = build_tiny_phi3(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            attn_implementation=attn_implementation)
    model.load_state_dict(state, strict=True)
    model.config.dtype = dtype
    return model.to(dtype)


def load_model(name_or_path: str | None = None, dtype: torch.dtype | str | None = None, *,
               tokenizer: Any = None, vocab_size: int | None = None,
               attn_implementation: str = "sdpa", use_cache: bool | None = None,
               trust_remote_code: bool = False, **tiny_overrides: Any) -> nn.Module:
    """Load the base causal LM.

    Args:
        name_or_path: ``None`` for the embedded tiny Phi-3 (its pretrained weights when a
            ``tokenizer`` is given and no overrides; a random initialisation otherwise); otherwise a hub id (e.g.
            ``"microsoft/Phi-3-mini-4k-instruct"``) or a local HF directory, loaded with
            ``AutoModelForCausalLM.from_pretrained``.
        dtype: weight dtype (``torch.bfloat16``, ``"bf16"``, ``"auto"``, ...). Default: float32 for
            the tiny model, the checkpoint's own dtype (``"auto"``) for a real one; ``"auto"`` is
            float32 for the tiny one.
        tokenizer: for the tiny model, its vocabulary size and pad/eos ids are taken from it.
        vocab_size: for the tiny model without a tokenizer.
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"`` (needs
            the ``flash-attn`` package), set in the model's config.
        use_cache: the config's ``use_cache``; None keeps the checkpoint's.
        trust_remote_code: allow modelling code shipped with the checkpoint (real models only).
        **tiny_overrides: ``Phi3Config`` fields for the tiny model only.

    Returns:
        The model in eval mode. Its ``config.name_or_path`` is ``"embedded-tiny-phi3"`` for the tiny
        one.

    Raises:
        TypeError: ``name_or_path`` is neither None nor a non-empty string.
        ValueError: the tiny model gets neither ``tokenizer`` nor ``vocab_size``, an unknown dtype
            or attention implementation, or ``flash_attention_2`` without its package.
    """
    check_attn_implementation(attn_implementation)
    torch_dtype = None if dtype == "auto" else resolve_dtype(dtype)
    if name_or_path is None:
        if tokenizer is not None:
            vocab_size = len(tokenizer)
            ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        else:
            ids = {}
        if vocab_size is None:
            raise ValueError("load_model(None) builds the embedded tiny Phi-3 and needs tokenizer= "
                             "or vocab_size=")
        if tokenizer is not None and not tiny_overrides:
            model = load_tiny_base(tokenizer, dtype=torch_dtype or torch.float32,
                                   attn_implementation=attn_implementation)
            how = f"pretrained weights from {TINY_BASE_FILE}"
        else:
            model = build_tiny_phi3(vocab_size, dtype=torch_dtype or torch.float32, **ids,
                                    attn_implementation=attn_implementation, **tiny_overrides)
            how = f"random init, seed {TINY_SEED}"
        model.config.name_or_path = "embedded-tiny-phi3"
        if use_cache is not None:
            model.config.use_cache = use_cache
        logger.info("loaded the embedded tiny Phi-3 demo model (%s parameters, %s)",
                    f"{count_parameters(model):,}", how)
        return model
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"model name_or_path must be None or a non-empty string, got {name_or_path!r}")
    if tiny_overrides:
        raise ValueError(f"tiny-model overrides {sorted(tiny_overrides)} only apply when "
                         "name_or_path is None")
    logger.info("loading %s (dtype %s, %s attention)", name_or_path, torch_dtype or "auto",
                attn_implementation)
    extra = {} if use_cache is None else {"use_cache": use_cache}  # a config override
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype or "auto",
                                                 attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code, **extra)
    model.eval()
    return model


def load_training_model(recipe: Any, tokenizer: Any, *, use_bf16: bool,
                        device: torch.device | str, loader: Callable[..., nn.Module] | None = None
                        ) -> nn.Module:
    """The model a ``finetune`` run trains: loaded as ``recipe.model_kwargs`` says, injected with
    ``recipe.lora``, on ``device``, with gradient checkpointing as ``recipe.training`` says, in
    train mode.

    Args:
        recipe: a :class:`~.recipe.Recipe`.
        tokenizer: the run's tokenizer (the embedded model's vocabulary comes from it).
        use_bf16: bf16 training (autocast) is on and supported; with ``torch_dtype`` unset the
            weights are then bf16, else fp32 (also for checkpoints stored in bf16).
        device: where the model trains.
        loader: what loads a dense model, with :func:`load_model`'s signature (default: it).

    Raises:
        ValueError: settings that cannot run here (``flash_attention_2`` without its package, a
            QLoRA base with ``torch_dtype: auto``), and the loaders' errors.
    """
    from .. import inject_lora, load_quantized_model
    from .train import enable_gradient_checkpointing

    settings = recipe.model_kwargs
    settings.check_available()
    dtype = settings.dtype(use_bf16)
    if recipe.lora.quantize_base is not None and recipe.model is not None:
        if dtype == "auto":
            raise ValueError("model_kwargs.torch_dtype 'auto' cannot be used with quantize_base: name "
                             "the compute dtype of the 4-bit layers (bfloat16, float16 or float32)")
        # QLoRA on a real checkpoint: quantise projection by projection as the shards are read,
        # never holding the whole dense model and its 4-bit copy at once (it also injects LoRA).
        model = load_quantized_model(recipe.model, recipe.lora, dtype=dtype,
                                     attn_implementation=settings.attn_implementation,
                                     trust_remote_code=settings.trust_remote_code)
        model.config.use_cache = settings.use_cache
    else:
        model = (loader or load_model)(recipe.model, dtype=dtype, tokenizer=tokenizer,
                                       attn_implementation=settings.attn_implementation,
                                       use_cache=settings.use_cache,
                                       trust_remote_code=settings.trust_remote_code)
        # Inject before moving: the adapters are then initialised by the CPU generator, so a
        # seed gives the same run on CPU and GPU (the CUDA generator draws other numbers).
        # inject_lora also turns input recompute on (docs/performance.md): LoRA layers fed by
        # a norm or by SwiGLU rebuild their input in backward instead of keeping a copy.
        inject_lora(model, recipe.lora)
    model.to(device)
    if recipe.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
