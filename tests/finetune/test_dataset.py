"""A run's rows: loading, tokenising and packing chained as the recipe says."""

from __future__ import annotations

import json

import pytest

from lora_phi3.finetune.dataset import prepare_data
from lora_phi3.finetune.recipe import load_recipe


def _chats(path, n):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_packed_and_padded_rows_hold_the_same_examples(tmp_path, tok):
    data = _chats(tmp_path / "c.jsonl", 40)
    kw = {"data": data, "training": {"max_seq_length": 64, "eval_fraction": 0.25, "seed": 3}}
    padded = prepare_data(tok, load_recipe(overrides={**kw, "training": {**kw["training"],
                                                                         "packing": False}}))
    packed = prepare_data(tok, load_recipe(overrides=kw))
    assert len(padded.train_rows) == 30 and len(padded.eval_rows) == 10
    assert len(padded.eval_conversations) == 10 and padded.report.kept == 40
    assert len(packed.train_rows) < len(padded.train_rows)
    assert all(len(r["input_ids"]) <= 64 for r in packed.train_rows)
    # packing concatenates the same examples in the same order
    flat = [t for r in padded.train_rows for t in r["input_ids"]]
    assert [t for r in packed.train_rows for t in r["input_ids"]] == flat
    assert sum(sum(r["seq_lens"]) for r in packed.train_rows) == len(flat)


def test_nothing_fits_names_the_limit_and_the_counts(tmp_path, tok):
    data = _chats(tmp_path / "c.jsonl", 6)
    recipe = load_recipe(overrides={"data": data, "training": {"max_seq_length": 4}})
    with pytest.raises(ValueError, match=r"no training example fits max_seq_length 4 \(.*c.jsonl: "
                                         r"read 6, kept 0, skipped 6 \(6 too long\)\)"):
        prepare_data(tok, recipe)
