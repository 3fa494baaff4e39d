"""Regenerate the shipped assets in ``lora_phi3/finetune/assets/`` (deterministic).

Writes:
  * ``chat_train.jsonl`` / ``chat_eval.jsonl``: the bundled toy chat instruction set
    (``{"task": ..., "messages": [...]}`` per line). The eval file is a fixed held-out
    split: different random draws, and no conversation in it also occurs in train.
  * ``tokenizer.json``: a tiny byte-level BPE (``tokenizers`` library) trained on the
    message contents of the training file and on pretraining text, with Phi-3's chat special
    tokens.
  * ``tiny_phi3_base.safetensors``: the embedded tiny Phi-3, pretrained from scratch as a plain
    language model on the tasks' text in another layout, ``Q:`` / ``A:`` lines each followed by
    its message (``scripts/pretrain_base.py``, about 35 minutes on one CPU core). Phi-3's chat template,
    system prompts and ending an answer with ``<|end|>`` are left for the LoRA fine-tune to teach,
    so the base answers no held-out chat right and the tuned model most.

Every task is deterministic and short. Letters are separated by spaces and digits are split
individually by the tokenizer, so that reversing/sorting/adding work token by token.

Usage: ``python scripts/make_assets.py [--out lora_phi3/finetune/assets] [--skip-base]``.
Running it twice gives byte-identical data and tokenizer files, and a byte-identical base on the
same machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from transformers import PreTrainedTokenizerFast

from lora_phi3.atomic import write_bytes_atomic
from lora_phi3.finetune.tokenizer import PHI3_SPECIAL_TOKENS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when imported by path
from pretrain_base import (BATCH, LR, SEQ_LEN, STEPS, TINY_BASE_FILE,  # noqa: E402
                           base_layout_accuracy, pretrain, save_base)

# Order fixes the ids: <|endoftext|> = 0, <|system|> = 1, ...
SPECIAL_TOKENS = list(PHI3_SPECIAL_TOKENS)
VOCAB_SIZE = 1024
N_TRAIN = 2000
N_EVAL = 200
TRAIN_SEED = 20240611
EVAL_SEED = 977
PRETRAIN_SEED = 1234

WORDS = (
    "cat dog sun moon tree river stone bird fish red blue green book lamp door hat cup milk "
    "rain snow wind fire apple grape lemon bread chair table cloud star sand road ship king "
    "queen horse mouse bell ring gold"
).split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Russia": "Moscow",
    "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Cuba": "Havana", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Turkey": "Ankara",
}

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("left", "right"), ("fast", "slow"),
    ("day", "night"), ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("wet", "dry"),
    ("full", "empty"), ("early", "late"), ("high", "low"), ("hard", "soft"), ("in", "out"),
    ("yes", "no"), ("win", "lose"), ("first", "last"), ("near", "far"), ("old", "new"),
]

SYSTEMS = [
    "You are a helpful assistant.",
    "Answer with the result only.",
    "You are a precise assistant.",
]


def _letters(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return rng.sample(string.ascii_lowercase, rng.randint(lo, hi))


def _task_reverse(rng):
    xs = _letters(rng)
    q = rng.choice(["Reverse the letters: {}", "Reverse: {}", "Write these letters backwards: {}"])
    return q.format(" ".join(xs)), " ".join(reversed(xs)), {"letters": xs}


def _task_sort(rng):
    xs = _letters(rng)
    q = rng.choice(["Sort these letters: {}", "Sort: {}", "Put in alphabetical order: {}"])
    return q.format(" ".join(xs)), " ".join(sorted(xs)), {"letters": xs}


def _task_upper(rng):
    ws = rng.sample(WORDS, rng.randint(1, 3))
    q = rng.choice(["Uppercase: {}", "Write in capitals: {}"])
    return q.format(" ".join(ws)), " ".join(ws).upper(), {"words": ws}


def _task_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    q = rng.choice(["Add {} and {}.", "What is {} plus {}?", "{} + {} ="])
    return q.format(a, b), str(a + b), {"number": a + b}


def _task_subtract(rng):
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    q = rng.choice(["What is {} minus {}?", "Subtract {} from {}."])
    text = q.format(a, b) if "minus" in q else q.format(b, a)
    return text, str(a - b), {"number": a - b}


def _task_capital(rng):
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice(["What is the capital of {}?", "Capital of {}?", "Name the capital city of {}."])
    return q.format(country), CAPITALS[country], {}


def _task_count(rng):
    xs = _letters(rng, 2, 8)
    q = rng.choice(["How many letters: {}?", "Count the letters: {}"])
    return q.format(" ".join(xs)), str(len(xs)), {"number": len(xs)}


def _task_next(rng):
    n = rng.randint(0, 98)
    q = rng.choice(["What comes after {}?", "Next number after {}?"])
    return q.format(n), str(n + 1), {"number": n + 1}


def _task_repeat(rng):
    w = rng.choice(WORDS)
    k = rng.randint(2, 3)
    word = {2: "twice", 3: "three times"}[k]
    return f"Repeat {word}: {w}", " ".join([w] * k), {}


def _task_opposite(rng):
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    q = rng.choice(["Opposite of {}?", "What is the opposite of {}?"])
    return q.format(a), b, {}


def _task_larger(rng):
    a, b = rng.sample(range(100), 2)
    q = rng.choice(["Which is larger, {} or {}?", "Bigger number: {} or {}?"])
    return q.format(a, b), str(max(a, b)), {"number": max(a, b)}


def _task_first_word(rng):
    ws = rng.sample(WORDS, rng.randint(2, 4))
    if rng.random() < 0.5:
        return "First word: " + " ".join(ws), ws[0], {}
    return "Last word: " + " ".join(ws), ws[-1], {}


TASKS = {
    "reverse": _task_reverse, "sort": _task_sort, "upper": _task_upper, "add": _task_add,
    "subtract": _task_subtract, "capital": _task_capital, "count": _task_count,
    "next": _task_next, "repeat": _task_repeat, "opposite": _task_opposite,
    "larger": _task_larger, "first_word": _task_first_word,
}


def _follow_up(rng, kind: str, info: dict):
    """A second user turn that depends on the previous turn, or None."""
    if "letters" in info:
        xs = info["letters"]
        if rng.random() < 0.5:
            return "Now sort them.", " ".join(sorted(xs))
        return "Now reverse them.", " ".join(reversed(xs))
    if "number" in info:
        k = rng.randint(1, 9)
        return f"Add {k} to that.", str(info["number"] + k)
    if "words" in info:
        return "Now in lowercase.", " ".join(info["words"])
    return None


def make_conversation(rng: random.Random) -> dict:
    """One conversation: optional system prompt, 1-3 user/assistant rounds."""
    messages: list[dict] = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    n_rounds = rng.choices([1, 2, 3], weights=[75, 18, 7])[0]
    kinds = []
    for i in range(n_rounds):
        follow = None
        if i > 0 and rng.random() < 0.6:
            follow = _follow_up(rng, kinds[-1][0], kinds[-1][1])
        if follow is not None:
            question, answer = follow
            kinds.append(("follow", {}))
        else:
            kind = rng.choice(sorted(TASKS))
            question, answer, info = TASKS[kind](rng)
            kinds.append((kind, info))
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    task = kinds[0][0] if n_rounds == 1 else "multi"
    return {"messages": messages, "task": task}


def plain_text(conversation: dict) -> str:
    """A conversation in the base model's pretraining layout: ``Q:`` and ``A:`` lines, each
    followed by its message on the next line, system prompts left out (the chat template, system
    prompts and stopping at ``<|end|>`` are what the fine-tune teaches). A message starts after a
    newline as in Phi-3's template, so it is split into the same tokens in both layouts (a
    byte-level BPE gives ``mouse`` after a newline and `` mouse`` after a space different ids)."""
    prefix = {"user": "Q:\n", "assistant": "A:\n"}
    return "\n".join(prefix[m["role"]] + m["content"] for m in conversation["messages"]
                     if m["role"] in prefix)


def qa_pairs(conversation: dict) -> set[tuple[str, str]]:
    """The (question, answer) pairs of a conversation's rounds."""
    msgs = [m for m in conversation["messages"] if m["role"] != "system"]
    return {(q["content"], a["content"]) for q, a in zip(msgs[::2], msgs[1::2])}


