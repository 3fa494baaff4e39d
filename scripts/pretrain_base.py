"""Pretrain the embedded tiny Phi-3 base (``tiny_phi3_base.safetensors``), for make_assets.py.

The base is a plain language model trained from scratch on documents of toy-task text in a
``Q:`` / ``A:`` layout (``Q:\nReverse: k v s\nA:\ns v k``): it learns the
tokenizer's text and the operations behind the chat tasks, never Phi-3's chat template, system
prompts or the ``<|end|>`` that closes an answer. Those are what the LoRA fine-tune of
``lora-phi3 finetune`` then teaches.

Reproducible: the documents come from a seeded ``random.Random`` and the weights from a seeded
torch generator, and training runs on one thread, so the result is bit-identical on the same CPU
type and library versions (another CPU may round differently in the last bits).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save

from lora_phi3.atomic import write_bytes_atomic
from lora_phi3.finetune.models import TINY_BASE_FILE, build_tiny_phi3

STEPS = 2400        # ~35 minutes on one CPU core (1200 gave a base with 31-62% at add/sub/reverse)
BATCH = 16          # rows per step
SEQ_LEN = 256       # tokens per row (documents packed back to back, eos between them)
LR = 3e-3           # AdamW peak; linear warm-up, cosine decay to LR / 10
WARMUP = 100
SEED = 1234
THREADS = 1


def _rows(tok, make_doc: Callable[[random.Random], list[str]], rng: random.Random):
    """Endless ``(SEQ_LEN + 1)``-token windows of documents separated by eos."""
    buf: list[int] = []
    while True:
        while len(buf) < SEQ_LEN + 1:
            text = "\n\n".join(make_doc(rng)) + "\n"  # a blank line between conversations
            buf += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        yield buf[:SEQ_LEN + 1]
        buf = buf[SEQ_LEN + 1:]


def pretrain(tok, make_doc: Callable[[random.Random], list[str]], *, steps: int = STEPS,
             seed: int = SEED, log: Callable[[str], None] = print) -> torch.nn.Module:
    """Train the tiny Phi-3 (sizes: ``models.TINY_PHI3``) as a causal LM on ``make_doc`` text."""
    torch.set_num_threads(THREADS)
    model = build_tiny_phi3(len(tok), seed=seed, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.01)
    rows = _rows(tok, make_doc, random.Random(seed))
    start = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / WARMUP)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = LR * warm * decay
        batch = torch.tensor([next(rows) for _ in range(BATCH)])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  pretrain step {step + 1}/{steps}: loss {loss.item():.3f} "
                f"({time.time() - start:.0f} s)")
    model.eval()
    return model


@torch.no_grad()
def base_layout_accuracy(model, tok, examples: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Greedy exact match per task of ``(prompt, answer)`` completions in the base's own layout
    (the answer is the generated text up to the end of its line)."""
    out = {}
    for name, pairs in examples.items():
        tok.padding_side = "left"
        enc = tok([p for p, _ in pairs], add_special_tokens=False, padding=True,
                  return_tensors="pt")
        tok.padding_side = "right"
        gen = model.generate(**enc, max_new_tokens=24, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits = [t.split("\n")[0].strip() == answer for t, (_, answer) in zip(texts, pairs)]
        out[name] = sum(hits) / len(hits)
    return out


def save_base(model, path: Path, info: dict) -> None:
    """Write the weights in bf16 (half the bytes; the job computes in its own dtype) with the
    config and how they were made in the safetensors metadata."""
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "lora_phi3.tiny_phi3_base/1", "config": model.config.to_json_string(use_diff=False),
            "pretraining": json.dumps(info, sort_keys=True)}
    write_bytes_atomic(path, save(tensors, metadata=meta))


__all__ = ["pretrain", "base_layout_accuracy", "save_base", "TINY_BASE_FILE"]
