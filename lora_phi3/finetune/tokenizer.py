"""Tokenizers: the embedded tiny offline tokenizer, or a real one via ``AutoTokenizer``.

The embedded tokenizer is a ~1k-token byte-level BPE shipped in ``lora_phi3/finetune/assets/
tokenizer.json`` (built by ``scripts/make_assets.py``). It carries Phi-3's chat special
tokens as single tokens and Phi-3's chat template, so everything that works with it
(rendering, label masking, packing) also applies to ``microsoft/Phi-3-mini-4k-instruct``.
"""

from __future__ import annotations

import logging
from importlib import resources

from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = ["load_tokenizer", "PHI3_CHAT_TEMPLATE", "PHI3_SPECIAL_TOKENS", "EOS_TOKEN",
           "END_OF_TURN_TOKEN"]

#: Chat template of microsoft/Phi-3-mini-4k-instruct (tokenizer_config.json), verbatim.
#: Renders ``<|role|>\n{content}<|end|>\n`` per message, then ``<|assistant|>\n`` when
#: ``add_generation_prompt`` else the eos token (``<|endoftext|>``).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

#: Phi-3's end of text (eos, also used as pad) and the token that closes every chat turn.
EOS_TOKEN = "<|endoftext|>"
END_OF_TURN_TOKEN = "<|end|>"
#: Phi-3's chat control tokens; each is a single token in the embedded tokenizer, whose ids follow
#: this order (``<|endoftext|>`` = 0, ...; see ``scripts/make_assets.py``).
PHI3_SPECIAL_TOKENS = (EOS_TOKEN, "<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN_TOKEN)

_ASSET_FILE = "tokenizer.json"


def _embedded_tokenizer() -> PreTrainedTokenizerFast:
    path = resources.files("lora_phi3.finetune").joinpath("assets", _ASSET_FILE)
    with resources.as_file(path) as file:
        if not file.is_file():
            raise FileNotFoundError(
                f"embedded tokenizer asset {file} is missing; regenerate it with "
                "`python scripts/make_assets.py`"
            )
        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(file),
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,  # like Phi-3: pad id == eos id (labels are masked by position)
            model_max_length=4096,
            padding_side="right",
            chat_template=PHI3_CHAT_TEMPLATE,
            # transformers 5 maps this (4.x) name onto extra_special_tokens
            additional_special_tokens=[t for t in PHI3_SPECIAL_TOKENS if t != EOS_TOKEN],
        )
    for t in PHI3_SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        if len(ids) != 1:  # a broken asset would silently corrupt masking downstream
            raise RuntimeError(f"embedded tokenizer splits special token {t!r} into {ids}")
    return tok


def load_tokenizer(name_or_path: str | None = None, *,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer with a chat template and a pad token.

    Args:
        name_or_path: ``None`` for the embedded offline tokenizer (byte-level BPE,
            Phi-3 special tokens, eos = pad = ``<|endoftext|>``); otherwise anything
            ``AutoTokenizer.from_pretrained`` accepts (hub id or local directory).
        trust_remote_code: allow tokenizer code shipped with the checkpoint (the recipe's
            ``model_kwargs.trust_remote_code``).

    Returns:
        A ``transformers`` fast tokenizer (``is_fast`` is required for offset mapping).
        If the loaded tokenizer has no chat template, Phi-3's is set; if it has no pad
        token, its eos token is used as pad.

    Raises:
        TypeError: ``name_or_path`` is neither ``None`` nor a string.
        ValueError: the loaded tokenizer is not a fast tokenizer, or has no eos token.
    """
    if name_or_path is None:
        return _embedded_tokenizer()
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(
            f"tokenizer name_or_path must be None or a non-empty string, got {name_or_path!r}"
        )
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"tokenizer {name_or_path!r} is not a fast tokenizer ({type(tok).__name__}); "
            "offset mappings are needed for label masking"
        )
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos_token; one is required")
    if not tok.chat_template:
        logger.warning("tokenizer %r has no chat template; using Phi-3's", name_or_path)
        tok.chat_template = PHI3_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
