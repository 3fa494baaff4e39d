"""Chat data: loading and validating conversations from files, directories or HF datasets.

Every source becomes a list of conversations, each ``[{"role", "content"}, ...]``, plus a
:class:`DataReport` saying what was read, kept and skipped, and where each kept row came from
(``file:line``). Tokenising them is :mod:`.data`'s job; see docs/data.md for the formats.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["load_conversations", "DataReport", "check_on_bad_row", "ALLOWED_ROLES",
           "ON_BAD_ROW_CHOICES", "BUNDLED_TRAIN", "BUNDLED_EVAL"]

ALLOWED_ROLES = ("system", "user", "assistant")
ON_BAD_ROW_CHOICES = ("skip", "error")
BUNDLED_TRAIN = "chat_train.jsonl"
BUNDLED_EVAL = "chat_eval.jsonl"
_EVAL_NAMES = ("eval", "validation", "valid", "test")
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or lone \u escapes


@dataclass
class DataReport:
    """What happened to the rows of a data source. Invariant: ``rows_read == kept + skipped``.

    ``problems`` holds one ``"file:line: message"`` string per skipped row; ``too_long``
    counts the skipped rows that were too long (from :func:`.data.tokenize_dataset`).
    ``train_locations``/``eval_locations`` name the file:line of each returned conversation;
    ``task_of`` maps a location to its row's optional ``"task"`` label (a string), which accuracy
    reports break down by.
    """

    source: str = ""
    rows_read: int = 0
    kept: int = 0
    skipped: int = 0
    too_long: int = 0
    problems: list[str] = field(default_factory=list)
    train_locations: list[str] = field(default_factory=list, repr=False)
    eval_locations: list[str] = field(default_factory=list, repr=False)
    task_of: dict[str, str] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """One line for logs, e.g. ``data.jsonl: read 120, kept 117, skipped 3 (1 too long)``."""
        return (f"{self.source}: read {self.rows_read}, kept {self.kept}, skipped {self.skipped} "
                f"({self.too_long} too long)")

    def bad_row(self, on_bad_row: str, location: str, message: str) -> None:
        """Raise (``on_bad_row="error"``) or log, count and record (``"skip"``) one bad row.

        Raises:
            ValueError: ``"location: message"``, with ``on_bad_row="error"``.
        """
        text = f"{location}: {message}"
        if on_bad_row == "error":
            raise ValueError(text)
        logger.warning("%s (row skipped)", text)
        self.problems.append(text)
        self.skipped += 1


def check_on_bad_row(on_bad_row: str) -> None:
    """Raise ValueError unless ``on_bad_row`` is one of :data:`ON_BAD_ROW_CHOICES`."""
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")


class _RowError(Exception):
    """Internal: a row is unusable; the message names the problem (no location)."""


# --------------------------------------------------------------------------- row validation

def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"{what} must be a string, got {type(value).__name__}")
    if _SURROGATE.search(value):
        raise _RowError(f"{what} is not valid UTF-8 text")
    return value


def _to_messages(row: Any) -> list[dict]:
    """Normalise one row (``{"messages": [...]}`` or Alpaca) to ``[{"role", "content"}, ...]``."""
    if not isinstance(row, dict):
        raise _RowError(f"row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list):
            raise _RowError(f"'messages' must be a list, got {type(msgs).__name__}")
        if not msgs:
            raise _RowError("empty conversation ('messages' is empty)")
        out = []
        for i, m in enumerate(msgs, 1):
            if not isinstance(m, dict):
                raise _RowError(f"message {i} must be an object with 'role' and 'content', "
                                f"got {type(m).__name__}")
            missing = [k for k in ("role", "content") if k not in m]
            if missing:
                raise _RowError(f"message {i} is missing field {missing[0]!r}")
            if m["role"] not in ALLOWED_ROLES:
                raise _RowError(f"message {i} has unknown role {m['role']!r} "
                                f"(allowed: {', '.join(ALLOWED_ROLES)})")
            out.append({"role": m["role"], "content": _check_text(m["content"], f"message {i} content")})
        if not any(m["role"] == "assistant" for m in out):
            raise _RowError("conversation has no assistant message")
        return out
    if "instruction" in row or "output" in row:
        for key in ("instruction", "output"):
            if key not in row:
                raise _RowError(f"Alpaca row is missing field {key!r}")
        instruction = _check_text(row["instruction"], "Alpaca field 'instruction'")
        output = _check_text(row["output"], "Alpaca field 'output'")
        extra = row.get("input")
        if extra is not None:
            extra = _check_text(extra, "Alpaca field 'input'")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise _RowError("row has neither 'messages' nor Alpaca 'instruction'/'output' fields "
                    f"(keys: {sorted(row)})")


# --------------------------------------------------------------------------- file readers

def _jsonl_rows(path: Path, name: str, report: DataReport, on_bad_row: str):
    """Yield ``(location, parsed_row)``; undecodable or unparsable lines are bad rows."""
    with open(path, "rb") as f:  # bytes, so a bad byte is reported with its own line number
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            if not raw.strip():
                continue  # blank lines are not rows
            report.rows_read += 1
            loc = f"{name}:{lineno}"
            try:
                text = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as e:
                report.bad_row(on_bad_row, loc,
                         f"line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            try:
                yield loc, json.loads(text)
            except json.JSONDecodeError as e:
                report.bad_row(on_bad_row, loc, f"invalid JSON: {e.msg} at column {e.colno}")


def _json_list_rows(path: Path, name: str, report: DataReport):
    """Yield ``(location, row)`` for each element of a top-level JSON array, located by line.

    A syntax error makes the whole document unreadable, so it always raises ValueError.
    Undecodable bytes are kept as surrogates and flagged per row by :func:`_check_text`.
    """
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    try:
        if text[pos:pos + 1] != "[":
            raise json.JSONDecodeError("expected '['", text, pos)
        pos = ws.match(text, pos + 1).end()
        if text[pos:pos + 1] == "]":
            return
        while True:
            line = text.count("\n", 0, pos) + 1
            row, pos = decoder.raw_decode(text, pos)
            report.rows_read += 1
            yield f"{name}:{line}", row
            pos = ws.match(text, pos).end()
            sep = text[pos:pos + 1]
            if sep == "]":
                return
            if sep != ",":
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
            pos = ws.match(text, pos + 1).end()
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno} "
                         "(a JSON list file cannot be read partially)") from None


def _read_file(path: Path, report: DataReport, on_bad_row: str) -> tuple[list[list[dict]], list[str]]:
    """Read a ``.json`` (list) or JSON Lines file; format chosen by its first non-blank byte."""
    name = path.name
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    rows = (_json_list_rows(path, name, report) if head.startswith(b"[")
            else _jsonl_rows(path, name, report, on_bad_row))
    return _conversations(rows, report, on_bad_row)


def _conversations(rows, report: DataReport, on_bad_row: str) -> tuple[list[list[dict]], list[str]]:
    """Validate ``(location, row)`` pairs into conversations and their locations; bad rows are
    skipped (and counted) or raised according to ``on_bad_row``."""
    convs, locs = [], []
    for loc, row in rows:
        try:
            convs.append(_to_messages(row))
        except _RowError as e:
            report.bad_row(on_bad_row, loc, str(e))
            continue
        locs.append(loc)
        if isinstance(row.get("task"), str):
            report.task_of[loc] = row["task"]
    return convs, locs


def _read_hf(source: str, report: DataReport, on_bad_row: str):
    """Load a Hugging Face dataset (``load_from_disk`` directory or ``load_dataset`` name)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data source {source!r} is not a .json/.jsonl file or a directory with train.jsonl; "
            "loading it as a Hugging Face dataset needs the `datasets` package: "
            "pip install datasets  (or pip install 'lora-phi3[data]')") from None
    p = Path(source)
    if p.is_dir() and any((p / f).exists() for f in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(source)
    else:
        ds = datasets.load_dataset(source)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"dataset {source!r} has no 'train' split (splits: {list(ds)})")
        splits = {"train": ds["train"]}
        for s in _EVAL_NAMES:
            if s in ds:
                splits["eval"] = ds[s]
                break
    else:
        splits = {"train": ds}
    out = {}
    for key, split in splits.items():
        report.rows_read += len(split)
        out[key] = _conversations(((f"{source}[{key}]:row {i}", row) for i, row in enumerate(split)),
                                  report, on_bad_row)
    return out


