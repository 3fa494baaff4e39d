"""Recipes: ``TrainingConfig`` (validated), the two built-in recipes, YAML files and overrides.

A recipe file has a ``training`` section (:class:`TrainingConfig` fields) and a ``lora`` section
(:class:`~lora_phi3.config.LoraConfig` fields), plus optional top-level ``model`` and ``data`` and
a ``model_kwargs`` section (:class:`~.model_kwargs.ModelKwargs`: how the model is loaded)::

    model: microsoft/Phi-3-mini-4k-instruct
    model_kwargs: {attn_implementation: sdpa, torch_dtype: bfloat16, use_cache: false}
    training: {learning_rate: 2.0e-4, batch_size: 4, ...}
    lora: {r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: [qkv_proj, ...]}

Precedence: built-in defaults < recipe file < command-line flags. The built-in defaults are the
Phi-3 model-card recipe (:data:`PHI3_MINI_TRAINING`) when a model is given, and the quick
embedded demo (:data:`DEMO_TRAINING`) when it is not.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LoraConfig
from ..inject.phi3 import DEFAULT_TARGETS
from .conversations import ON_BAD_ROW_CHOICES as ON_BAD_ROW
from .model_kwargs import ModelKwargs

__all__ = ["TrainingConfig", "Recipe", "ModelKwargs", "load_recipe", "PHI3_MINI_TRAINING", "PHI3_MINI_LORA",
           "DEMO_TRAINING", "DEMO_LORA", "LR_SCHEDULERS", "ON_BAD_ROW", "flag_name"]

LR_SCHEDULERS = ("cosine", "linear", "constant")


def flag_name(field_name: str) -> str:
    """The command-line flag of a recipe field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


