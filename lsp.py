"""
Language Self-Play (LSP): reinforcement learning for a language model with no training data.

Kuba et al., "Language Self-Play For Data-Free Training", arXiv 2509.07414. One model plays
two roles, chosen only by the prompt. As the Challenger it writes an instruction meant to be
hard; as the Solver it answers that instruction G times. A reward model scores every answer
(R) and, in full LSP, the frozen starting model judges each exchange on a 7-point scale (R_Q).
One policy-gradient step then makes the Solver better and the Challenger harder, while a KL
penalty keeps both roles close to the frozen reference model.

One iteration (Algorithm 1, `SelfPlay.iteration`):
    1. the Challenger samples N queries q_i           (challenger prompt -> q_i)
    2. the Solver samples G answers a_i^j per query   (q_i as a user turn -> a_i^j)
    3. rewards R(q_i, a_i^j) and, in LSP, R_Q(q_i, a_i^j) from the frozen judge
    4. group-relative advantages                       (Eq. advantages, `lsp_advantages`)
    5. one gradient step on L = L_Sol + alpha_Ch L_Ch  (Eq. loss, `policy_update`)

Deviations from the paper, and choices where it is silent (docs/method.md says why):
    1. KL penalty: the per-token "k3" estimator exp(r) - r - 1, r = log pi_Ref - log pi.
       The paper's log(pi / pi_Ref) of the sequence ("k1") has a zero expected gradient.
    2. Invalid queries: empty ones and ones cut at --max-query-tokens are not answered, and
       get a Challenger advantage below every valid query's and below 0.
    3. Unparsed judge output: without one <Score> in 0..7, the score is the expected digit
       under the judge's probabilities once "<Score>" is appended to its own text.
    4. The Challenger's value: its reward is -V(q) + V_Q(q), V the mean of R alone.
    5. One optimizer step per iteration: on sums over each sequence's tokens, a query weighing
       alpha_Ch / N and an answer 1 / (N_valid G), the paper's 1 / (N G) when all are valid.
    6. Choices the paper does not report: G = 4, alpha_Ch = 1, temperature and top-p 1 (log-
       probs use the temperature, not top-p), greedy judging, AdamW (0.9, 0.999, no decay),
       clipping at 1.
    7. Precision: on CUDA bf16 weights, 8-bit AdamW and stochastically rounded updates; on a
       CPU with bf16 units, bf16 autocast over float32 weights (--cpu-bf16).
    8. --challenger-reward uncertain: pays -2|V - 1/2| (R-Zero) instead of -V, which with 0/1
       rewards drives the Challenger to problems that no answer solves.
    9. --challenger-reward edge: for verifiable games, pays 1 - V for a problem solved by some
       answers but not all (Absolute Zero), less a penalty, not centred, for repeats within the
       step and of the last --repeat-window steps' problems.

Run:
    python lsp.py --game arith_game.py --out runs/game   # SmolLM2 learns arithmetic on a CPU
    python lsp.py --steps 1500 --out runs/llama3b   # Llama-3.2-3B on a GPU (24 GB: see README)
    python lsp.py --resume runs/llama3b             # after Ctrl-C or a crash
"""

import argparse
import collections
import copy
import functools
import math
import re
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BitsAndBytesConfig, DynamicCache, StaticCache)

from judge_prompts import CHALLENGER_PROMPT, QUALITY_PROMPT, REWARD_PROMPT
from run_machinery import (add_run_options, call_reward_function, chat_ids, chat_prompt,
                           check_model_names, check_ranges, check_run_dir, checkpoints,
                           curriculum_metrics, data_order, default_device, dev_accuracy,
                           episode_records, exit_if_too_big, exit_unloadable, finish_processes,
                           game_options, gather_iteration, init_processes, load_game,
                           load_reward_function, load_training_state, log_step, make_optimizer,
                           open_logs, parse_with_resume, problem_key, rank, read_instructions,
                           resolve_model, resume, save_checkpoint, show_example, SkippedUpdates,
                           step_metrics, StopRequest, sum_gradients, sum_over_processes,
                           training_state, use_cpu_bf16, world_size)


# --- Options ---------------------------------------------------------------------------------

# options that may change when a run resumes: they change neither the models nor the algorithm
RESUMABLE = {"steps", "log_every", "save_every", "keep", "micro_batch_size", "out", "resume",
             "gradient_checkpointing", "fast_sampler", "offload_frozen"}


