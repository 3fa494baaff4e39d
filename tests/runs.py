"""Helpers for tests that run the job: the repository's paths, a small slice of the bundled data,
and the environment a child process needs to import this checkout."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "lora_phi3" / "finetune" / "assets"


def bundled_subset(directory: Path, n_train: int, n_eval: int) -> str:
    """The first ``n_train`` bundled training and ``n_eval`` held-out conversations, written as
    ``train.jsonl``/``eval.jsonl`` in ``directory`` (small runs finish in seconds)."""
    for src, dst, n in (("chat_train.jsonl", "train.jsonl", n_train),
                        ("chat_eval.jsonl", "eval.jsonl", n_eval)):
        lines = (ASSETS / src).read_text().splitlines()[:n]
        (directory / dst).write_text("\n".join(lines) + "\n")
    return str(directory)


def child_env() -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH``, for subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def small_recipe(data: str, output_dir, **training):
    """A recipe for a quick run of the job on ``data``: batch 4, no evaluation during training,
    ``training`` overriding those and setting the rest (``max_steps``, ``save_steps``, ...)."""
    from lora_phi3.finetune import load_recipe

    return load_recipe(overrides={"data": data, "output_dir": str(output_dir),
                                  "training": {"eval_steps": 0, "batch_size": 4, **training}})