def pretraining_documents(held_out: set[tuple[str, str]]):
    """``make_doc(rng)`` for the base: 3-8 fresh conversations in :func:`plain_text` layout, none
    containing a ``held_out`` question-answer pair."""
    def make_doc(rng: random.Random) -> list[str]:
        docs: list[str] = []
        n = rng.randint(3, 8)
        while len(docs) < n:
            conv = make_conversation(rng)
            if not qa_pairs(conv) & held_out:
                docs.append(plain_text(conv))
        return docs
    return make_doc


def base_layout_examples(rows: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """Per task, ``(prompt, answer)`` for single-round rows in the base's layout: the prompt is
    ``Q:\n<question>\nA:\n``, the answer what should follow it."""
    out: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        if row["task"] != "multi":
            (question, answer), = qa_pairs(row)
            out.setdefault(row["task"], []).append((f"Q:\n{question}\nA:\n", answer))
    return dict(sorted(out.items()))


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def make_rows() -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) rows; eval never repeats a train conversation."""
    rng = random.Random(TRAIN_SEED)
    train = [make_conversation(rng) for _ in range(N_TRAIN)]
    seen = {_dumps({"m": r["messages"]}) for r in train}
    rng = random.Random(EVAL_SEED)
    evals: list[dict] = []
    while len(evals) < N_EVAL:
        row = make_conversation(rng)
        key = _dumps({"m": row["messages"]})
        if key not in seen:
            seen.add(key)
            evals.append(row)
    return train, evals


def train_tokenizer(rows: list[dict], extra_texts: list[str]) -> Tokenizer:
    """Byte-level BPE with individual digits, trained on message contents and ``extra_texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [m["content"] + "\n" for r in rows for m in r["messages"]] + extra_texts
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _write_atomic(path: Path, text: str) -> None:
    # Shipped package data: UTF-8 with "\n" line ends, readable like any file open() makes.
    write_bytes_atomic(path, text.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "lora_phi3" / "finetune" / "assets"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--skip-base", action="store_true",
                        help="write data and tokenizer only, keep the pretrained base as it is")
    parser.add_argument("--pretrain-steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, evals = make_rows()
    _write_atomic(args.out / "chat_train.jsonl", "".join(_dumps(r) + "\n" for r in train))
    _write_atomic(args.out / "chat_eval.jsonl", "".join(_dumps(r) + "\n" for r in evals))
    tok = train_tokenizer(train, ["Q:\n", "A:\n"])
    # Re-serialise compactly with sorted keys so the file is byte-stable.
    tok_json = json.loads(tok.to_str())
    _write_atomic(args.out / "tokenizer.json", json.dumps(tok_json, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {len(train)} train / {len(evals)} eval conversations and a "
          f"{tok.get_vocab_size()}-token tokenizer to {args.out}")
    if args.skip_base:
        return
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(args.out / "tokenizer.json"),
                                     eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0])
    print(f"pretraining the tiny Phi-3 base ({args.pretrain_steps} steps)")
    # The base never sees a held-out question-answer pair that the fine-tune data lacks.
    held_out = set().union(*map(qa_pairs, evals)) - set().union(*map(qa_pairs, train))
    model = pretrain(hf_tok, pretraining_documents(held_out), steps=args.pretrain_steps,
                     seed=PRETRAIN_SEED)
    acc = base_layout_accuracy(model, hf_tok, base_layout_examples(evals))
    print("  base accuracy on held-out questions in its own Q:/A: layout: "
          + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    info = {"steps": args.pretrain_steps, "seed": PRETRAIN_SEED, "batch": BATCH, "seq_len": SEQ_LEN,
            "lr": LR, "base_layout_accuracy": acc}
    save_base(model, args.out / TINY_BASE_FILE, info)
    print(f"wrote {args.out / TINY_BASE_FILE}")


if __name__ == "__main__":
    main()
