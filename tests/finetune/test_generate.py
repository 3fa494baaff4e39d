"""Greedy chat generation against a hand-written greedy loop, and the job's held-out sample."""

from __future__ import annotations

import pytest
import torch

from lora_phi3.finetune.generate import generate_answer, sample_answer
from lora_phi3.finetune.models import load_model
from lora_phi3.finetune.tokenizer import END_OF_TURN_TOKEN


@pytest.fixture(scope="module")
def model(tok):
    return load_model(None, tokenizer=tok)


def _greedy(model, tok, messages, max_new_tokens):
    """Reference: argmax one token at a time, stopping at eos or the end-of-turn token."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN_TOKEN)}
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt in stop:
                break
    return tok.decode(new, skip_special_tokens=True).strip()


def test_generate_answer_is_greedy_decoding_and_keeps_the_mode(model, tok):
    messages = [{"role": "user", "content": "Reverse: a b c"}]
    model.train()
    got = generate_answer(model, tok, messages, max_new_tokens=6)
    assert model.training  # restored
    model.eval()
    assert got == _greedy(model, tok, messages, 6)


def test_sample_answer_takes_the_first_conversation_with_a_prompt(model, tok, monkeypatch):
    convs = [
        [{"role": "assistant", "content": "no prompt before me"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
         {"role": "assistant", "content": "a2"}],
    ]
    seen = []
    monkeypatch.setattr("lora_phi3.finetune.generate.generate_answer",
                        lambda m, t, prompt: seen.append(prompt) or "ANSWER")
    assert sample_answer(model, tok, convs) == {"prompt": "q2", "reference": "a2",
                                                "answer": "ANSWER"}
    assert seen == [convs[1][:4]]  # the conversation up to its last assistant turn
    assert sample_answer(model, tok, convs[:1]) is None
    assert sample_answer(model, tok, []) is None