def _find_split_file(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for ext in (".jsonl", ".json"):
            if (directory / f"{stem}{ext}").is_file():
                return directory / f"{stem}{ext}"
    return None


def _random_split(convs, locs, eval_fraction: float, seed: int):
    n = len(convs)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n_eval == 0 and n > 1:
        n_eval = 1
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [i for i in range(n) if i not in chosen]
    held = sorted(chosen)
    return ([convs[i] for i in train], [locs[i] for i in train],
            [convs[i] for i in held], [locs[i] for i in held])


def load_conversations(
    source: str | os.PathLike | None,
    *,
    on_bad_row: str = "skip",
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[list[dict]], list[list[dict]], DataReport]:
    """Load, validate and split chat conversations.

    Args:
        source: ``None`` for the bundled toy set (its fixed held-out file is the eval
            split; ``eval_fraction``/``seed`` are ignored); a ``.jsonl``/``.json`` file of
            ``{"messages": [...]}`` or Alpaca rows; a directory with ``train.jsonl`` (and
            optionally ``eval``/``validation``/``valid``/``test`` ``.jsonl``); or anything
            else is loaded with Hugging Face ``datasets`` (must be installed).
        on_bad_row: ``"skip"`` (warn, count, continue) or ``"error"`` (raise).
        eval_fraction: share of rows held out when the source has no eval split, in [0, 1).
        seed: seed of that held-out split (numpy ``default_rng``).

    Returns:
        ``(train, eval, report)``; each conversation is a list of ``{"role", "content"}``.

    Raises:
        ValueError: bad ``on_bad_row``/``eval_fraction``, a missing file, a bad row with
            ``on_bad_row="error"`` (message ``file:line: problem``), no usable rows, or
            ``datasets`` needed but not installed.
    """
    check_on_bad_row(on_bad_row)
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
            or not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
    report = DataReport(source="<bundled>" if source is None else str(source))
    eval_file: Path | None = None
    if source is None:
        assets = resources.files("lora_phi3.finetune").joinpath("assets")
        train_file = Path(str(assets.joinpath(BUNDLED_TRAIN)))
        eval_file = Path(str(assets.joinpath(BUNDLED_EVAL)))
    else:
        path = Path(source)
        if path.is_file():
            train_file = path
        elif path.is_dir() and _find_split_file(path, ("train",)) is not None:
            train_file = _find_split_file(path, ("train",))
            eval_file = _find_split_file(path, _EVAL_NAMES)
        elif path.suffix.lower() in (".json", ".jsonl"):
            raise ValueError(f"data file {str(source)!r} does not exist")
        else:
            train_file = None
    if train_file is not None:
        train, train_locs = _read_file(train_file, report, on_bad_row)
        if eval_file is not None:
            evals, eval_locs = _read_file(eval_file, report, on_bad_row)
        else:
            train, train_locs, evals, eval_locs = _random_split(train, train_locs, eval_fraction, seed)
    else:
        splits = _read_hf(str(source), report, on_bad_row)
        train, train_locs = splits["train"]
        if "eval" in splits:
            evals, eval_locs = splits["eval"]
        else:
            train, train_locs, evals, eval_locs = _random_split(train, train_locs, eval_fraction, seed)
    report.kept = len(train) + len(evals)
    report.train_locations, report.eval_locations = train_locs, eval_locs
    if not train:
        raise ValueError(f"data source {report.source!r} has no usable training conversations "
                         f"({report.rows_read} rows read, {report.skipped} skipped)")
    logger.info("%s (train %d, eval %d)", report.summary(), len(train), len(evals))
    return train, evals, report
