"""Shared pytest fixtures: an offline stand-in for the Llama-3.2-3B-Instruct tokenizer.

The real tokenizer is gated on the Hugging Face Hub and the tests run without a network, so they
use bench.py's `llama3_style_tokenizer`: byte-level BPE with Llama 3's split regex, its special
tokens under their real names, and a chat template that renders the same text as Meta's.
"""

import pytest

from bench import llama3_style_tokenizer


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """One tokenizer shared by every test: a test that changes it must copy it first."""
    return llama3_style_tokenizer()
