"""Greedy, chat-templated generation: ``lora-phi3 generate`` and the job's held-out sample."""

from __future__ import annotations

import torch
import torch.nn as nn

from .tokenizer import END_OF_TURN_TOKEN

__all__ = ["generate_answer", "sample_answer"]


def generate_answer(model: nn.Module, tokenizer, messages: list[dict], *,
                    max_new_tokens: int = 48) -> str:
    """Greedy chat-templated answer of ``model`` to ``messages`` (ending with a user turn).

    Generation stops at eos or at Phi-3's end-of-turn token; the model's train/eval mode is
    restored afterwards.
    """
    device = next(model.parameters()).device
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    stop = [tokenizer.eos_token_id]
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
        stop.append(end_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def sample_answer(model: nn.Module, tokenizer,
                  conversations: list[list[dict]]) -> dict[str, str] | None:
    """Answer the last user turn of the first held-out conversation that has one.

    Returns:
        ``{"prompt", "reference", "answer"}``, or None when no conversation has an assistant
        message after another message.
    """
    for conv in conversations:
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            continue
        prompt = conv[:last]
        answer = generate_answer(model, tokenizer, prompt)
        return {"prompt": prompt[-1]["content"], "reference": conv[last]["content"],
                "answer": answer}
    return None
