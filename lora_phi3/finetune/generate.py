"""Greedy, chat-templated generation: ``lora-phi3 generate`` and the job's held-out sample."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .tokenizer import END_OF_TURN_TOKEN

__all__ = ["generate_answer", "generate_answers", "sample_answer", "scored_turn", "stop_token_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: eos, and Phi-3's end-of-turn token when the vocabulary has it."""
    stop = [tokenizer.eos_token_id]
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id and end_id not in stop:
        stop.append(end_id)
    return stop


def generate_answer(model: nn.Module, tokenizer, messages: list[dict], *,
                    max_new_tokens: int = 48) -> str:
    """Greedy chat-templated answer of ``model`` to ``messages`` (ending with a user turn).

    Generation stops at eos or at Phi-3's end-of-turn token; the model's train/eval mode is
    restored afterwards.
    """
    return generate_answers(model, tokenizer, [messages], max_new_tokens=max_new_tokens)[0]


def generate_answers(model: nn.Module, tokenizer, prompts: Sequence[list[dict]], *,
                     max_new_tokens: int = 48) -> list[str]:
    """Greedy chat-templated answers to several prompts, generated together (left-padded).

    Each answer ends before its first stop token (eos, Phi-3's end of turn) and is stripped; the
    model's train/eval mode and the tokenizer's padding side are restored afterwards.
    """
    texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends at the right end of every row
    try:
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    enc = enc.to(next(model.parameters()).device)
    stop = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # use_cache: generation keeps its KV cache whatever the training config says
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                                 use_cache=True)
    finally:
        model.train(was_training)
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def scored_turn(conversation: Sequence[dict]) -> tuple[list[dict], str] | None:
    """``(prompt messages, reference)`` for a conversation's last assistant turn, or None when it
    has no assistant message after another message."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        return None
    return list(conversation[:last]), conversation[last]["content"]


def sample_answer(model: nn.Module, tokenizer,
                  conversations: list[list[dict]]) -> dict[str, str] | None:
    """Answer the last user turn of the first held-out conversation that has one.

    Returns:
        ``{"prompt", "reference", "answer"}``, or None when no conversation has an assistant
        message after another message.
    """
    for conv in conversations:
        turn = scored_turn(conv)
        if turn is None:
            continue
        prompt, reference = turn
        answer = generate_answer(model, tokenizer, prompt)
        return {"prompt": prompt[-1]["content"], "reference": reference, "answer": answer}
    return None
