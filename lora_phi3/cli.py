"""Deprecated entry point kept for scripts written before the job became :mod:`lora_phi3.finetune`.

``python -m lora_phi3.cli ...`` (and ``torchrun -m lora_phi3.cli ...``) still run the ``lora-phi3``
command, with a warning; use ``python -m lora_phi3 ...`` or ``lora-phi3 ...`` instead. This module
is the job's, not the library's: ``import lora_phi3`` never loads it.
"""

import sys
import warnings

from .finetune.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    warnings.warn("`python -m lora_phi3.cli` is deprecated; use `python -m lora_phi3` or the "
                  "`lora-phi3` command (same flags). It will be removed in 0.3", DeprecationWarning,
                  stacklevel=1)
    sys.exit(main())
