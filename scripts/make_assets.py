"""Regenerate the shipped assets in ``lora_phi3/finetune/assets/`` (deterministic).

Writes:
  * ``chat_train.jsonl`` / ``chat_eval.jsonl``: the bundled toy chat instruction set
    (``{"task": ..., "messages": [...]}`` per line). The eval file is a fixed held-out
    split: different random draws, and no conversation in it also occurs in train.
  * ``tokenizer.json``: a tiny byte-level BPE (``tokenizers`` library) trained on the
    message contents of the training file, with Phi-3's chat special tokens.

Every task is deterministic and short so that a randomly initialised tiny Phi-3
trained with LoRA only shows learning within a few hundred steps. Letters are
separated by spaces and digits are split individually by the tokenizer, so that
reversing/sorting/adding work token by token.

Usage: ``python scripts/make_assets.py [--out lora_phi3/finetune/assets]``. Running it twice
gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lora_phi3.atomic import write_bytes_atomic
from lora_phi3.finetune.tokenizer import PHI3_SPECIAL_TOKENS

# Order fixes the ids: <|endoftext|> = 0, <|system|> = 1, ...
SPECIAL_TOKENS = list(PHI3_SPECIAL_TOKENS)
VOCAB_SIZE = 1024
N_TRAIN = 2000
N_EVAL = 200
TRAIN_SEED = 20240611
EVAL_SEED = 977

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

NEUTRAL_SYSTEMS = [
    "You are a helpful assistant.",
    "Answer with the result only.",
    "You are a precise assistant.",
]
UPPER_SYSTEM = "Reply in uppercase."


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
    upper = False
    r = rng.random()
    if r < 0.10:
        upper = True
        messages.append({"role": "system", "content": UPPER_SYSTEM})
    elif r < 0.35:
        messages.append({"role": "system", "content": rng.choice(NEUTRAL_SYSTEMS)})
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
        messages.append({"role": "assistant", "content": answer.upper() if upper else answer})
    task = kinds[0][0] if n_rounds == 1 else "multi"
    return {"messages": messages, "task": task}


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


def train_tokenizer(rows: list[dict]) -> Tokenizer:
    """Byte-level BPE with individual digits, trained on message contents."""
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
    texts = [m["content"] + "\n" for r in rows for m in r["messages"]]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _write_atomic(path: Path, text: str) -> None:
    # Shipped package data: UTF-8 with "\n" line ends, readable like any file open() makes.
    write_bytes_atomic(path, text.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "lora_phi3" / "finetune" / "assets"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, evals = make_rows()
    _write_atomic(args.out / "chat_train.jsonl", "".join(_dumps(r) + "\n" for r in train))
    _write_atomic(args.out / "chat_eval.jsonl", "".join(_dumps(r) + "\n" for r in evals))
    tok = train_tokenizer(train)
    # Re-serialise compactly with sorted keys so the file is byte-stable.
    tok_json = json.loads(tok.to_str())
    _write_atomic(args.out / "tokenizer.json", json.dumps(tok_json, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {len(train)} train / {len(evals)} eval conversations and a "
          f"{tok.get_vocab_size()}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
