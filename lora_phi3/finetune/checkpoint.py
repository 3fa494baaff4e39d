"""Training checkpoints: atomic write, rotation, discovery of the newest complete one, RNG states.

A checkpoint is ``<output-dir>/checkpoint-<step>/`` holding

* the adapter (``save_adapter`` files, so the directory also works as an ``--adapter``),
* ``optimizer.pt`` and ``scheduler.pt`` (state dicts, loaded with ``weights_only=True``),
* ``rng_state_<rank>.pt``: torch (and CUDA) generators, Python ``random`` and NumPy, as plain
  tensors and numbers so that ``weights_only`` loading works (no pickled objects),
* ``trainer_state.json``: step, data position and the running totals,
* ``complete``: an empty marker written last.

Everything is written into a hidden temporary directory next to the final one, which is then
renamed (:func:`lora_phi3.atomic.atomic_dir`): a ``kill -9`` at any moment leaves either no
checkpoint or a complete one. A full disk raises :class:`lora_phi3.atomic.DiskFullError` with the
checkpoint's size; the older checkpoints are untouched (rotation runs only after a save succeeded).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import DiskFullError, atomic_dir, write_synced

logger = logging.getLogger(__name__)

__all__ = ["capture_rng_state", "restore_rng_state", "save_checkpoint", "find_latest_checkpoint",
           "list_checkpoints", "resolve_resume", "rotate_checkpoints", "clean_partial_checkpoints",
           "load_training_state",
           "COMPLETE_MARKER", "STATE_FILE", "TMP_PREFIX"]

COMPLETE_MARKER = "complete"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Name prefix of a checkpoint being written; what a killed run leaves is removed on start.
TMP_PREFIX = ".tmp-checkpoint-"


# -- RNG states as weights_only-loadable data ----------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training run may draw from, as tensors/ints/floats only."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- discovery -----------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None. Incomplete ones (no marker) are ignored."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: str | os.PathLike, resume: bool | str) -> Path | None:
    """The checkpoint a run continues from.

    Args:
        output_dir: the run directory.
        resume: False (start fresh), True or ``"latest"`` (the newest complete checkpoint in
            ``output_dir``; None with a warning when there is none), or a checkpoint directory.

    Raises:
        ValueError: ``resume`` names a directory that does not exist.
    """
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("latest", "true", "True"):
        p = Path(resume)
        if not p.is_dir():
            raise ValueError(f"--resume: checkpoint directory {resume!r} does not exist")
        return p
    found = find_latest_checkpoint(output_dir)
    if found is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from scratch", output_dir)
    return found


def _remove_checkpoint(path: Path) -> None:
    # The marker goes first, so an interrupted removal never leaves a "complete" partial checkpoint.
    marker = path / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
    shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``save_total_limit`` (None/0 keeps all).

    Returns:
        The removed paths.
    """
    if not save_total_limit:
        return []
    found = list_checkpoints(output_dir)
    removed = [p for _, p in found[:-save_total_limit]]
    for p in removed:
        _remove_checkpoint(p)
        logger.info("removed old checkpoint %s (save_total_limit=%d)", p.name, save_total_limit)
    return removed


