"""Run outputs besides checkpoints: ``metrics.jsonl``, ``summary.json`` and what the log prints.

Only the main process (rank 0) calls these. Files are replaced atomically (``lora_phi3.atomic``);
``metrics.jsonl`` is append-only.

Every JSON document the job writes goes through :func:`to_json`: standard JSON only, with
``null`` where a number is NaN or infinite (Python's ``json`` would write bare ``NaN`` and
``Infinity``, which ``jq`` and strict parsers reject).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

__all__ = ["RUN_FILES", "check_output_dir", "MetricsLog", "peak_memory_bytes", "perplexity",
           "json_safe", "to_json", "write_json", "fmt_loss", "fmt_accuracy"]


#: What a run writes into its output dir besides ``checkpoint-<step>/`` (``--overwrite-output-dir``
#: removes exactly these and the checkpoints).
#: (``loss_curve.png`` is what runs before the SVG plot wrote.)
RUN_FILES = ("adapter", "summary.json", "metrics.jsonl", "loss_curve.svg", "loss_curve.png",
             "recipe.json")


def check_output_dir(out: Path, resume: bool | str, overwrite: bool) -> None:
    """Make sure a new run may write into ``out``.

    A directory holding another run's files is accepted when resuming, emptied of them with
    ``overwrite``, and refused otherwise.

    Raises:
        ValueError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    existing = [p.name for p in out.iterdir()] if out.is_dir() else []
    ours = [n for n in existing if n in RUN_FILES or n.startswith("checkpoint-")]
    if not ours or resume:
        return
    if overwrite:
        for n in ours:
            p = out / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    raise ValueError(f"--output-dir {str(out)!r} already holds a run ({', '.join(sorted(ours)[:4])}); "
                     "pass --resume to continue it, --overwrite-output-dir to replace it, or choose "
                     "another --output-dir")


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (also in nested dicts and lists;
    tuples become lists, as in JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any, *, indent: int | None = None) -> str:
    """``value`` as key-sorted standard JSON, non-finite numbers as ``null`` (:func:`json_safe`).

    ``allow_nan=False`` backs the sanitiser up: a ``NaN`` it missed raises instead of being written.
    """
    return json.dumps(json_safe(value), indent=indent, sort_keys=True, allow_nan=False)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Replace ``path`` atomically by ``value`` as indented :func:`to_json`."""
    write_bytes_atomic(path, (to_json(value, indent=2) + "\n").encode())


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)``, ``inf`` on overflow, None for None."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class MetricsLog:
    """Append-only JSON Lines log of training and evaluation records.

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: False on non-main ranks (nothing is written).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(to_json(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        """All records; a torn last line (a killed run) is ignored."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written by a run that was later resumed)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        write_bytes_atomic(self.path, "".join(to_json(r) + "\n" for r in keep).encode())


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory of this process and what it measures.

    Returns:
        ``(bytes, kind)``: ``torch.cuda.max_memory_allocated`` on CUDA (``"cuda_max_allocated"``),
        else the process's peak resident set size (``"cpu_max_rss"``, includes Python and libs).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_max_rss"


def fmt_accuracy(report: Any) -> str:
    """An accuracy report for the log: ``71.5% (143/200)``, or ``n/a`` when nothing was scored."""
    if report is None or report.accuracy is None:
        return "n/a"
    return f"{100 * report.accuracy:.1f}% ({report.correct}/{report.total})"


def fmt_loss(x: float | None) -> str:
    """A loss or perplexity for the log: 4 decimals, or ``n/a`` when there is none."""
    return "n/a" if x is None else f"{x:.4f}"