def parse_args(argv=None):
    """The options, checked before any model loads: a bad one exits with a message."""
    parser = argparse.ArgumentParser(description="Language Self-Play trainer (see README.md)")
    arg = parser.add_argument
    # models
    arg("--model", default="meta-llama/Llama-3.2-3B-Instruct",
        help="policy: hub id, local path or 'smollm2'")
    arg("--reward-model", default="Skywork/Skywork-Reward-V2-Llama-3.2-3B",
        help="R: a sequence-classification model, 'self' (the judge) or FILE.py:FUNCTION")
    arg("--no-self-reward", action="store_true", help="no quality self-reward R_Q: LSP-Zero")
    arg("--load-in-4bit", action="store_true", help="frozen models in NF4 (CUDA)")
    arg("--offload-frozen", action="store_true", help="frozen models on the CPU between uses")
    arg("--game", help="a game file: its reward, task, template and options (arith_game.py)")
    # the Challenger
    arg("--task", default="", help="task name in the Challenger prompt (empty: free-form)")
    arg("--template", default="", help="query template in the Challenger prompt")
    arg("--fill-template", action="store_true",
        help="the Challenger writes only the template's {placeholder}")
    arg("--queries", help="a file of queries to answer instead of the Challenger's (data)")
    arg("--challenger-reward", choices=["paper", "uncertain", "edge"], default="paper",
        help="paper: -V; uncertain: -2|V - 1/2|; edge: 1 - V if 0 < V < 1, less repeats")
    arg("--repeat-window", type=int, default=10, help="edge: steps a problem counts as recent")
    arg("--repeat-penalty", type=float, default=2.0, help="edge: the cost of a repeat")
    # sampling
    arg("--num-queries", type=int, default=8, help="N: queries per iteration")
    arg("--num-generations", type=int, default=4, help="G: answers per query")
    arg("--max-query-tokens", type=int, default=256, help="longer queries are invalid")
    arg("--max-completion-length", type=int, default=512, help="longest answer")
    arg("--max-judge-tokens", type=int, default=256, help="longest judge output")
    arg("--temperature", type=float, default=1.0, help="sampling temperature, both roles")
    arg("--top-p", type=float, default=1.0, help="nucleus sampling, both roles")
    arg("--fast-sampler", choices=["auto", "on", "off"], default="off",
        help="static KV cache and CUDA graphs")
    # optimization
    arg("--steps", type=int, default=1500, help="iterations, one optimizer step each")
    arg("--learning-rate", type=float, default=3e-6, help="AdamW learning rate")
    arg("--beta", type=float, default=0.05, help="weight of the KL penalty")
    arg("--alpha-ch", type=float, default=1.0, help="weight of the Challenger loss")
    arg("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    arg("--micro-batch-size", type=int, default=4, help="sequences per forward and backward")
    arg("--gradient-checkpointing", action="store_true", help="recompute activations")
    arg("--cpu-bf16", choices=["auto", "on", "off"], default="auto", help="bf16 on a CPU")
    # the run
    add_run_options(parser, out="runs/lsp", save_every=100)
    arg("--log-every", type=int, default=10, help="print an example every this many steps")
    arg("--eval-every", type=int, default=0, help="score the game's dev sample every K steps")
    game = parser.parse_args(argv).game
    if game:  # the game's settings become the defaults; options given here override them
        parser.set_defaults(**game_options(parser, game))
    args = parse_with_resume(parser, argv)

    # a group of one would make every group-relative advantage zero
    counts = ["max_query_tokens", "max_completion_length", "max_judge_tokens", "steps",
              "micro_batch_size", "log_every", "save_every", "keep", "repeat_window"]
    at_least = {"num_queries": 2, "num_generations": 2, "eval_every": 0,
                **dict.fromkeys(counts, 1)}
    check_ranges(parser, args, at_least, ["learning_rate", "max_grad_norm", "temperature"])
    if min(args.beta, args.alpha_ch, args.repeat_penalty) < 0:
        parser.error("--beta, --alpha-ch and --repeat-penalty must be >= 0")
    if args.eval_every and not (args.game and hasattr(load_game(args.game), "dev_set")):
        parser.error("--eval-every needs a --game whose file has a dev_set() of problems")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    if args.fill_template and len(PLACEHOLDER.findall(args.template)) != 1:
        parser.error("--fill-template needs a --template with exactly one {placeholder}, "
                     f"got {args.template!r}")
    if args.load_in_4bit and not torch.cuda.is_available():
        parser.error("--load-in-4bit needs a CUDA GPU (bitsandbytes NF4): drop it on a CPU")
    if args.load_in_4bit and args.offload_frozen:
        parser.error("--load-in-4bit and --offload-frozen: two ways to make room for the "
                     "frozen models, choose one")
    check_model_names(parser, args, "--model", "--reward-model")
    if args.num_queries % world_size():
        parser.error(f"--num-queries {args.num_queries} must be a multiple of the "
                     f"{world_size()} processes: N is the iteration's, N / K each process's")
    if args.queries:
        read_instructions(args.queries)  # exits with a message if the file cannot serve
    check_run_dir(parser, args, RESUMABLE, "lsp.py")
    return args


# --- Loading ---------------------------------------------------------------------------------

def load_model(name, model_class, device, load_in_4bit=False):
    """(tokenizer, model) from a hub id, a local path or 'smollm2': bf16 on CUDA, else float32;
    NF4 with load_in_4bit. A model that fails to load exits with a hint."""
    path, kwargs = resolve_model(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
        model = model_class.from_pretrained(path, dtype=dtype, device_map={"": device}, **kwargs)
    except (OSError, ValueError) as error:
        exit_unloadable(name, error)
    return tokenizer, model


def freeze(model):
    return model.eval().requires_grad_(False)


def stop_token_ids(model, tokenizer):
    """Every token that ends a turn: the tokenizer's EOS and the generation config's."""
    ids = model.generation_config.eos_token_id  # Llama 3 has three
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# --- Sampling: our own batched sampler with a KV cache ---------------------------------------

def pad(sequences, side, device):
    """Token lists -> ids [B, L] and mask [B, L], padded on the left or right with id 0.

    Every vocabulary has id 0 and the mask hides it. Never pad with EOS and mask by id: that
    would hide the real EOS tokens, and the policy would never learn to stop.
    """
    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ones = [torch.ones(len(s), dtype=torch.long) for s in sequences]
    ids = pad_sequence(rows, batch_first=True, padding_side=side)
    mask = pad_sequence(ones, batch_first=True, padding_side=side)
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask):
    # [B, L]: counted from each row's first real token, so left padding changes nothing
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pick_tokens(logits, temperature, top_p, generator):
    """The next token of each row from logits [B, V]: greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)  # [B]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        # drop a token once the likelier ones before it hold top_p of the mass
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs > top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # inverse CDF: one uniform number per row (torch.multinomial draws one per vocabulary
    # entry, 30x slower on a CPU); float64 keeps tiny probabilities
    cdf = probs.double().cumsum(-1)  # [B, V]
    uniform = torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    draws = (1 - uniform) * cdf[:, -1:]  # [B, 1], in (0, total]: never a token of probability 0
    return torch.searchsorted(cdf, draws).squeeze(-1)  # [B]


@functools.cache
def decoder(device_type):
    """The fast sampler's forward: compiled for CUDA graphs on a GPU, eager on a CPU (where
    compiling gained nothing)."""
    if device_type != "cuda":
        return lambda model, **inputs: model(**inputs)
    # a model that does not compile decodes eagerly: the run goes on
    torch._dynamo.config.suppress_errors = True
    return torch.compile(lambda model, **inputs: model(**inputs), mode="reduce-overhead")


def prefill(model, prompts, cache):
    """Run each distinct prompt once into `cache`, then copy its cache to the rows holding it.

    The Challenger's N rows share one prompt, and a query's G answers another. Returns the
    last hidden state of each row [B, H] and its prompt mask [B, P].
    """
    unique = {prompt: i for i, prompt in enumerate(dict.fromkeys(map(tuple, prompts)))}
    rows = torch.tensor([unique[tuple(p)] for p in prompts], device=model.device)  # [B]
    prompt_ids, prompt_mask = pad(list(unique), "left", model.device)  # [U, P]
    output = model.base_model(input_ids=prompt_ids, attention_mask=prompt_mask,
                              position_ids=positions_from_mask(prompt_mask),
                              cache=cache, use_cache=True)
    hidden = output.last_hidden_state[rows, -1]  # [B, H]
    if len(unique) < len(prompts):
        # index_select: gradients flow back to the shared prompt's keys and values
        cache.reorder_cache(rows)
    return hidden, prompt_mask[rows]


@torch.no_grad()
def sample(model, prompts, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0,
           generator=None, fast=False, sync_every=None):
    """Sample a completion for each prompt (token-id lists of any lengths).

    Returns completion_ids [B, T] and completion_mask [B, T], T <= max_new_tokens. The mask is
    1 up to and including each row's stop token, so the loss also teaches when to stop.
    fast=True gives the same tokens from a static KV cache with fixed shapes, for CUDA graphs.
    Whether all rows stopped is asked every sync_every tokens: 16 on CUDA by default, else 1.
    """
    # the cache holds the longest sequence, rounded up to 64 tokens: few shapes to compile
    length = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64
    if fast:
        cache = StaticCache(config=model.config, max_cache_len=length)
    else:
        cache = DynamicCache(config=model.config)
    hidden, prompt_mask = prefill(model, prompts, cache)  # [B, H], [B, P]
    logits = model.lm_head(hidden)  # [B, V]
    if fast:  # copied to the rows: CUDA graphs need the new addresses marked as fixed
        for layer in cache.layers:
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)
    new_columns = prompt_mask.new_ones(len(prompts), length - prompt_mask.shape[1])
    attention_mask = torch.cat([prompt_mask, new_columns], 1)  # [B, L]
    forward = functools.partial(decoder(model.device.type), model) if fast else model
    sync_every = sync_every or (16 if model.device.type == "cuda" else 1)
    positions = prompt_mask.sum(-1, keepdim=True)  # [B, 1]: where each first new token stands
    stop = torch.tensor(stop_ids, device=model.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)  # [B]
    tokens, sampled = [], []
    for step in range(max_new_tokens):
        picked = pick_tokens(logits, temperature, top_p, generator)  # [B]
        next_tokens = torch.where(finished, 0, picked)  # [B]
        tokens.append(next_tokens)
        sampled.append(~finished)
        finished |= torch.isin(next_tokens, stop)
        if step + 1 == max_new_tokens:
            break
        if (step + 1) % sync_every == 0 and finished.all():
            break
        # fixed shapes, or the cache's width (causality hides the columns not yet written)
        width = length if fast else prompt_mask.shape[1] + step + 1
        output = forward(input_ids=next_tokens[:, None], attention_mask=attention_mask[:, :width],
                         position_ids=positions + step, cache=cache, use_cache=True)
        logits = output.logits[:, -1]  # [B, V]
    return torch.stack(tokens, 1), torch.stack(sampled, 1).long()  # [B, T], [B, T]


def unpad(completion_ids, completion_mask):
    """Token lists of each row's sampled tokens, the stop token included."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]


