"""``python -m lora_phi3`` runs the ``lora-phi3`` command."""

import sys

from .finetune.cli import main

sys.exit(main())
