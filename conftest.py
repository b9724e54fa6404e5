"""Shared pytest fixtures: an offline stand-in for the Llama-3.2-3B-Instruct tokenizer.

The real tokenizer is gated on the Hugging Face Hub and the tests run without a network, so we build a
small tokenizer of the same kind in memory: byte-level BPE with Llama 3's split regex, its special
tokens under their real names, its BOS/EOS/pad settings, and a chat template that renders the same
text as Meta's for conversations without tools. Token ids and the vocabulary differ from the real one.
"""

import ast
import functools
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent

# Llama 3's special tokens that carry a meaning (the real vocabulary adds ~240 reserved ones we skip).
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT, "<|eom_id|>",
                  "<|python_tag|>", "<|finetune_right_pad_id|>"]

# The pre-tokenizer regex of Llama 3 (tiktoken's): contractions, words, numbers of up to 3 digits,
# punctuation runs and whitespace are split apart before BPE merges bytes within each piece.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Our own wording of the Llama 3.2 Instruct template, restricted to system/user/assistant messages.
# Like the real one it always writes a system header holding the knowledge cutoff and a date, takes
# the date from `date_string` if the caller passes it (else today's, else a fixed fallback), trims
# every message and ends each turn with <|eot_id|>.
CHAT_TEMPLATE = """\
{%- if date_string is not defined -%}
    {%- set date_string = strftime_now("%d %b %Y") if strftime_now is defined else "26 Jul 2024" -%}
{%- endif -%}
{%- set system_text = messages[0].content | trim if messages[0].role == "system" else "" -%}
{%- set turns = messages[1:] if messages[0].role == "system" else messages -%}
{{- bos_token + "<|start_header_id|>system<|end_header_id|>\\n\\n" -}}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" -}}
{{- system_text + "<|eot_id|>" -}}
{%- for turn in turns -%}
    {{- "<|start_header_id|>" + turn.role + "<|end_header_id|>\\n\\n" + turn.content | trim + "<|eot_id|>" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" -}}
{%- endif -%}
"""


def _training_text():
    """A few pages of English and Python from this repository, read from disk (importing lsp is slow)."""
    lsp_doc = ast.get_docstring(ast.parse((HERE / "lsp.py").read_text()))
    return [(HERE / "judge_prompts.py").read_text(), lsp_doc]


@functools.lru_cache(maxsize=None)
def make_llama3_tokenizer():
    """A small Llama-3-style tokenizer built offline in well under a second; cached, so build it once."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable characters
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, so any text encodes
    tokenizer.train_from_iterator(_training_text(), trainer)
    # Like the real tokenizer.json, encoding with add_special_tokens=True (the default) prepends BOS; the
    # chat template writes BOS itself, which is why lsp.py tokenizes its output with add_special_tokens=False.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    # The real tokenizer_config.json sets BOS and EOS (<|eot_id|>, the end of an assistant turn) and no pad
    # token: code that pads must choose a pad id itself.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOT,
                                   chat_template=CHAT_TEMPLATE, model_max_length=131072)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """One tokenizer shared by every test: a test that changes it (say, sets a pad token) must copy it first."""
    return make_llama3_tokenizer()
