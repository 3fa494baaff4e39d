"""The fine-tuning job (``lora-phi3 finetune``): data, recipe, training loop, checkpoints, CLI.

The library (everything outside this subpackage) never imports it. ``finetune(recipe)`` runs the
whole job; ``load_recipe`` builds a recipe from a YAML file and command-line overrides.
"""

from .accuracy import AccuracyReport, exact_match_accuracy
from .generate import generate_answer
from .job import DEMO_NOTICE, FinetuneJob, finetune, set_seed
from .model_kwargs import ModelKwargs
from .models import load_model
from .preemption import TrainingInterrupted
from .run_lock import RunDirLocked
from .recipe import Recipe, TrainingConfig, load_recipe
from .tokenizer import load_tokenizer

__all__ = ["finetune", "FinetuneJob", "load_recipe", "Recipe", "TrainingConfig", "ModelKwargs",
           "TrainingInterrupted", "RunDirLocked", "DEMO_NOTICE", "generate_answer", "set_seed", "exact_match_accuracy",
           "AccuracyReport", "load_model", "load_tokenizer"]
