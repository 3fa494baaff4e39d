"""Packing (checked against a tiny Phi-3: packed logits equal each example run alone), collation
and batch order."""

import pytest
import torch
import torch.nn.functional as F

from lora_phi3.finetune.conversations import load_conversations
from lora_phi3.finetune.data import ExampleTooLong, tokenize_dataset
from lora_phi3.finetune.packing import batches, collate, pack_examples
from tiny import tiny_phi3

# --------------------------------------------------------------------------- packing & collate

def _ex(ids, labels=None):
    return {"input_ids": list(ids), "labels": list(labels if labels is not None else ids)}


def test_pack_examples_greedy_no_split():
    exs = [_ex([1, 2, 3]), _ex([4, 5]), _ex([6, 7, 8, 9]), _ex([10]), _ex([11, 12, 13, 14, 15])]
    rows = pack_examples(exs, 6)
    assert [r["seq_lens"] for r in rows] == [[3, 2], [4, 1], [5]]
    assert rows[0]["input_ids"] == [1, 2, 3, 4, 5]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    # the first label of each example is masked (it would be predicted from the previous one)
    assert rows[0]["labels"] == [-100, 2, 3, -100, 5]
    assert rows[1]["labels"] == [-100, 7, 8, 9, -100]
    with pytest.raises(ExampleTooLong, match="example has 5 tokens > max_seq_length 4"):
        pack_examples(exs, 4)
    with pytest.raises(ValueError, match="seq_length must be a positive int, got 0"):
        pack_examples(exs, 0)


def test_collate_padding_and_hand_written_packed_mask():
    rows = pack_examples([_ex([1, 2]), _ex([3]), _ex([4, 5, 6])], 3)  # rows: [1,2,3] and [4,5,6]
    rows = [rows[0], {**rows[1], "input_ids": [4, 5], "labels": [-100, 5], "position_ids": [0, 1],
                      "seq_lens": [2]}]
    b = collate(rows, pad_id=0, packing=True)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b["labels"].tolist() == [[-100, 2, -100], [-100, 5, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 0], [0, 1, 0]]
    allowed = b["attention_mask"] == 0
    assert b["attention_mask"].shape == (2, 1, 3, 3) and b["attention_mask"].dtype == torch.float32
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert allowed[1, 0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert b["attention_mask"].min() == torch.finfo(torch.float32).min
    plain = collate([_ex([1, 2, 3]), _ex([4])], pad_id=9, packing=False)
    assert plain["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert plain["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert plain["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_collate_errors():
    rows = pack_examples([_ex([1, 2]), _ex([3])], 3)
    with pytest.raises(ValueError, match="row 0 holds 2 packed examples; use packing=True"):
        collate(rows, 0, packing=False)
    with pytest.raises(ValueError, match="rows must be a non-empty list"):
        collate([], 0, packing=True)
    with pytest.raises(ValueError, match="mask_dtype must be a floating torch dtype, got torch.bool"):
        collate(rows, 0, packing=True, mask_dtype=torch.bool)
    with pytest.raises(ValueError, match="sliding_window must be None or a positive int, got 0"):
        collate(rows, 0, packing=True, sliding_window=0)


def _tiny_phi3(vocab, pad_id, attn, sliding_window=None):
    """The shared tiny Phi-3, sized to the embedded tokenizer."""
    return tiny_phi3(attn=attn, vocab_size=vocab, pad_token_id=pad_id, bos_token_id=pad_id,
                     eos_token_id=pad_id, sliding_window=sliding_window)


@pytest.fixture(scope="module")
def packed_rows(tok):
    train, _, _ = load_conversations(None)
    examples = tokenize_dataset(tok, train[:10], 128, train_on_prompt=True)
    rows = pack_examples(examples, 80)
    assert any(len(r["seq_lens"]) >= 3 for r in rows)
    return rows[:3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_packed_logits_and_loss_equal_examples_alone(tok, packed_rows, attn, sliding_window):
    model = _tiny_phi3(len(tok), tok.pad_token_id, attn, sliding_window)
    assert model.config._attn_implementation == attn
    batch = collate(packed_rows, tok.pad_token_id, packing=True, sliding_window=sliding_window)
    with torch.no_grad():
        out = model(**batch)
        loss_sum, n_tok = 0.0, 0
        for b, row in enumerate(packed_rows):
            off = 0
            for n in row["seq_lens"]:
                ids = torch.tensor([row["input_ids"][off:off + n]])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(out.logits[b, off:off + n], alone, atol=1e-5, rtol=0)
                # reference loss: every next token of the example, nothing across examples
                loss_sum += F.cross_entropy(alone[:-1], ids[0, 1:], reduction="sum").item()
                n_tok += n - 1
                off += n
    # HF shifts labels inside; with boundary labels masked the packed loss is the token mean
    torch.testing.assert_close(out.loss.item(), loss_sum / n_tok, atol=1e-5, rtol=1e-5)


def test_without_the_packed_mask_examples_leak(tok, packed_rows):
    """Why the 4D mask: a 2D mask, or position_ids alone with the default use_cache=True
    (transformers 5.24 only detects packing from position_ids when no cache is created),
    lets examples attend to each other."""
    model = _tiny_phi3(len(tok), tok.pad_token_id, "sdpa")
    batch = collate(packed_rows, tok.pad_token_id, packing=True)
    plain = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in packed_rows],
                    tok.pad_token_id, packing=False)
    with torch.no_grad():
        good = model(**batch).logits
        two_d = model(input_ids=batch["input_ids"], attention_mask=plain["attention_mask"],
                      position_ids=batch["position_ids"]).logits
        pos_only = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    real = batch["labels"] != -100
    assert (two_d - good)[real].abs().max() > 1e-2
    assert (pos_only - good)[real].abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_logits_equal_examples_alone(tok, attn):
    model = _tiny_phi3(len(tok), tok.pad_token_id, attn)
    train, _, _ = load_conversations(None)
    exs = tokenize_dataset(tok, train[:4], 128)
    batch = collate(exs, tok.pad_token_id, packing=False)
    with torch.no_grad():
        out = model(**batch).logits
        for b, ex in enumerate(exs):
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            torch.testing.assert_close(out[b, :len(ex["input_ids"])], alone, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- batches

def test_batches_depend_only_on_seed_and_epoch():
    a = batches(list(range(10)), 4, seed=1, epoch=0)
    assert a == batches(10, 4, seed=1, epoch=0)
    torch.manual_seed(123)  # global RNG state must not matter
    assert a == batches(range(10), 4, seed=1, epoch=0)
    assert [len(x) for x in a] == [4, 4, 2]
    assert sorted(i for x in a for i in x) == list(range(10))
    assert a != batches(10, 4, seed=1, epoch=1) and a != batches(10, 4, seed=2, epoch=0)
    assert [len(x) for x in batches(10, 4, seed=1, epoch=0, drop_last=True)] == [4, 4]
    assert batches(5, 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        batches(10, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="epoch must be a non-negative int, got -1"):
        batches(10, 2, seed=0, epoch=-1)