# --- Token log-probs -------------------------------------------------------------------------

LOGPROB_CHUNK_TOKENS = 1024  # float32 [tokens, vocab] logits are made this many tokens at a time


def chunk_logprobs(lm_head, hidden, token_ids, temperature):
    """log-softmax of the tokens token_ids [B, c] after hidden states [B, c, H]."""
    # in place: the largest tensor of the update
    logits = lm_head(hidden).float().div_(temperature)  # [B, c, V]
    return logits.log_softmax(-1).gather(-1, token_ids[..., None]).squeeze(-1)  # [B, c]


def token_logprobs(model, prompts, completions, temperature):
    """log pi(token | prefix) of every completion token, at the sampling temperature.

    prompts and completions are token lists. Returns logprobs [B, T] (0 where masked) and
    completion_mask [B, T], T the longest completion.
    """
    completion_ids, completion_mask = pad(completions, "right", model.device)  # [B, T]
    batch, num_completion = completion_ids.shape
    if model.training and model.is_activation_checkpointing:
        # checkpointed layers keep no KV cache: each row runs its prompt again
        prompt_ids, prompt_mask = pad(prompts, "left", model.device)  # [B, P]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
        output = model.base_model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                                  attention_mask=attention_mask,
                                  position_ids=positions_from_mask(attention_mask),
                                  use_cache=False)
        # the state at t predicts token t + 1
        hidden = output.last_hidden_state[:, -num_completion - 1:-1]  # [B, T, H]
    else:
        # each distinct prompt runs once (`prefill`); the completions attend to its cache
        cache = DynamicCache(config=model.config)
        prompt_hidden, prompt_mask = prefill(model, prompts, cache)  # [B, H], [B, P]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
        positions = positions_from_mask(attention_mask)[:, -num_completion:]  # [B, T]
        output = model.base_model(input_ids=completion_ids, attention_mask=attention_mask,
                                  position_ids=positions, cache=cache, use_cache=True)
        # the state at t predicts token t + 1
        hidden = torch.cat([prompt_hidden[:, None], output.last_hidden_state[:, :-1]], dim=1)
    # float32 logits of a 128k vocabulary take 0.5 MB a token: made a chunk at a time and
    # recomputed in backward, but for the last chunk, whose backward comes first
    width = max(1, LOGPROB_CHUNK_TOKENS // batch)
    logprobs = []
    for start in range(0, num_completion, width):
        chunk = (model.lm_head, hidden[:, start:start + width],
                 completion_ids[:, start:start + width], temperature)
        if start + width < num_completion:
            logprobs.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *chunk,
                                                              use_reentrant=False))
        else:
            logprobs.append(chunk_logprobs(*chunk))
    return torch.cat(logprobs, dim=1) * completion_mask, completion_mask  # [B, T], [B, T]


