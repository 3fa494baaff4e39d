"""Exact-match accuracy: which turn is scored, how answers are compared and counted per task, and
that batched left-padded generation gives the answers one-by-one generation gives."""

from __future__ import annotations

import pytest

from lora_phi3.finetune import accuracy as acc_mod
from lora_phi3.finetune.accuracy import AccuracyReport, exact_match_accuracy
from lora_phi3.finetune.generate import generate_answer
from lora_phi3.finetune.models import build_tiny_phi3


def _chat(q: str, a: str, *, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


@pytest.fixture
def fixed_answers(monkeypatch):
    """Replace generation by a table of answers keyed by the last user message."""
    table: dict[str, str] = {}

    def fake(model, tokenizer, prompts, max_new_tokens):
        return [table[p[-1]["content"]] for p in prompts]

    monkeypatch.setattr(acc_mod, "generate_answers", fake)
    return table


def test_counts_exact_matches_overall_and_per_task(fixed_answers):
    convs = [_chat("q1", "x b s"), _chat("q2", "42"), _chat("q3", "Paris"), _chat("q4", "7")]
    fixed_answers.update({"q1": "x b s", "q2": "41", "q3": "  Paris ", "q4": "7 7"})
    report = exact_match_accuracy(None, None, convs, tasks=["reverse", "add", "capital", "add"],
                                  max_new_tokens=8)
    assert (report.correct, report.total) == (2, 4)  # surrounding whitespace does not count
    assert report.accuracy == 0.5
    assert report.per_task == {"add": 0.0, "capital": 1.0, "reverse": 1.0}
    assert [s["correct"] for s in report.samples] == [True, False, True, False]
    assert report.samples[1] == {"prompt": "q2", "reference": "42", "answer": "41",
                                 "correct": False, "task": "add"}


def test_the_last_assistant_turn_is_scored_with_the_reference_history(monkeypatch):
    seen = []

    def fake(model, tokenizer, prompts, max_new_tokens):
        seen.extend(prompts)
        return ["6"] * len(prompts)

    monkeypatch.setattr(acc_mod, "generate_answers", fake)
    conv = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Add 1 to that."}, {"role": "assistant", "content": "6"}]
    only_assistant = [{"role": "assistant", "content": "hi"}]  # nothing to answer: skipped
    report = exact_match_accuracy(None, None, [conv, only_assistant], max_new_tokens=8)
    assert seen == [conv[:3]] and report.total == 1 and report.accuracy == 1.0
    assert report.per_task == {}  # no labels, no breakdown
    assert exact_match_accuracy(None, None, [only_assistant]).accuracy is None  # nothing generated


def test_reports_merge_from_samples():
    a = {"prompt": "p", "reference": "r", "answer": "r", "correct": True, "task": "t"}
    b = {**a, "answer": "x", "correct": False, "task": "u"}
    merged = AccuracyReport.from_samples([a, b, a])
    assert (merged.correct, merged.total) == (2, 3)
    assert merged.per_task == {"t": 1.0, "u": 0.0}


@pytest.mark.parametrize("kwargs, pattern", [
    ({"tasks": ["a"]}, "one label per conversation: 1 labels for 2 conversations"),
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"batch_size": None}, "batch_size must be a positive int, got None"),
    ({"max_new_tokens": True}, "max_new_tokens must be a positive int, got True"),
])
def test_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        exact_match_accuracy(None, None, [_chat("q", "a"), _chat("q2", "b")], **kwargs)


def test_batched_left_padded_generation_equals_one_by_one(tok):
    # Prompts of very different lengths, so the batch is padded on the left by many tokens.
    model = build_tiny_phi3(len(tok), num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                            num_attention_heads=4, num_key_value_heads=2,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            seed=3, initializer_range=0.2)
    convs = [_chat("Reverse: a b", "b a"),
             _chat("Sort these letters: q w e r t y u i o p", "e i o p q r t u w y",
                   system="You are a precise assistant."),
             _chat("Capital of France?", "Paris")]
    report = exact_match_accuracy(model, tok, convs, batch_size=3, max_new_tokens=12)
    one_by_one = [generate_answer(model, tok, c[:-1], max_new_tokens=12) for c in convs]
    assert [s["answer"] for s in report.samples] == one_by_one
    assert any(a for a in one_by_one)  # the random model does say something
    assert report.correct == sum(a == c[-1]["content"] for a, c in zip(one_by_one, convs))
    model.train()
    exact_match_accuracy(model, tok, convs[:1], max_new_tokens=2)
    assert model.training and tok.padding_side == "right"  # both restored
