"""Adapter files: our safetensors format, and export to / import from the HF PEFT format."""

from .files import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .peft_format import export_peft, import_peft, peft_state_dict

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter",
           "export_peft", "import_peft", "peft_state_dict"]
