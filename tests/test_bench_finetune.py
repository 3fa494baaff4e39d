"""Smoke test of benchmarks/bench_finetune.py's Phi-3-mini-width mode (issue 11), shrunk: the
synthetic rows, and one short run of ours and transformers Trainer + PEFT on the same rows."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_finetune.py"
_spec = importlib.util.spec_from_file_location("bench_finetune", _PATH)
bf = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bf
_spec.loader.exec_module(bf)


def test_synthetic_chat_rows_are_chat_shaped_with_assistant_only_labels():
    rows = bf.synthetic_chat_rows(16, 512)
    assert rows == bf.synthetic_chat_rows(16, 512)  # same rows for every trainer
    for r in rows:
        ids, labels = r["input_ids"], r["labels"]
        assert 384 <= len(ids) == len(labels) <= 512 and max(ids) < bf.PHI3_VOCAB
        assert ids[:2] == [bf.USER_ID, bf.NEWLINE_ID] and ids[-3:] == [bf.END_ID, bf.NEWLINE_ID, bf.EOS_ID]
        start = ids.index(bf.ASSISTANT_ID) + 2  # after "<|assistant|>\n"
        assert all(y == -100 for y in labels[:start])
        assert labels[start:-2] == ids[start:-2] and labels[-2:] == [-100, bf.EOS_ID]
        assert 0.58 <= labels.count(-100) / len(ids) <= 0.72  # prompt share 0.60-0.70, rounded


SHRUNK = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 4}


@pytest.mark.skipif(not bf.have("peft"), reason="peft not installed")
def test_peers_get_the_wide_model_family():
    cfg = {"width": "phi3-mini", "model": {**bf.PHI3_MINI_WIDTH, **SHRUNK}, "r": 4, "alpha": 8.0,
           "dropout": 0.05}
    model = bf._lora_model(None, cfg)
    assert model.config.vocab_size == bf.PHI3_VOCAB and model.config.num_hidden_layers == 2
    assert model.config.initializer_range == 0.02


def test_wide_mode_runs_shrunk(tmp_path):
    """One short run of ours (the patched job) end to end; about 10 s of CPU."""
    out = tmp_path / "res.json"
    cmd = [sys.executable, str(_PATH), "--width", "phi3-mini", "--model-overrides",
           json.dumps(SHRUNK), "--quick", "--steps", "2", "--seq-len", "48", "--threads", "1",
           "--clock", "thread", "--runs", "ours-padded", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run = json.loads(out.read_text())["runs"]["ours-padded"][0]
    assert run["timed_steps"] == 1 and run["tokens"] == 2 * 48  # batch 2 rows of 48 tokens
    assert run["mean_loss"] == pytest.approx(math.log(bf.PHI3_VOCAB), abs=0.5)  # random init