# --- Roles: Challenger and Solver ------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{[^{}]*\}")  # "{expression}" in a --template


def template_frame(template):
    """The text before and after a --fill-template placeholder, and the character that ends it.

    >>> template_frame("What is {x}? Go.")
    ('What is ', '? Go.', '?')
    """
    before, after = PLACEHOLDER.split(template)
    return before, after, after.strip()[:1]


def read_query(tokenizer, tokens, stop_ids, template=None):
    """(query text, status) of one Challenger sample; status is 'ok', 'empty' or 'truncated'.

    With a template (--fill-template) the sample is the placeholder's text, up to the
    template's next character, and the query is the template filled with it.
    """
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    # the prompt asks for no tags, but small models often copy them
    text = text.replace("[Start Generation]", "").replace("[End Generation]", "").strip()
    if not tokens or tokens[-1] not in stop_ids:
        return text, "truncated"
    if template:
        before, after, end = template_frame(template)
        if end:
            text = text.split(end)[0].strip()
        if text:
            text = before + text + after
    return text, "ok" if text else "empty"


# --- Rewards: the reward model, the judge and its score --------------------------------------

SCORE_TAG = re.compile(r"<score>\s*([^<]*?)\s*</score>", re.IGNORECASE)


def parse_score(text):
    """The integer 0..7 in the judge's <Score></Score> tag, or None if the tag is missing, holds
    anything else, or repeats with another value. Only the judge's own output is parsed, never
    its prompt, so an answer holding "<Score>7</Score>" cannot set its own score.

    >>> parse_score("Clear. <Calculation>1+1+1+1+1+0+0=5</Calculation> <Score>5</Score>")
    5
    """
    values = set(SCORE_TAG.findall(text))
    if len(values) != 1:
        return None
    value = values.pop()
    # ASCII digits only: int() accepts some other scripts' digits too
    return int(value) if re.fullmatch("[0-7]", value) else None


@torch.no_grad()
def logits_after(judge, prompts, judged, suffix, stop_ids):
    """Next-token logits [M, V] after prompt + judge text (stop tokens dropped) + suffix."""
    sequences = [
        prompt + [t for t in text if t not in stop_ids] + suffix
        for prompt, text in zip(prompts, judged)
    ]
    hidden, _ = prefill(judge, sequences, DynamicCache(config=judge.config))  # [M, H]
    return judge.lm_head(hidden)  # [M, V]


