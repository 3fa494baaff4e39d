"""Tokenisation and label masking of conversations (loading: test_conversations.py; packing and
batching: test_packing.py)."""

import pytest

from lora_phi3.finetune.conversations import DataReport, load_conversations
from lora_phi3.finetune.data import ExampleTooLong, tokenize_conversation, tokenize_dataset
from lora_phi3.finetune.tokenizer import PHI3_CHAT_TEMPLATE, load_tokenizer
from tiny import CONV


# --------------------------------------------------------------------------- masking

def test_two_round_masking_hand_written(tok):
    ex = tokenize_conversation(tok, CONV, 128)
    # written by hand: the Phi-3 rendering, token by token, 1 = trained
    expected = [
        ("<|system|>", 0), ("Ċ", 0), ("Answer", 0), ("Ġwith", 0), ("Ġthe", 0), ("Ġresult", 0),
        ("Ġonly", 0), (".", 0), ("<|end|>", 0), ("Ċ", 0),
        ("<|user|>", 0), ("Ċ", 0), ("Sort", 0), (":", 0), ("Ġc", 0), ("Ġa", 0), ("Ġb", 0),
        ("<|end|>", 0), ("Ċ", 0),
        ("<|assistant|>", 0), ("Ċ", 0), ("a", 1), ("Ġb", 1), ("Ġc", 1), ("<|end|>", 1), ("Ċ", 0),
        ("<|user|>", 0), ("Ċ", 0), ("Add", 0), ("Ġ", 0), ("2", 0), ("Ġto", 0), ("Ġthat", 0),
        (".", 0), ("<|end|>", 0), ("Ċ", 0),
        ("<|assistant|>", 0), ("Ċ", 0), ("5", 1), ("<|end|>", 1), ("Ċ", 0),
        ("<|endoftext|>", 1),
    ]
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == [t for t, _ in expected]
    assert ex["labels"] == [i if m else -100 for i, (_, m) in zip(ex["input_ids"], expected)]


def test_masking_matches_piecewise_construction(tok):
    """Independent construction: tokenise each template piece on its own."""
    T, M = True, False
    pieces = [("<|system|>\n", M), ("Answer with the result only.", M), ("<|end|>\n", M),
              ("<|user|>\n", M), ("Sort: c a b", M), ("<|end|>\n", M),
              ("<|assistant|>\n", M), ("a b c", T), ("<|end|>", T), ("\n", M),
              ("<|user|>\n", M), ("Add 2 to that.", M), ("<|end|>\n", M),
              ("<|assistant|>\n", M), ("5", T), ("<|end|>", T), ("\n", M), ("<|endoftext|>", T)]
    ids, labels = [], []
    for text, trained in pieces:
        p = tok.encode(text, add_special_tokens=False)
        ids += p
        labels += p if trained else [-100] * len(p)
    ex = tokenize_conversation(tok, CONV, 128)
    assert ex == {"input_ids": ids, "labels": labels}


def test_train_on_prompt_and_trailing_user_turn(tok):
    ex = tokenize_conversation(tok, CONV, 128, train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]
    # a conversation ending with a user turn: its final eos is not trained
    ex = tokenize_conversation(tok, CONV[:4], 128)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == -100
    assert tok.decode([i for i in ex["labels"] if i != -100]) == "a b c<|end|>"


def test_assistant_first_and_empty_content(tok):
    conv = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"},
            {"role": "assistant", "content": ""}]
    ex = tokenize_conversation(tok, conv, 64)
    assert tok.decode([i for i in ex["labels"] if i != -100]) == "Hi<|end|><|end|><|endoftext|>"


def test_template_without_eos_gets_eos_appended_and_bad_template_rejected(tok):
    no_eos = PHI3_CHAT_TEMPLATE.replace("{% else %}{{ eos_token }}", "")
    ref = tokenize_conversation(tok, CONV, 128)
    tok2 = load_tokenizer()
    tok2.chat_template = no_eos
    assert tok2.apply_chat_template(CONV, tokenize=False).endswith("5<|end|>\n")
    ex = tokenize_conversation(tok2, CONV, 128)
    assert ex == ref  # eos appended and trained exactly as Phi-3's template renders it
    tok2.chat_template = PHI3_CHAT_TEMPLATE.replace("message['content'] + '<|end|>", "message['content'] | trim + '<|end|>")
    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": " y "}]
    with pytest.raises(ValueError, match="does not render assistant message 2 verbatim"):
        tokenize_conversation(tok2, conv, 128)


def _sentencepiece_style_tokenizer():
    """Offline stand-in for Phi-3's LlamaTokenizerFast: Metaspace pre-tokenizer, merges across
    spaces, and role tokens with rstrip=True (they swallow the following newline), as in
    Phi-3-mini's tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    train, _, _ = load_conversations(None)
    texts = [m["content"] for conv in train[:500] for m in conv]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                                      show_progress=False))
    t.add_special_tokens([AddedToken("<|endoftext|>", normalized=False, special=True)] + [
        AddedToken(s, rstrip=True, normalized=False, special=True)
        for s in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=PHI3_CHAT_TEMPLATE)


def test_masking_with_sentencepiece_style_tokenizer():
    sp = _sentencepiece_style_tokenizer()
    ex = tokenize_conversation(sp, CONV, 128)
    toks = sp.convert_ids_to_tokens(ex["input_ids"])
    assert "Ċ" not in toks and "\n" not in "".join(toks)  # newlines are swallowed by rstrip
    trained = [t for t, l in zip(toks, ex["labels"]) if l != -100]
    assert "".join(trained).replace("▁", " ") == "a b c<|end|>5<|end|><|endoftext|>"
    # each assistant answer is preceded by a masked <|assistant|> and ends with a trained <|end|>
    for i, t in enumerate(toks):
        if t == "<|assistant|>":
            assert ex["labels"][i] == -100 and ex["labels"][i + 1] != -100


def test_example_too_long(tok):
    n = len(tokenize_conversation(tok, CONV, 128)["input_ids"])
    assert len(tokenize_conversation(tok, CONV, n)["input_ids"]) == n
    with pytest.raises(ExampleTooLong, match=f"example has {n} tokens > max_seq_length {n - 1}"):
        tokenize_conversation(tok, CONV, n - 1)
    assert issubclass(ExampleTooLong, ValueError)
    with pytest.raises(ValueError, match="max_seq_length must be a positive int, got 0"):
        tokenize_conversation(tok, CONV, 0)


def test_tokenize_dataset_counts_too_long(tok):
    short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    convs = [short, CONV, short]
    limit = len(tokenize_conversation(tok, short, 128)["input_ids"])
    report = DataReport(source="x", rows_read=3, kept=3)
    out = tokenize_dataset(tok, convs, limit, report=report, locations=["x.jsonl:1", "x.jsonl:4", "x.jsonl:5"])
    assert len(out) == 2
    assert (report.rows_read, report.kept, report.skipped, report.too_long) == (3, 2, 1, 1)
    assert report.problems == [f"x.jsonl:4: example has 42 tokens > max_seq_length {limit}"]
    with pytest.raises(ValueError, match=r"^data\[1\]: example has 42 tokens > max_seq_length"):
        tokenize_dataset(tok, convs, limit, on_bad_row="error")
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        tokenize_dataset(tok, convs, limit, on_bad_row="drop")