def clean_partial_checkpoints(output_dir: str | os.PathLike) -> None:
    """Remove temporary directories left by a run killed while writing a checkpoint."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


# -- write / read --------------------------------------------------------------------------------
def save_checkpoint(output_dir: str | os.PathLike, step: int, *,
                    write_adapter: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer | dict[str, Any],
                    scheduler: Any,
                    rng_states: list[dict[str, Any]],
                    trainer_state: dict[str, Any],
                    save_total_limit: int | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically, then rotate old ones.

    Args:
        output_dir: the run directory.
        step: optimizer steps done.
        write_adapter: writes the adapter files into the directory it is given.
        optimizer, scheduler: their ``state_dict()`` is saved with ``torch.save`` (``optimizer``
            may be that state dict already: FSDP2 gathers it first).
        rng_states: one :func:`capture_rng_state` dict per rank (index = rank).
        trainer_state: JSON-serialisable loop state (step, data position, totals).
        save_total_limit: keep at most this many checkpoints (None/0: all).

    Returns:
        The final checkpoint path.

    Raises:
        DiskFullError: the disk filled up; ``needed`` is the whole checkpoint's size. Nothing was
            changed: no temp directory is left, and an existing ``checkpoint-<step>`` is kept.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    # Serialised in memory first (torch.save on a full disk fails with a RuntimeError that names
    # neither the file nor the cause), so every byte goes through write_synced, and the size of
    # what is still to be written is known if the disk fills up.
    optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    files = [("optimizer.pt", _torch_bytes(optimizer_state)),
             ("scheduler.pt", _torch_bytes(scheduler.state_dict())),
             *((f"rng_state_{rank}.pt", _torch_bytes(st)) for rank, st in enumerate(rng_states)),
             (STATE_FILE, (json.dumps(trainer_state, indent=2, sort_keys=True) + "\n").encode()),
             (COMPLETE_MARKER, b"")]
    not_started, adapter_written = sum(len(data) for _, data in files), False
    try:
        # replace: a run re-saving a step keeps the old checkpoint until the new one is whole
        with atomic_dir(final, prefix=f"{TMP_PREFIX}{step}-", replace=True) as tmp:
            write_adapter(tmp)
            adapter_written = True
            for name, data in files:
                not_started -= len(data)
                write_synced(tmp / name, data)
    except DiskFullError as e:  # e.needed: what was written plus the write that failed
        # exact unless write_adapter failed with a bare OSError (then its partial file was counted)
        exact = adapter_written or isinstance(e.__cause__, DiskFullError)
        raise DiskFullError(final, e.needed + not_started, code=e.errno, at_least=not exact,
                            unchanged=True) from e
    logger.info("saved checkpoint %s", final)
    rotate_checkpoints(root, save_total_limit)
    return final


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         path: str | os.PathLike) -> None:
    """Restore ``optimizer`` from a checkpoint's ``state``, refusing one whose parameter groups
    differ in number or size (e.g. written with another ``--loraplus-lr-ratio``) with a message
    that says so, instead of torch's bare one.

    Raises:
        ValueError: the groups do not match; ``optimizer`` is left untouched.
    """
    have = [len(g["params"]) for g in optimizer.param_groups]
    saved = [len(g["params"]) for g in state.get("param_groups", [])]
    if have != saved:
        raise ValueError(f"--resume: {path} holds an optimizer with parameter groups of sizes "
                         f"{saved}, this run has {have}; resume with the same LoRA targets and "
                         "the same --loraplus-lr-ratio (on or off) as the run that wrote it")
    optimizer.load_state_dict(state)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_training_state(path: str | os.PathLike, rank: int = 0, *,
                        map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the non-adapter parts of a checkpoint.

    Returns:
        ``{"optimizer": state_dict, "scheduler": state_dict, "rng": rng_state, "trainer_state":
        dict}``; ``rng`` is the given rank's (rank 0's if this rank has none, e.g. a changed
        world size).

    Raises:
        ValueError: ``path`` is not a complete checkpoint.
    """
    p = Path(path)
    if not (p / COMPLETE_MARKER).is_file():
        raise ValueError(f"{p} is not a complete checkpoint (no {COMPLETE_MARKER!r} marker)")
    rng_file = p / f"rng_state_{rank}.pt"
    if not rng_file.exists():
        rng_file = p / "rng_state_0.pt"
    return {
        "optimizer": torch.load(p / "optimizer.pt", map_location=map_location, weights_only=True),
        "scheduler": torch.load(p / "scheduler.pt", weights_only=True),
        "rng": torch.load(rng_file, weights_only=True),
        "trainer_state": json.loads((p / STATE_FILE).read_text()),
    }