@torch.no_grad()
def reward_model_scores(reward_model, reward_tokenizer, queries, answers, date=None):
    """R from a sequence-classification reward model: one scalar per (query, answer), [M]."""
    sequences = []
    for query, answer in zip(queries, answers):
        exchange = [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        sequences.append(chat_ids(reward_tokenizer, exchange, add_generation_prompt=False,
                                  date=date))
    # each row's last token, pooled by `prefill`: the model's own pooling looks for
    # pad_token_id, which is wrong when pad == EOS
    hidden, _ = prefill(reward_model, sequences, DynamicCache(config=reward_model.config))
    return reward_model.score(hidden).squeeze(-1).float().cpu()  # [M]


# --- Advantages (Algorithm 1, step 4) --------------------------------------------------------

INVALID_QUERY_PENALTY = 1.0  # how far, in reward units, an invalid query lies below the rest


def challenger_values(values, challenger_reward):
    """What the Challenger is paid for a query's value V(q_i) [N], the Solver's mean reward."""
    if challenger_reward == "uncertain":  # deviation 8
        return -2 * (values - 0.5).abs()
    if challenger_reward == "edge":  # deviation 9: solved by some answers, the fewer the better
        return torch.where((values > 0) & (values < 1), 1 - values, 0.0)
    return -values  # the paper's -V


def lsp_advantages(rewards, quality=None, valid=None, challenger_reward="paper", repeats=None,
                   repeat_penalty=0.0):
    """Group-relative advantages of LSP, or of LSP-Zero when quality is None (Eq. advantages).

    rewards, quality: [N, G], R and R_Q of answer j to query i. valid: bool [N], the answered
    queries (default: all; other rows may hold anything, NaN included). No division by the
    standard deviation, as in the paper:
        V(q_i) = mean_j R(q_i, a_i^j)        V_Q(q_i) = mean_j R_Q(q_i, a_i^j)
        A_Sol  = (R + R_Q) - mean_j (R + R_Q)                  (LSP-Zero: R - V(q_i))
        A_Ch   = c_i - mean_i c_i,  c_i = -V(q_i) + V_Q(q_i)   (LSP-Zero: mean_i V - V(q_i))
    The mean over i runs over valid queries. An invalid query gets A_Sol = 0 and
    A_Ch = min(0, lowest valid A_Ch) - INVALID_QUERY_PENALTY (deviation 2). `challenger_reward`
    replaces -V(q_i) (`challenger_values`). repeats [N] (deviation 9) lowers each valid A_Ch by
    repeat_penalty * repeats after centring, so that a step of repeats still pushes them down.
    Returns solver_advantages [N, G] and challenger_advantages [N].

    >>> valid = torch.tensor([True, True, False])
    >>> lsp_advantages(torch.tensor([[1., 3.], [2., 2.], [9., 9.]]), valid=valid)
    (tensor([[-1.,  1.],
            [ 0.,  0.],
            [ 0.,  0.]]), tensor([ 0.,  0., -1.]))
    """
    if valid is None:
        valid = torch.ones(len(rewards), dtype=torch.bool)
    hardness = challenger_values(rewards.mean(dim=1), challenger_reward)  # [N]
    if quality is None:
        solver_rewards, challenger_rewards = rewards, hardness  # [N, G], [N]
    else:
        solver_rewards = rewards + quality  # [N, G]
        challenger_rewards = hardness + quality.mean(dim=1)  # [N]
    solver_advantages = solver_rewards - solver_rewards.mean(dim=1, keepdim=True)  # [N, G]
    challenger_advantages = challenger_rewards - challenger_rewards[valid].mean()  # [N]
    if repeats is not None:
        challenger_advantages = challenger_advantages - repeat_penalty * repeats  # [N]
    lowest = challenger_advantages[valid].min().item() if valid.any() else 0.0
    invalid_advantage = min(0.0, lowest) - INVALID_QUERY_PENALTY
    return (torch.where(valid[:, None], solver_advantages, 0.0),
            torch.where(valid, challenger_advantages, invalid_advantage))


def repeat_counts(keys, recent):
    """How much each valid query repeats (deviation 9), [N]: the share of the step's other valid
    queries that state the same problem, plus 1 if a recent step's valid queries stated it.

    keys: the problem each query states, None for an invalid one. recent: the problems of the
    last --repeat-window steps.
    >>> repeat_counts(["6+9", "6+9", "2*3", None], recent={"2*3"})
    tensor([0.5000, 0.5000, 1.0000, 0.0000])
    """
    stated = [key for key in keys if key is not None]
    others = max(1, len(stated) - 1)
    counts = [0.0 if key is None else (stated.count(key) - 1) / others + (key in recent)
              for key in keys]
    return torch.tensor(counts)  # [N]


# --- Loss and update (Algorithm 1, step 5) ---------------------------------------------------

def k3_kl(logprobs, ref_logprobs, completion_mask):
    """Per-token KL estimate exp(r) - r - 1, r = log pi_Ref - log pi, [B, T] (deviation 1).

    It is >= 0, 0 where pi == pi_Ref, and its expected gradient is that of KL(pi_Ref || pi):
    it pulls the policy back. The paper's log(pi / pi_Ref) does not, on average.
    """
    log_ratio = ref_logprobs - logprobs  # [B, T]
    return (log_ratio.exp() - log_ratio - 1) * completion_mask  # [B, T]


def policy_update(policy, reference, optimizer, prompts, completions, advantages, weights, args,
                  reference_done=lambda: None):
    """One optimizer step on L = L_Sol + alpha_Ch L_Ch (Eq. loss) over every sampled sequence.

    Sequence s adds weights[s] * -(A_s * log pi(s) - beta * KL(s)), both summed over its tokens
    (deviation 5). On-policy, the paper's pi / stopgrad(pi) * A has the gradient of
    A * log pi, which we differentiate. Returns per-sequence KL [S] and lengths [S], the loss
    and the gradient norm; a non-finite one skips the step.
    """
    if not sum_over_processes(len(prompts)):  # nothing to train on: all queries unscorable
        return torch.zeros(0), torch.zeros(0), 0.0, 0.0
    policy.train()  # activation checkpointing only runs in train mode; Llama has no dropout
    advantages, weights = advantages.to(policy.device), weights.to(policy.device)  # [S], [S]
    size = args.micro_batch_size
    batches = [slice(start, start + size) for start in range(0, len(prompts), size)]
    # pi_Ref first: with --offload-frozen it leaves the GPU before any gradient exists
    with torch.no_grad():
        all_ref_logprobs = [
            token_logprobs(reference, prompts[b], completions[b], args.temperature)[0]
            for b in batches
        ]
    reference_done()
    total_loss, seq_kls, lengths = 0.0, [], []
    for batch, ref_logprobs in zip(batches, all_ref_logprobs):
        logprobs, completion_mask = token_logprobs(policy, prompts[batch], completions[batch],
                                                   args.temperature)  # [b, T], [b, T]
        seq_kl = k3_kl(logprobs, ref_logprobs, completion_mask).sum(-1)  # [b]
        seq_logprob = logprobs.sum(-1)  # [b]
        objective = advantages[batch] * seq_logprob - args.beta * seq_kl  # [b]
        loss = -(weights[batch] * objective).sum()
        loss.backward()  # gradients add up over micro-batches: one step for the whole batch
        total_loss += loss.item()
        seq_kls.append(seq_kl.detach().cpu())
        lengths.append(completion_mask.sum(-1).cpu())
    sum_gradients(policy.parameters())  # under torchrun: every process's sequences
    total_loss = sum_over_processes(total_loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm).item()
    if math.isfinite(total_loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    nothing = [torch.zeros(0)]  # under torchrun, a process whose queries were all unscorable
    seq_kls, lengths = torch.cat(seq_kls or nothing), torch.cat(lengths or nothing).float()
    return seq_kls, lengths, total_loss, grad_norm


# --- One iteration (Algorithm 1) -------------------------------------------------------------

def by_query(values, valid, group):
    """Values per answer [Nv * G] of the valid queries -> [N, G], NaN rows for invalid ones."""
    table = torch.full((len(valid), group), float("nan"))
    table[valid] = values.view(-1, group)
    return table


class SelfPlay:
    """Holds the models and runs one LSP iteration at a time (`step`)."""

    read_query = staticmethod(read_query)  # a hook: bench.py makes every query valid

    def __init__(self, args, policy, tokenizer, reference, reward_model=None,
                 reward_tokenizer=None, reward_function=None):
        self.args, self.policy, self.tokenizer = args, policy, tokenizer
        self.reference, self.reward_model = reference, reward_model
        self.reward_tokenizer, self.reward_function = reward_tokenizer, reward_function
        self.dataset = read_instructions(args.queries) if args.queries else None
        self.stop_ids = stop_token_ids(policy, tokenizer)
        # under torchrun each process samples its own queries and answers
        self.generator = torch.Generator(policy.device).manual_seed(args.seed + rank())
        self.cpu_bf16 = use_cpu_bf16(args.cpu_bf16, policy.device)  # deviation 7
        self.optimizer = make_optimizer(policy.parameters(), args.learning_rate, policy.device)
        self.game = load_game(args.game) if args.game else None
        # the problems the Challenger stated in each of the last --repeat-window steps
        self.recent = collections.deque(maxlen=args.repeat_window)
        self.steps_done = 0  # iterations run, resumed ones included
        self.fast_sampler = args.fast_sampler == "on" or (
            args.fast_sampler == "auto" and policy.device.type == "cuda")
        # the paper leaves task and template empty ("None") for general instructions
        prompt = CHALLENGER_PROMPT.format(task=args.task or "None",
                                          template=args.template or "None")
        self.challenger_prompt = self.user_turn(prompt)
        self.query_stop_ids = self.stop_ids
        if args.fill_template:
            # the Challenger's turn starts with the template's text before the placeholder...
            before, _, end = template_frame(args.template)
            before_ids = tokenizer(before.rstrip(), add_special_tokens=False).input_ids
            self.challenger_prompt = self.challenger_prompt + before_ids
            # ...and ends at the first token holding the template's next character
            ending = {i for i in range(len(tokenizer)) if end and end in tokenizer.decode([i])}
            self.query_stop_ids = sorted(set(self.stop_ids) | ending)
        for frozen in (reference, reward_model):  # --offload-frozen: on the CPU until used
            self.place(frozen, False, {})

    def state_dict(self):
        return {**training_state(self.optimizer, self.generator), "recent": list(self.recent)}

    def load_state_dict(self, state):
        load_training_state(state, self.optimizer, self.generator)
        self.recent.extend(state.get("recent", []))
        self.steps_done = state["step"]

    @torch.no_grad()
    def greedy_answers(self, queries):
        """The Solver's most likely answers, for --eval-every's dev curve (`dev_accuracy`)."""
        prompts = [self.user_turn(query) for query in queries]
        answer_ids, answer_mask = sample(self.policy, prompts, self.args.max_completion_length,
                                         self.stop_ids, temperature=0)
        return self.tokenizer.batch_decode(unpad(answer_ids, answer_mask),
                                           skip_special_tokens=True)

    def user_turn(self, text):
        return chat_prompt(self.tokenizer, text, self.args.chat_date)

    def roll_out(self, prompts, max_tokens, stop_ids):
        """Sample with the policy at the training temperature: token lists."""
        completion_ids, completion_mask = sample(
            self.policy, prompts, max_tokens, stop_ids, self.args.temperature, self.args.top_p,
            self.generator, fast=self.fast_sampler)
        return unpad(completion_ids, completion_mask)

    def place(self, model, visiting, times):
        """--offload-frozen: a frozen model visits the policy's device alone, for its phase."""
        if self.args.offload_frozen and model is not None:
            started = time.perf_counter()
            model.to(self.policy.device if visiting else "cpu")
            spent = time.perf_counter() - started
            times["time/offload"] = times.get("time/offload", 0.0) + spent

    @torch.no_grad()
    def judge(self, prompt_template, queries, answers, judged, name):
        """Scores [M] of (query, answer) pairs, judged greedily by the frozen reference.

        Its texts go to judged[name + "_texts"] and its parse failures to
        judged[name + "_parse_failed"]; an unparsed score is the expected digit (deviation 3).
        """
        prompts = [
            self.user_turn(prompt_template.format(instruction=query, response=answer))
            for query, answer in zip(queries, answers)
        ]
        fast = self.fast_sampler and not self.args.load_in_4bit  # NF4 breaks compiled graphs
        outputs = unpad(*sample(self.reference, prompts, self.args.max_judge_tokens,
                                self.stop_ids, 0, fast=fast))
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
        parsed = [parse_score(text) for text in texts]
        scores = torch.tensor([float("nan" if s is None else s) for s in parsed])  # [M]
        judged[f"{name}_texts"] = texts
        judged[f"{name}_parse_failed"] = scores.isnan().tolist()
        failed = [i for i, score in enumerate(parsed) if score is None]
        if failed:
            digit_ids = [self.tokenizer.encode(str(d), add_special_tokens=False)[-1]
                         for d in range(8)]
            score_tag = self.tokenizer.encode("\n<Score>", add_special_tokens=False)
            logits = logits_after(self.reference, [prompts[i] for i in failed],
                                  [outputs[i] for i in failed], score_tag, self.stop_ids)
            digit_probs = logits[:, digit_ids].float().softmax(-1)  # [F, 8]
            digits = torch.arange(8.0, device=digit_probs.device)  # [8]
            scores[failed] = (digit_probs * digits).sum(-1).cpu()  # [F], the expected digit
        return scores  # [M]

    def task_rewards(self, queries, answers, judged):
        """R [M]: from the reward function, the reward model, or the frozen judge ('self')."""
        if self.reward_function:
            return call_reward_function(self.reward_function, queries, answers, answered=True)
        if self.args.reward_model == "self":
            return self.judge(REWARD_PROMPT, queries, answers, judged, "reward_judge")
        return reward_model_scores(self.reward_model, self.reward_tokenizer, queries, answers,
                                   self.args.chat_date)

    def step(self):
        """One iteration of Algorithm 1: (metrics dict, one episode dict per query)."""
        with torch.autocast("cpu", torch.bfloat16, enabled=self.cpu_bf16):  # deviation 7
            result = self.iteration()
        self.steps_done += 1
        return result

    def iteration(self):
        args, group, times = self.args, self.args.num_generations, {}
        clock = [time.perf_counter()]

        def lap(phase):
            clock.append(time.perf_counter())
            times[f"time/{phase}"] = clock[-1] - clock[-2]

        # 1. The Challenger writes N queries from one prompt; empty or cut ones are invalid.
        #    With --queries the Solver answers N queries from the file instead (the data
        #    baseline) and there is no Challenger loss. Under torchrun, N / K per process.
        mine = args.num_queries // world_size()
        if self.dataset:
            # every run of this seed reads the same queries step by step (`data_order`): arms
            # of a comparison are paired, and a resumed run reads what it would have read
            read = self.steps_done * args.num_queries + rank() * mine
            picks = data_order(len(self.dataset), args.seed, read + mine)[read:]
            query_tokens = []
            queries = [self.dataset[i] for i in picks.tolist()]
            statuses = ["ok"] * mine
        else:
            query_tokens = self.roll_out([self.challenger_prompt] * mine,
                                         args.max_query_tokens, self.query_stop_ids)
            template = args.template if args.fill_template else None  # the query fills it
            read = [self.read_query(self.tokenizer, tokens, self.query_stop_ids, template)
                    for tokens in query_tokens]
            queries, statuses = zip(*read)
        if self.reward_function:  # None, whatever the answer: not a valid problem
            empty_answers = [""] * len(queries)
            scorable = call_reward_function(self.reward_function, queries, empty_answers)
            statuses = [
                "unscorable" if status == "ok" and not ok else status
                for status, ok in zip(statuses, scorable.isfinite())
            ]
        valid = torch.tensor([status == "ok" for status in statuses])  # [N]
        lap("challenger")

        # 2. The Solver answers each valid query G times, as a plain user turn.
        answered = [query for query, ok in zip(queries, valid) if ok for _ in range(group)]
        solver_prompts = [self.user_turn(query) for query in answered]  # Nv * G
        answer_tokens = []
        if answered:
            answer_tokens = self.roll_out(solver_prompts, args.max_completion_length,
                                          self.stop_ids)
        answers = [self.tokenizer.decode(t, skip_special_tokens=True) for t in answer_tokens]
        lap("solver")

        # 3. Rewards: R from the reward model (or the self-judge), R_Q from the frozen
        #    judge; [Nv * G] each.
        rewards, quality, judged = torch.empty(0), torch.empty(0), {}
        if answered:
            rater = self.reference if self.reward_model is None else self.reward_model
            self.place(rater, True, times)
            rewards = self.task_rewards(answered, answers, judged)
            self.place(self.reward_model, False, times)
            lap("reward")
        self.place(self.reference, True, times)  # to judge, then for the reference log-probs
        if answered and not args.no_self_reward:
            quality = self.judge(QUALITY_PROMPT, answered, answers, judged, "judge")
            lap("judge")
        rewards = by_query(rewards, valid, group)  # [N, G], NaN rows for invalid queries
        quality = None if args.no_self_reward else by_query(quality, valid, group)  # [N, G]

        # 4. Group-relative advantages (deviation 2 for invalid queries), over all N queries:
        #    under torchrun every process gathers the others' (`gather`) and keeps its own.
        #    With the edge reward, repeated problems cost the Challenger (deviation 9).
        keys = [problem_key(self.game, q) if ok else None for q, ok in zip(queries, valid)]
        keys, queries, valid, rewards, quality, own = gather_iteration(
            keys, queries, valid, rewards, quality)  # lists and tensors of all N queries
        all_answers = group * int(valid.sum())  # every process's: G per valid query
        recent = set().union(*self.recent)  # the problems of the last --repeat-window steps
        repeats = repeat_counts(keys, recent) if args.challenger_reward == "edge" else None
        solver_advantages, challenger_advantages = lsp_advantages(
            rewards, quality, valid, args.challenger_reward, repeats,
            args.repeat_penalty)  # [N, G], [N]
        if query_tokens:  # the Challenger's problems, not a data set's
            self.recent.append([key for key in keys if key is not None])
        curriculum = curriculum_metrics(keys, recent, queries, rewards, self.game)
        queries, valid, rewards, solver_advantages, challenger_advantages = (
            queries[own], valid[own], rewards[own], solver_advantages[own],
            challenger_advantages[own])  # this process's queries
        quality = None if quality is None else quality[own]

        # 5. One gradient step for both roles. Answers go first, so that a micro-batch mostly
        #    shares one prompt (`prefill`).
        written = len(query_tokens)  # Challenger sequences: N, or 0 with --queries
        answer_weights = torch.full((len(answers),), 1 / max(1, all_answers))
        query_weights = torch.full((written,), args.alpha_ch / args.num_queries)
        advantages = [solver_advantages[valid].flatten(), challenger_advantages[:written]]
        seq_kl, lengths, loss, grad_norm = policy_update(
            self.policy, self.reference, self.optimizer,
            prompts=solver_prompts + [self.challenger_prompt] * written,
            completions=answer_tokens + list(query_tokens),
            advantages=torch.cat(advantages),
            weights=torch.cat([answer_weights, query_weights]),
            args=args, reference_done=lambda: self.place(self.reference, False, times))
        lap("update")

        clipped = [tokens[-1] not in self.stop_ids for tokens in answer_tokens]
        answered_rows = (rewards[valid], None if quality is None else quality[valid],
                         solver_advantages[valid])
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "grad_clipped": float(grad_norm > args.max_grad_norm),
                   "update_skipped": float(not math.isfinite(loss + grad_norm))}
        metrics.update(step_metrics(statuses, *answered_rows, challenger_advantages,
                                    seq_kl / lengths, lengths, written, clipped, judged))
        metrics.update(curriculum)
        metrics.update(times)
        episodes = episode_records(queries, statuses, answers, *answered_rows,
                                   challenger_advantages, judged)
        return metrics, episodes


# --- Training loop ---------------------------------------------------------------------------

def train(args, selfplay, start_step=0):
    out = Path(args.out)
    skipped = SkippedUpdates(out)
    steps = range(start_step + 1, args.steps + 1)
    bar = tqdm(steps, initial=start_step, total=args.steps, desc="LSP", dynamic_ncols=True,
               disable=rank() != 0)
    with StopRequest() as stop, open_logs(out) as (metrics_file, episodes_file):
        for step in bar:
            started = time.perf_counter()
            metrics, episodes = selfplay.step()
            if args.eval_every and rank() == 0 and (step % args.eval_every == 0 or step == 1):
                evaluated = time.perf_counter()
                metrics["dev_accuracy"] = dev_accuracy(selfplay.game, selfplay.reward_function,
                                                       selfplay.greedy_answers)
                metrics["time/eval"] = time.perf_counter() - evaluated
            metrics["time/step"] = time.perf_counter() - started
            log_step(step, metrics, episodes, metrics_file, episodes_file, bar)
            if step % args.log_every == 0 or step == 1:
                show_example(step, episodes)
            skipped.count(step, metrics["update_skipped"])
            stopping = stop.agreed()  # under torchrun, every process stops at the same step
            if step % args.save_every == 0 or step == args.steps or stopping:
                save_checkpoint(selfplay, out, step, args.keep)
            stop.exit_if_asked(step, "lsp.py", out)
    tqdm.write(f"done: {args.steps} steps; metrics in {out / 'metrics.jsonl'}, "
               f"model in {checkpoints(out)[-1]}")


# --- Main ------------------------------------------------------------------------------------

def start(args):
    """Load the models: (SelfPlay, first step). A run in --out continues from its newest
    checkpoint."""
    saved = checkpoints(args.out)
    torch.manual_seed(args.seed)
    device = default_device()
    reward_function = load_reward_function(args.reward_model)  # None for a reward model
    policy_path = str(saved[-1]) if saved else args.model
    tokenizer, policy = load_model(policy_path, AutoModelForCausalLM, device)
    if device.type == "cuda":
        exit_if_too_big(args, policy, device, LOGPROB_CHUNK_TOKENS)
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    # the frozen reference pi_Ref: the starting model, copied, or loaded again when it is
    # quantized or the policy was not
    if args.load_in_4bit or saved:
        _, reference = load_model(args.model, AutoModelForCausalLM, device, args.load_in_4bit)
    else:
        reference = copy.deepcopy(policy)
    freeze(reference)
    reward_model = reward_tokenizer = None
    if args.reward_model != "self" and not reward_function:
        reward_tokenizer, reward_model = load_model(
            args.reward_model, AutoModelForSequenceClassification, device, args.load_in_4bit)
        freeze(reward_model)
    selfplay = SelfPlay(args, policy, tokenizer, reference, reward_model, reward_tokenizer,
                        reward_function)
    return selfplay, resume(selfplay, args, device)


def main(argv=None):
    init_processes()  # under torchrun: join the other processes
    args = parse_args(argv)
    try:
        train(args, *start(args))  # a run that has done its --steps already says "done"
    except torch.OutOfMemoryError:
        sys.exit("error: out of GPU memory. Resume with --gradient-checkpointing, "
                 "--offload-frozen or a smaller --micro-batch-size "
                 f"(python lsp.py --resume {args.out} --micro-batch-size 1), or start a new "
                 "run with fewer --num-generations or a smaller --max-completion-length.")
    except KeyboardInterrupt:
        sys.exit("stopped without saving; resume from the newest checkpoint with: "
                 f"python lsp.py --resume {args.out}")
    finally:
        finish_processes()


if __name__ == "__main__":
    main()
