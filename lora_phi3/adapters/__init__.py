"""Adapter files: our safetensors format, and export to / import from the HF PEFT format.

- :mod:`.state`: what an adapter is inside a model (its tensors, per-module facts, a preview);
- :mod:`.schema`: what our ``adapter_config.json`` may hold (checked before anything reads it);
- :mod:`.validate`: reading files safely and checking them against a model;
- :mod:`.files`: our format (``save_adapter``, ``read_adapter``, ``load_adapter``);
- :mod:`.peft_export` / :mod:`.peft_import`: the HF PEFT format, both ways.
"""

from .files import load_adapter, read_adapter, save_adapter
from .peft_export import export_peft, peft_state_dict
from .peft_import import import_peft
from .state import adapter_state_dict

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter",
           "export_peft", "import_peft", "peft_state_dict"]
