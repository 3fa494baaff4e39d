"""``LoraConfig``: what to adapt and how, as a validated dataclass (the recipes' "peft_config")."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic
from .layers.base import check_init_lora_weights
from .utils import BIAS_MODES

__all__ = ["LoraConfig", "QUANTIZE_METHODS"]

QUANTIZE_METHODS = (None, "nf4")


#: LoRA-variant switches and their defaults (plain LoRA). A file without one of them means the
#: default.
VARIANT_DEFAULTS: dict[str, Any] = {"use_rslora": False, "init_lora_weights": True,
                                     "use_dora": False, "trainable_token_indices": None,
                                     "lora_bias": False, "target_parameters": None}


@dataclass
class LoraConfig:
    """Configuration for :func:`lora_phi3.inject_lora`.

    Attributes:
        r: rank of every adapter (> 0).
        lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout on the adapter input, in [0, 1).
        target_modules: module names matched as dotted-path suffixes (``"qkv_proj"`` matches
            ``model.layers.0.self_attn.qkv_proj``); or one regex string matched with
            ``re.fullmatch`` against the full module path; or ``"all-linear"`` (every linear-like
            module except the LM head). On Phi-3, ``q_proj``/``k_proj``/``v_proj`` and
            ``gate_proj``/``up_proj`` select slices of the fused projections.
        exclude_modules: names (suffixes) or one regex of modules to leave alone.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases train and are saved.
        modules_to_save: modules (suffixes) trained fully and saved with the adapter, e.g.
            ``["embed_tokens", "lm_head"]``.
        layers_to_transform: only adapt modules under these layer indices (the number after
            ``layers.``/``h.``/``blocks.`` in the path); None means all.
        fan_in_fan_out: True for weights stored ``(in, out)``; GPT-2 ``Conv1D`` is detected anyway.
        quantize_base: ``None`` or ``"nf4"`` (QLoRA: targeted base weights stored in 4 bits).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``
            (rsLoRA, Kalajdzievski 2023; PEFT's name).
        init_lora_weights: ``True`` (A kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r^2),
            B = 0) or ``False`` (B random too: the adapter is not a no-op at the start), as in
            PEFT.
        use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024): a trained magnitude per output
            row rescales the adapted weight ``W + s B A`` to ``m * (W + s B A) / ||W + s B A||``
            (PEFT's name). Linear layers, fused slices, NF4 bases, embeddings and convolutions;
            see ``docs/variants.md``.
        trainable_token_indices: rows of an embedding table trained on their own (new or special
            tokens), as PEFT's option of that name: a list of token ids for the model's input
            embeddings, or ``{embedding name: [token ids]}`` (names matched as dotted-path suffixes,
            as ``target_modules``). Each selected embedding becomes a
            :class:`~lora_phi3.layers.TrainableTokens` layer.
        lora_bias: PEFT's ``lora_bias``: ``lora_B`` gets a trained bias, so each adapter adds
            ``scaling * (dropout(x) A^T B^T + lora_bias)``; merging adds ``scaling * lora_bias``
            to the layer's bias (a layer without one cannot merge). Linear layers (fused slices:
            on the adapted rows only) and convolutions; as in PEFT, not with ``use_dora``, and
            only with ``init_lora_weights`` True or False.
        target_parameters: PEFT's option of that name: parameters adapted directly, for weights
            that are no module's, such as the 3-D expert weights of a mixture of experts
            (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` on Phi-3.5-MoE). Each entry
            matches ``<module path>.<parameter name>`` as a dotted suffix; a 3-D ``(E, out, in)``
            parameter gets one A/B pair per expert (see :mod:`lora_phi3.layers.param_lora`). With
            it, ``target_modules=None`` adapts no module. As in PEFT, not with ``lora_dropout``,
            ``use_dora``, ``lora_bias`` or a data-driven ``init_lora_weights``; nor (here) with
            ``quantize_base``.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | None = None
    fan_in_fan_out: bool = False
    quantize_base: str | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"LoraConfig.lora_alpha must be a finite number > 0, "
                             f"got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a float in [0, 1), "
                             f"got {self.lora_dropout!r}")
        self.target_modules = _names("target_modules", self.target_modules)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.modules_to_save is not None:
            ms = self.modules_to_save
            # one name is a one-name list here (suffix matching, never a regex)
            self.modules_to_save = _names("modules_to_save", [ms] if isinstance(ms, str) else ms)
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if not isinstance(layers, (list, tuple)) or not layers or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError("LoraConfig.layers_to_transform must be a non-empty list of ints >= 0, "
                                 f"got {self.layers_to_transform!r}")
            self.layers_to_transform = list(layers)
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"LoraConfig.fan_in_fan_out must be a bool, got {self.fan_in_fan_out!r}")
        if self.quantize_base not in QUANTIZE_METHODS:
            raise ValueError(f"LoraConfig.quantize_base must be one of {QUANTIZE_METHODS}, "
                             f"got {self.quantize_base!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        check_init_lora_weights(self.init_lora_weights, "LoraConfig.init_lora_weights")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be a bool, got {self.use_dora!r}")
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        if not isinstance(self.lora_bias, bool):
            raise ValueError(f"LoraConfig.lora_bias must be a bool, got {self.lora_bias!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("LoraConfig.lora_bias=True cannot be combined with use_dora=True "
                             "(PEFT refuses the pair too); set one of them to False")
        if self.lora_bias and self.init_lora_weights is not True \
                and self.init_lora_weights is not False:
            raise ValueError("LoraConfig.lora_bias=True needs init_lora_weights True or False "
                             f"(PEFT's rule), got {self.init_lora_weights!r}")
        self.target_parameters = _parameter_names(self.target_parameters)
        if self.target_parameters:
            self._check_target_parameters()

    def _check_target_parameters(self) -> None:
        """Refuse what adapters on parameters cannot do, naming both fields."""
        where = f"LoraConfig.target_parameters={self.target_parameters!r}"
        if self.quantize_base is not None:
            raise ValueError(f"{where} cannot be combined with quantize_base={self.quantize_base!r}: "
                             "there is no quantized layer for parameters (expert weights stay "
                             "dense); set quantize_base=None, or adapt only target_modules in 4 bits")
        refused = [("lora_dropout", self.lora_dropout, self.lora_dropout != 0, "0.0"),
                   ("use_dora", self.use_dora, self.use_dora, "False"),
                   ("lora_bias", self.lora_bias, self.lora_bias, "False"),
                   ("init_lora_weights", self.init_lora_weights,
                    isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian",
                    "True, False or 'gaussian'")]
        for field, value, bad, allowed in refused:
            if bad:
                raise ValueError(f"{where} cannot be combined with {field}={value!r} (adapters on "
                                 "parameters do not implement it; PEFT refuses dropout, DoRA and "
                                 f"lora_bias there too); allowed with target_parameters: {allowed}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_file_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the LoRA-variant fields (:data:`VARIANT_DEFAULTS`) that are at
        their defaults: an adapter file of plain LoRA stays byte for byte what it was before the
        variants existed, and older versions still read it."""
        return {k: v for k, v in self.to_dict().items()
                if not (k in VARIANT_DEFAULTS and v == VARIANT_DEFAULTS[k])}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from a dict; unknown keys raise ``ValueError`` naming them and the allowed ones."""
        if not isinstance(data, dict):
            raise ValueError(f"LoraConfig needs a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoraConfig got unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text; also written (atomically) to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            write_bytes_atomic(Path(path), (text + "\n").encode())
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "LoraConfig":
        """Build from JSON text or from a JSON file's path."""
        return cls.from_dict(json.loads(_text_or_file(text_or_path, "{")))

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written (atomically) to ``path`` if given."""
        import yaml
        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            write_bytes_atomic(Path(path), text.encode())
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "LoraConfig":
        """Build from YAML text or from a YAML file's path (a path is a single line ending in
        ``.yaml``/``.yml`` that exists)."""
        import yaml
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
            text = _text_or_file(text_or_path, None)
        return cls.from_dict(yaml.safe_load(text) or {})


def _text_or_file(text_or_path: str | Path, text_start: str | None) -> str:
    """``text_or_path`` itself if it looks like inline text, else the file it names."""
    if isinstance(text_or_path, str) and text_start and text_or_path.lstrip().startswith(text_start):
        return text_or_path
    path = Path(text_or_path)
    if not path.is_file():
        raise ValueError(f"LoraConfig: {str(text_or_path)[:200]!r} is neither inline config text "
                         "nor an existing file")
    return path.read_text()


def _names(field_name: str, value: Any) -> list[str] | str | None:
    """Validate a list of module names or a single regex/keyword string."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value:
            raise ValueError(f"LoraConfig.{field_name} must not be an empty string")
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"LoraConfig.{field_name}: a single string is a regex matched "
                                 f"against full module paths, and {value!r} is not valid: {exc}") \
                    from None
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        if not value:
            raise ValueError(f"LoraConfig.{field_name} must not be empty, got {value!r}")
        return list(value)
    raise ValueError(f"LoraConfig.{field_name} must be a list of module names or one regex "
                     f"string, got {value!r}")


def _parameter_names(value: Any) -> list[str] | None:
    """Validate ``target_parameters``: None, or a non-empty list of parameter paths (suffixes)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, str) and v and not v.startswith(".") and not v.endswith(".")
            for v in value):
        return list(value)
    raise ValueError("LoraConfig.target_parameters must be None or a non-empty list of parameter "
                     "paths such as 'mlp.experts.gate_up_proj' (dotted suffixes of "
                     f"'<module>.<parameter>'; never one string, as in PEFT), got {value!r}")


def _token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value) \
        and len(set(value)) == len(value)


def _token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """Validate ``trainable_token_indices``: None, distinct token ids, or {name: distinct ids}."""
    if value is None:
        return None
    if _token_ids(value):
        return list(value)
    if isinstance(value, dict) and value and all(isinstance(k, str) and k and _token_ids(v)
                                                 for k, v in value.items()):
        return {k: list(v) for k, v in value.items()}
    raise ValueError("LoraConfig.trainable_token_indices must be None, a non-empty list of distinct "
                     "token ids (ints >= 0), or a non-empty {embedding module name: such a list}, "
                     f"got {value!r}")
