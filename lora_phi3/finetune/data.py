"""Chat data to training examples: chat-template rendering, tokenisation and label masks.

Pipeline (loading is :mod:`.conversations`, packing and batching :mod:`.packing`)::

    train, eval, report = load_conversations(path_or_None)
    examples = tokenize_dataset(tok, train, max_seq_length, report=report,
                                locations=report.train_locations)
    rows = pack_examples(examples, seq_length)            # optional
    for idx in batches(rows, batch_size, seed=seed, epoch=epoch):
        batch = collate([rows[i] for i in idx], tok.pad_token_id, packing=True,
                        mask_dtype=model.dtype)

See docs/data.md for the masking rules and how packed rows are isolated.
"""

from __future__ import annotations

from typing import Sequence

from .conversations import DataReport, check_on_bad_row, load_conversations
from .losses import IGNORE_INDEX
from .tokenizer import END_OF_TURN_TOKEN

# load_conversations is re-exported: the pipeline above reads from this one module (and scripts
# written before the split import it from here).
__all__ = ["tokenize_conversation", "tokenize_dataset", "ExampleTooLong", "load_conversations"]


class ExampleTooLong(ValueError):
    """A tokenised conversation is longer than ``max_seq_length`` (it is never truncated)."""

    def __init__(self, length: int, max_seq_length: int):
        super().__init__(f"example has {length} tokens > max_seq_length {max_seq_length}")
        self.length = length
        self.max_seq_length = max_seq_length

    def __reduce__(self):  # picklable across processes despite the two-argument constructor
        return (type(self), (self.length, self.max_seq_length))



def _end_of_turn(tokenizer) -> str:
    """The token that closes an assistant turn: Phi-3's ``<|end|>`` if known, else eos."""
    tid = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)  # not get_vocab(): copies 32k entries
    known = tid is not None and (tokenizer.unk_token_id is None or tid != tokenizer.unk_token_id)
    return END_OF_TURN_TOKEN if known else tokenizer.eos_token


def _assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of each assistant content + its end-of-turn token.

    Found by incremental rendering: the text of ``messages[:i]`` with the generation
    prompt is a prefix of the full text and ends where assistant message ``i`` starts.
    """
    eot = _end_of_turn(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i > 0:
            prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        else:  # transformers refuses to render an empty conversation; use Phi-3's header
            prefix = "<|assistant|>\n"
        start = len(prefix)
        end = start + len(m["content"])
        if not text.startswith(prefix) or text[start:end] != m["content"]:
            raise ValueError(
                f"chat template of {type(tokenizer).__name__} does not render assistant message "
                f"{i + 1} verbatim after the generation prompt; cannot locate it for label masking")
        if text.startswith(eot, end):
            end += len(eot)
        spans.append((start, end))
    return spans


def tokenize_conversation(
    tokenizer,
    messages: list[dict],
    max_seq_length: int,
    *,
    train_on_prompt: bool = False,
) -> dict:
    """Render with the chat template, tokenise, and build labels.

    Labels are ``-100`` except for tokens overlapping an assistant message's content or
    the ``<|end|>`` that closes it, and the final eos (trained when the conversation ends
    with an assistant message). Role tags, the ``<|assistant|>\\n`` header, system/user
    text and the ``\\n`` after ``<|end|>`` are masked. ``train_on_prompt=True`` trains
    every token.

    Args:
        tokenizer: a fast tokenizer with a chat template (see ``load_tokenizer``).
        messages: ``[{"role", "content"}, ...]`` as returned by ``load_conversations``.
        max_seq_length: longest allowed example, in tokens.
        train_on_prompt: train on all tokens instead of the assistant turns only.

    Returns:
        ``{"input_ids": list[int], "labels": list[int]}`` of equal length, ending with eos.

    Raises:
        ExampleTooLong: more than ``max_seq_length`` tokens (never truncated).
        ValueError: bad ``max_seq_length``; a template that alters assistant content.
    """
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labels = []
    for tok_id, (a, b) in zip(ids, offsets):
        b = max(b, a + 1)  # zero-width tokens (e.g. a prepended "▁") belong to the char they precede
        inside = any(a < e and b > s for s, e in spans)
        labels.append(tok_id if train_on_prompt or inside else IGNORE_INDEX)
    eos = tokenizer.eos_token_id
    train_eos = train_on_prompt or messages[-1]["role"] == "assistant"
    if ids and ids[-1] == eos:  # Phi-3's template already ends with eos
        labels[-1] = eos if train_eos else IGNORE_INDEX
    else:
        ids.append(eos)
        labels.append(eos if train_eos else IGNORE_INDEX)
    if len(ids) > max_seq_length:
        raise ExampleTooLong(len(ids), max_seq_length)
    return {"input_ids": ids, "labels": labels}


def tokenize_dataset(
    tokenizer,
    conversations: Sequence[list[dict]],
    max_seq_length: int,
    *,
    train_on_prompt: bool = False,
    on_bad_row: str = "skip",
    report: DataReport | None = None,
    source_name: str = "data",
    locations: Sequence[str] | None = None,
) -> list[dict]:
    """Tokenise conversations; too-long ones are skipped (counted) or raise.

    Args:
        report: updated in place (``kept`` -1, ``skipped``/``too_long`` +1 per too-long
            example); pass the report of ``load_conversations``. ``None`` makes a new one.
        source_name: names rows ``source_name[i]`` in messages when ``locations`` is None.
        locations: ``file:line`` per conversation (``report.train_locations``).

    Returns:
        The examples (dicts with ``input_ids``/``labels``), in input order.

    Raises:
        ValueError: bad ``on_bad_row``; mismatched ``locations``; with ``on_bad_row="error"``
            a too-long example (``location: example has N tokens > max_seq_length M``).
    """
    check_on_bad_row(on_bad_row)
    if locations is not None and len(locations) != len(conversations):
        raise ValueError(f"locations has {len(locations)} entries for {len(conversations)} conversations")
    if report is None:
        report = DataReport(source=source_name, rows_read=len(conversations), kept=len(conversations))
    out = []
    for i, conv in enumerate(conversations):
        try:
            out.append(tokenize_conversation(tokenizer, conv, max_seq_length, train_on_prompt=train_on_prompt))
        except ExampleTooLong as e:
            loc = locations[i] if locations is not None else f"{source_name}[{i}]"
            report.bad_row(on_bad_row, loc, str(e))
            report.kept -= 1
            report.too_long += 1
    return out
