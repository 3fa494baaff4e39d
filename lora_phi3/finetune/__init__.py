"""The fine-tuning job (``lora-phi3 finetune``): data, recipe, training loop, checkpoints, CLI.

The library (everything outside this subpackage) never imports it. ``finetune(recipe)`` runs the
whole job; ``load_recipe`` builds a recipe from a YAML file and command-line overrides.
"""

from .generate import generate_answer
from .job import DEMO_NOTICE, finetune, set_seed
from .recipe import Recipe, TrainingConfig, load_recipe

__all__ = ["finetune", "load_recipe", "Recipe", "TrainingConfig", "DEMO_NOTICE", "generate_answer",
           "set_seed"]
