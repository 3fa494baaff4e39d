"""Fixtures shared across test files."""

import pytest

from lora_phi3.finetune.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tok():
    """The embedded tokenizer (built offline from the vocabulary the package ships)."""
    return load_tokenizer()
