"""Run outputs: the output-dir guard, metrics.jsonl (append, torn lines, truncation on resume),
perplexity, peak memory, and standard JSON (null for NaN/inf) in every file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_phi3.finetune.reporting import (RUN_FILES, MetricsLog, check_output_dir, json_safe,
                                          peak_memory_bytes, perplexity, to_json,
                                          write_json)


def test_perplexity():
    assert perplexity(None) is None
    assert perplexity(0.0) == 1.0 and perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == float("inf")


def test_metrics_log_appends_reads_past_a_torn_line_and_truncates(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.read() == []
    for step in (0, 1, 2, 3):
        log.append({"type": "train", "step": step, "loss": 1.0 / (step + 1)})
    with open(log.path, "a") as f:
        f.write('{"type": "train", "st')  # a run killed mid-write
    assert [r["step"] for r in log.read()] == [0, 1, 2, 3]
    log.truncate_after(1)  # a resume from checkpoint-1 drops what came after it
    assert [r["step"] for r in log.read()] == [0, 1]
    assert log.path.read_text().endswith("\n") and json.loads(log.path.read_text().splitlines()[0])
    log.truncate_after(-1)  # a fresh start drops everything
    assert log.read() == []


def test_metrics_log_of_another_rank_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
    log.append({"step": 1})
    log.truncate_after(0)
    assert not log.path.exists()


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    check_output_dir(out, resume=False, overwrite=False)  # does not exist yet: fine
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me")
    check_output_dir(out, resume=False, overwrite=False)  # no run files: fine
    (out / "summary.json").write_text("{}")
    (out / "checkpoint-4").mkdir()
    (out / "adapter").mkdir()
    with pytest.raises(ValueError, match=r"--output-dir '.*run' already holds a run \(adapter, "
                                         r"checkpoint-4, summary.json\); pass --resume"):
        check_output_dir(out, resume=False, overwrite=False)
    check_output_dir(out, resume=True, overwrite=False)  # resuming keeps everything
    assert (out / "summary.json").exists()
    check_output_dir(out, resume=False, overwrite=True)  # removes the run's files, only those
    assert [p.name for p in out.iterdir()] == ["my_notes.txt"]
    assert "summary.json" in RUN_FILES and "metrics.jsonl" in RUN_FILES


def test_peak_memory_on_cpu_is_the_process_rss():
    peak, kind = peak_memory_bytes(torch.device("cpu"))
    assert kind == "cpu_max_rss" and peak > 10 * 2**20  # python + torch: well above 10 MiB


# -- standard JSON only ----------------------------------------------------------------------------
def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_safe_replaces_every_non_finite_float_by_none():
    import numpy as np

    nan, inf = float("nan"), float("inf")
    value = {"a": nan, "b": [1.5, -inf, {"c": inf}], "d": (2, np.float64("nan")), "e": "NaN",
             "f": None, "g": True, "h": 3}
    assert json_safe(value) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, None],
                                "e": "NaN", "f": None, "g": True, "h": 3}


def test_to_json_and_write_json_write_standard_json_only(tmp_path):
    doc = {"loss": float("nan"), "perplexity": float("inf"), "steps": 3}
    assert _strict(to_json(doc)) == {"loss": None, "perplexity": None, "steps": 3}
    write_json(tmp_path / "summary.json", doc)
    text = (tmp_path / "summary.json").read_text()
    assert _strict(text) == {"loss": None, "perplexity": None, "steps": 3} and text.endswith("}\n")


def test_metrics_log_writes_null_for_non_finite_numbers(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"type": "eval", "step": 1, "eval_loss": float("nan"),
                "eval_perplexity": float("inf")})
    log.append({"type": "train", "step": 2, "loss": 1.0, "grad_norm": float("-inf")})
    log.truncate_after(2)  # the rewrite is standard JSON too
    lines = log.path.read_text().splitlines()
    assert [_strict(x) for x in lines] == [
        {"type": "eval", "step": 1, "eval_loss": None, "eval_perplexity": None},
        {"type": "train", "step": 2, "loss": 1.0, "grad_norm": None}]