@dataclass
class TrainingConfig:
    """Hyper-parameters of the training loop. Defaults: the Phi-3 model-card recipe, with a LoRA
    learning rate (the card's 5e-6 was carried over from full fine-tuning).

    Attributes:
        learning_rate: AdamW peak learning rate (> 0).
        batch_size: rows per device per micro-batch (>= 1).
        gradient_accumulation_steps: micro-batches per optimizer step (>= 1).
        epochs: passes over the training rows (> 0); ignored when ``max_steps`` is set.
        max_steps: optimizer steps; None trains for ``epochs``.
        warmup_ratio: share of the steps with a linear warm-up, in [0, 1).
        lr_scheduler: ``"cosine"``, ``"linear"`` (decay to 0) or ``"constant"`` (after warm-up).
        weight_decay: AdamW decoupled weight decay (>= 0).
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): train every ``lora_B`` at this many times
            ``learning_rate`` (> 0; 16 is the paper's default), with PEFT's LoRA+ groups
            (:func:`lora_phi3.lora_plus_param_groups`: embedding adapters at 1e-6, no weight decay
            on biases and LayerNorm weights). None (default) trains with one learning rate.
        max_grad_norm: gradient clipping norm; 0 disables clipping.
        max_seq_length: longest example in tokens; longer rows are skipped or fail (on_bad_row).
        packing: concatenate examples into rows of ``max_seq_length`` tokens (block-diagonal
            attention); False pads each batch to its longest example.
        gradient_checkpointing: recompute activations in the backward pass.
        fsdp: shard the frozen base and the adapters over the ``torchrun`` processes with FSDP2
            (``fully_shard`` per decoder layer and at the root) instead of replicating the model
            with DDP; see ``docs/distributed.md``.
        bf16: base weights in bfloat16 and bf16 autocast (adapters stay fp32).
        logging_steps: log the training loss every this many steps (>= 1).
        eval_steps: evaluate every this many steps; 0 evaluates only before and after training.
        save_steps: checkpoint every this many steps; 0 saves only the final adapter.
        save_total_limit: keep at most this many checkpoints; 0 keeps all.
        seed: seeds the adapters' initialisation, dropout and the data order.
        train_on_prompt: also train on system/user tokens (default: assistant tokens only).
        on_bad_row: ``"skip"`` (count and warn) or ``"error"`` (stop) on a bad data row.
        eval_fraction: share held out for evaluation when the data has no eval split.
        eval_accuracy: at each evaluation also score exact match of greedy answers on held-out
            conversations (generation: costly on a real model, so on by default only in the demo).
        eval_accuracy_rows: score the first this many held-out conversations (a fixed subset, for
            speed); 0 scores all.
    """

    learning_rate: float = 2e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.2
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    loraplus_lr_ratio: float | None = None
    max_grad_norm: float = 1.0
    max_seq_length: int = 2048
    packing: bool = True
    gradient_checkpointing: bool = True
    fsdp: bool = False
    bf16: bool = True
    logging_steps: int = 20
    eval_steps: int = 100
    save_steps: int = 100
    save_total_limit: int = 1
    seed: int = 0
    train_on_prompt: bool = False
    on_bad_row: str = "skip"
    eval_fraction: float = 0.05
    eval_accuracy: bool = False
    eval_accuracy_rows: int = 200

    def __post_init__(self) -> None:
        self.learning_rate = _number(self, "learning_rate", low=0.0, low_open=True)
        self.batch_size = _int(self, "batch_size", low=1)
        self.gradient_accumulation_steps = _int(self, "gradient_accumulation_steps", low=1)
        self.epochs = _number(self, "epochs", low=0.0, low_open=True)
        if self.max_steps is not None:
            self.max_steps = _int(self, "max_steps", low=1)
        self.warmup_ratio = _number(self, "warmup_ratio", low=0.0, high=1.0)
        _choice(self, "lr_scheduler", LR_SCHEDULERS)
        self.weight_decay = _number(self, "weight_decay", low=0.0)
        if self.loraplus_lr_ratio is not None:
            self.loraplus_lr_ratio = _number(self, "loraplus_lr_ratio", low=0.0, low_open=True)
        self.max_grad_norm = _number(self, "max_grad_norm", low=0.0)
        self.max_seq_length = _int(self, "max_seq_length", low=2)
        for name in ("packing", "gradient_checkpointing", "fsdp", "bf16", "train_on_prompt",
                     "eval_accuracy"):
            if not isinstance(getattr(self, name), bool):
                _fail(self, name, "must be true or false")
        self.logging_steps = _int(self, "logging_steps", low=1)
        self.eval_steps = _int(self, "eval_steps", low=0)
        self.save_steps = _int(self, "save_steps", low=0)
        self.save_total_limit = _int(self, "save_total_limit", low=0)
        self.seed = _int(self, "seed", low=0)
        _choice(self, "on_bad_row", ON_BAD_ROW)
        self.eval_fraction = _number(self, "eval_fraction", low=0.0, high=1.0)
        self.eval_accuracy_rows = _int(self, "eval_accuracy_rows", low=0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "TrainingConfig | None" = None) -> "TrainingConfig":
        """Build from a mapping, on top of ``base`` (default: the class defaults).

        Raises:
            ValueError: unknown keys (named, with the allowed ones) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"the 'training' section must be a mapping, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"training: unknown field(s) {unknown}; allowed: {known}")
        merged = {**(base.to_dict() if base is not None else {}), **data}
        return cls(**merged)


# -- validation helpers: every message names the field, its flag, the value and what is allowed --
def _fail(cfg: Any, name: str, what: str) -> None:
    raise ValueError(f"training.{name} ({flag_name(name)}) {what}, got {getattr(cfg, name)!r}")


def _int(cfg: Any, name: str, low: int) -> int:
    v = getattr(cfg, name)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        _fail(cfg, name, f"must be an integer >= {low}")
    return v


def _number(cfg: Any, name: str, low: float, high: float | None = None,
            low_open: bool = False) -> float:
    v = getattr(cfg, name)
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v > low if low_open else v >= low) and (high is None or v < high))
    if not ok:
        rng = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        _fail(cfg, name, f"must be a number {rng}")
    return float(v)


def _choice(cfg: Any, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in allowed:
        _fail(cfg, name, f"must be one of {list(allowed)}")


# -- the built-in recipes ------------------------------------------------------------------------
#: Phi-3 model card (sample_finetune.py): batch 4, 1 epoch, cosine, warmup 0.2, bf16, gradient
#: checkpointing, seq 2048 packed, save every 100 steps keeping 1, seed 0; LoRA r=16/alpha=32/
#: dropout 0.05. Learning rate 2e-4 instead of the card's 5e-6 (a full fine-tuning rate).
PHI3_MINI_TRAINING: dict[str, Any] = TrainingConfig().to_dict()
PHI3_MINI_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                  "target_modules": list(DEFAULT_TARGETS), "bias": "none"}

#: The embedded demo: LoRA teaches the pretrained tiny Phi-3 the chat format of the bundled toy
#: tasks, in under 1.5 minutes on 2 CPU cores, with exact match scored at each evaluation.
#: (lr 2e-3 gives the same held-out exact match as 5e-3: docs/finetuning.md.)
DEMO_TRAINING: dict[str, Any] = {
    **PHI3_MINI_TRAINING,
    "learning_rate": 5e-3, "batch_size": 8, "gradient_accumulation_steps": 1, "epochs": 1.0,
    "max_steps": 200, "warmup_ratio": 0.05, "lr_scheduler": "cosine", "max_seq_length": 256,
    "gradient_checkpointing": False, "bf16": False, "logging_steps": 10, "eval_steps": 50,
    "save_steps": 100, "save_total_limit": 2, "eval_accuracy": True,
}
DEMO_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                             "target_modules": list(DEFAULT_TARGETS), "bias": "none"}


@dataclass
class Recipe:
    """Everything a ``finetune`` run needs.

    Attributes:
        model: hub id or local directory; None for the embedded tiny demo model.
        data: data file/directory/HF dataset; None for the bundled toy set.
        output_dir: where checkpoints, the adapter, metrics and the summary go.
        training: the loop's hyper-parameters.
        lora: the adapters.
        model_kwargs: how the model is loaded (attention, dtype, cache, remote code).
    """

    model: str | None = None
    data: str | None = None
    output_dir: str = "lora-phi3-output"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(**PHI3_MINI_LORA))
    model_kwargs: ModelKwargs = field(default_factory=ModelKwargs)

    @property
    def is_demo(self) -> bool:
        return self.model is None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "output_dir": self.output_dir,
                "model_kwargs": self.model_kwargs.to_dict(), "training": self.training.to_dict(),
                "lora": self.lora.to_dict()}


_TOP_LEVEL = ("model", "data", "output_dir", "model_kwargs", "training", "lora")
_SECTIONS = ("model_kwargs", "training", "lora")


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a recipe YAML (or JSON) file into a plain dict, checking its top-level keys.

    Raises:
        ValueError: missing file, invalid YAML, not a mapping, or unknown top-level keys.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {p} is not valid YAML: {e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {p} must hold a mapping with 'training' and 'lora' sections, "
                         f"got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_LEVEL))
    if unknown:
        raise ValueError(f"--config: {p} has unknown top-level key(s) {unknown}; "
                         f"allowed: {list(_TOP_LEVEL)}")
    return data


def load_recipe(path: str | os.PathLike | None = None, *,
                overrides: dict[str, Any] | None = None) -> Recipe:
    """Build a :class:`Recipe`: built-in defaults < file < ``overrides``.

    Args:
        path: recipe YAML; None uses only the built-in defaults.
        overrides: ``{"model": ..., "data": ..., "output_dir": ..., "model_kwargs": {...},
            "training": {...}, "lora": {...}}``, e.g. from command-line flags; None values are
            ignored.

    Returns:
        The validated recipe. Its defaults are the Phi-3 card recipe when a model is set (in the
        file or the overrides), the embedded demo otherwise.

    Raises:
        ValueError: anything invalid, naming the field and the allowed values.
    """
    file_data = read_recipe_file(path) if path is not None else {}
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in _SECTIONS:
        for src in (file_data, over):
            if key in src and src[key] is not None and not isinstance(src[key], dict):
                raise ValueError(f"the {key!r} section must be a mapping, got {src[key]!r}")
    model = over.get("model", file_data.get("model"))
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"model must be a hub id or a local directory (a string), got {model!r}; "
                         "loading settings go in the 'model_kwargs' section (attn_implementation, "
                         "torch_dtype, use_cache, trust_remote_code)")
    demo = model is None
    training = {**(DEMO_TRAINING if demo else PHI3_MINI_TRAINING)}
    lora = {**(DEMO_LORA if demo else PHI3_MINI_LORA)}
    model_kwargs: dict[str, Any] = {}
    for src in (file_data, over):
        training.update({k: v for k, v in (src.get("training") or {}).items()})
        lora.update({k: v for k, v in (src.get("lora") or {}).items()})
        model_kwargs.update({k: v for k, v in (src.get("model_kwargs") or {}).items()})
    # Giving epochs without max_steps at a higher level means "train for epochs".
    t_over = over.get("training") or {}
    if "epochs" in t_over and "max_steps" not in t_over:
        training["max_steps"] = None
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(training) - known)
    if unknown:
        raise ValueError(f"training: unknown field(s) {unknown}; allowed: {sorted(known)}")
    training_config = TrainingConfig(**training)
    loading = ModelKwargs.from_dict(model_kwargs)
    loading.check_packing(training_config.packing)
    return Recipe(model=model, data=over.get("data", file_data.get("data")),
                  output_dir=str(over.get("output_dir", file_data.get("output_dir",
                                                                      "lora-phi3-output"))),
                  training=training_config, lora=_lora_config(lora), model_kwargs=loading)


def _lora_config(fields: dict[str, Any]) -> LoraConfig:
    try:
        return LoraConfig.from_dict(fields)
    except ValueError as e:  # say where the value came from: the 'lora' section or its flags
        raise ValueError(f"lora section / LoRA flags (--r, --lora-alpha, ...): {e}") from None
