"""Language Self-Play (LSP): reinforcement learning for a language model with no training data.

Kuba et al., "Language Self-Play For Data-Free Training", arXiv 2509.07414. One model plays
two roles, chosen only by the prompt. As the Challenger it writes an instruction meant to be
hard; as the Solver it answers that instruction G times. A reward model scores every answer
(R) and, in full LSP, the frozen starting model judges each exchange on a 7-point scale (R_Q).
One policy-gradient step then makes the Solver better and the Challenger harder, while a KL
penalty keeps both roles close to the frozen reference model.

One iteration (Algorithm 1, `SelfPlay.iteration`):
    1. the Challenger samples N queries q_i           (`SelfPlay.write_queries`)
    2. the Solver samples G answers a_i^j per query   (`SelfPlay.answer`)
    3. rewards R(q_i, a_i^j) and, in LSP, R_Q(q_i, a_i^j) from the frozen judge (`Scorers`)
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

This file is the algorithm, top to bottom. The support code a reader can skip (options for
precision, memory and the run, checkpoints, logs, torchrun, the fast sampler) is in machinery/.

Run:
    python lsp.py --game arith_game.py --out runs/game   # SmolLM2 learns arithmetic on a CPU
    python lsp.py --steps 1500 --out runs/llama3b   # Llama-3.2-3B on a GPU (24 GB: see README)
    python lsp.py --steps 1500 --lora 16 --load-in-4bit --gradient-checkpointing  # QLoRA (README)
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
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BitsAndBytesConfig, DynamicCache)

from judge_prompts import CHALLENGER_PROMPT, QUALITY_PROMPT, REWARD_PROMPT
from machinery import devices, distributed, inputs, logs, lora, options, runs
from machinery.forward import (LOGPROB_CHUNK_TOKENS, checkpointed_hidden, logits_after,
                               logprobs_in_chunks, pad, pick_tokens, positions_from_mask, prefill,
                               sample_fast, unpad)


# --- Options: the paper's hyperparameters and the few a learner changes ----------------------

def parse_args(argv=None):
    """The options, checked before any model loads: a bad one exits with a message. Precision,
    memory, speed and the run directory are machinery/options.py's (`python lsp.py --help`)."""
    parser = argparse.ArgumentParser(description="Language Self-Play trainer (see README.md)")
    arg = parser.add_argument
    # models and rewards
    arg("--model", default="meta-llama/Llama-3.2-3B-Instruct",
        help="policy pi_theta, also the frozen pi_Ref and judge: hub id, local path, 'smollm2'")
    arg("--reward-model", default="Skywork/Skywork-Reward-V2-Llama-3.2-3B",
        help="R: a sequence-classification model, 'self' (the judge) or FILE.py:FUNCTION")
    arg("--no-self-reward", action="store_true", help="no quality self-reward R_Q: LSP-Zero")
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
    # optimization
    arg("--steps", type=int, default=1500, help="iterations, one optimizer step each")
    arg("--learning-rate", type=float, default=3e-6,
        help=f"AdamW learning rate; with --lora, {lora.LEARNING_RATE_SCALE}x its default")
    arg("--beta", type=float, default=0.05, help="beta: weight of the KL penalty")
    arg("--alpha-ch", type=float, default=1.0, help="alpha_Ch: weight of the Challenger loss")
    arg("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    options.add_engineering_options(parser)
    game = parser.parse_args(argv).game
    if game:  # the game's settings become the defaults; options given here override them
        parser.set_defaults(**options.game_options(parser, game))
    if parser.parse_args(argv).lora:  # adapters learn at about 10x full fine-tuning's rate
        default = parser.get_default("learning_rate")
        parser.set_defaults(learning_rate=lora.LEARNING_RATE_SCALE * default)
    args = options.parse_with_resume(parser, argv)

    # a group of one would make every group-relative advantage zero
    at_least = {"num_queries": 2, "num_generations": 2, **dict.fromkeys(
        ["max_query_tokens", "max_completion_length", "max_judge_tokens", "steps",
         "repeat_window"], 1)}
    options.check_ranges(parser, args, at_least, ["learning_rate", "max_grad_norm", "temperature"])
    if min(args.beta, args.alpha_ch, args.repeat_penalty) < 0:
        parser.error("--beta, --alpha-ch and --repeat-penalty must be >= 0")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    if args.fill_template and len(PLACEHOLDER.findall(args.template)) != 1:
        parser.error("--fill-template needs a --template with exactly one {placeholder}, "
                     f"got {args.template!r}")
    options.check_engineering_options(parser, args)
    return args


# --- Loading ---------------------------------------------------------------------------------

def load_model(name, model_class, device, load_in_4bit=False):
    """(tokenizer, model) from a hub id, a local path, 'smollm2' or a LoRA checkpoint (merged):
    bf16 on CUDA, else float32; NF4 with load_in_4bit. One that fails to load exits with a hint."""
    base = lora.base_model_name(name)
    path, kwargs = inputs.resolve_model(base or name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
        model = model_class.from_pretrained(path, dtype=dtype, device_map={"": device}, **kwargs)
    except (OSError, ValueError) as error:
        inputs.exit_unloadable(name, error)
    return tokenizer, lora.merged(model, name) if base else model


def freeze(model):
    return model.eval().requires_grad_(False)


def stop_token_ids(model, tokenizer):
    """Every token that ends a turn: the tokenizer's EOS and the generation config's."""
    ids = model.generation_config.eos_token_id  # Llama 3 has three
    ids = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# --- Sampling: our own batched sampler with a KV cache ---------------------------------------

@torch.no_grad()
def sample(model, prompts, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0,
           generator=None):
    """Sample a completion for each prompt (token-id lists of any lengths).

    Returns completion_ids [B, T] and completion_mask [B, T], T <= max_new_tokens. The mask is
    1 up to and including each row's stop token, so the loss also teaches when to stop. Each
    distinct prompt runs once (`prefill`); a row that stopped gets padding (id 0, mask 0).
    machinery/forward.py's `sample_fast` gives the same tokens from fixed shapes.
    """
    cache = DynamicCache(config=model.config)
    hidden, attention_mask = prefill(model, prompts, cache)  # [B, H], [B, P]
    logits = model.lm_head(hidden)  # [B, V]
    positions = attention_mask.sum(-1, keepdim=True)  # [B, 1]: where each first new token stands
    stop = torch.tensor(stop_ids, device=model.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)  # [B]
    tokens, sampled = [], []
    for step in range(max_new_tokens):
        picked = pick_tokens(logits, temperature, top_p, generator)  # [B]
        next_tokens = torch.where(finished, 0, picked)  # [B]
        tokens.append(next_tokens)
        sampled.append(~finished)
        finished |= torch.isin(next_tokens, stop)
        if step + 1 == max_new_tokens or finished.all():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], 1)
        output = model(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                       position_ids=positions + step, cache=cache, use_cache=True)
        logits = output.logits[:, -1]  # [B, V]
    return torch.stack(tokens, 1), torch.stack(sampled, 1).long()  # [B, T], [B, T]


# --- Token log-probs -------------------------------------------------------------------------

def token_logprobs(model, prompts, completions, temperature):
    """log pi(token | prefix) of every completion token, at the sampling temperature.

    prompts and completions are token lists. Returns logprobs [B, T] (0 where masked) and
    completion_mask [B, T], T the longest completion.
    """
    completion_ids, completion_mask = pad(completions, "right", model.device)  # [B, T]
    if model.training and model.is_activation_checkpointing:  # --gradient-checkpointing
        hidden = checkpointed_hidden(model, prompts, completion_ids, completion_mask)
    else:
        # each distinct prompt runs once (`prefill`); the completions attend to its cache
        cache = DynamicCache(config=model.config)
        prompt_hidden, prompt_mask = prefill(model, prompts, cache)  # [B, H], [B, P]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
        positions = positions_from_mask(attention_mask)[:, -completion_ids.shape[1]:]  # [B, T]
        output = model.base_model(input_ids=completion_ids, attention_mask=attention_mask,
                                  position_ids=positions, cache=cache, use_cache=True)
        # the state at t predicts token t + 1
        hidden = torch.cat([prompt_hidden[:, None], output.last_hidden_state[:, :-1]], dim=1)
    # log softmax(logits / temperature) at each token, made a chunk of tokens at a time
    logprobs = logprobs_in_chunks(model.lm_head, hidden, completion_ids, temperature)  # [B, T]
    return logprobs * completion_mask, completion_mask  # [B, T], [B, T]


# --- Roles: Challenger and Solver ------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{[^{}]*\}")  # "{expression}" in a --template


def template_frame(template):
    """The text before and after a --fill-template placeholder, and the character that ends it.

    >>> template_frame("What is {x}? Go.")
    ('What is ', '? Go.', '?')
    """
    before, after = PLACEHOLDER.split(template)
    return before, after, after.strip()[:1]


def challenger_prompt(tokenizer, args, stop_ids):
    """The Challenger's prompt (token ids) and the tokens that end its query.

    With --fill-template the Challenger's turn starts with the template's text before the
    placeholder and ends at the first token holding the template's next character.
    """
    # the paper leaves task and template empty ("None") for general instructions
    prompt = CHALLENGER_PROMPT.format(task=args.task or "None", template=args.template or "None")
    prompt_ids = inputs.chat_prompt(tokenizer, prompt, args.chat_date)
    if not args.fill_template:
        return prompt_ids, stop_ids
    before, _, end = template_frame(args.template)
    prompt_ids = prompt_ids + tokenizer(before.rstrip(), add_special_tokens=False).input_ids
    ending = {i for i in range(len(tokenizer)) if end and end in tokenizer.decode([i])}
    return prompt_ids, sorted(set(stop_ids) | ending)


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
def judge_scores(judge, tokenizer, prompts, max_tokens, stop_ids, fast=False):
    """Scores [M] of judge prompts (a template filled with a query and an answer), judged
    greedily by the frozen reference; its texts; and which failed to parse. An unparsed score
    is the expected digit under the judge's probabilities (deviation 3)."""
    outputs = unpad(*(sample_fast if fast else sample)(judge, prompts, max_tokens, stop_ids, 0))
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
    parsed = [parse_score(text) for text in texts]
    scores = torch.tensor([float("nan" if s is None else s) for s in parsed])  # [M]
    failed = [i for i, score in enumerate(parsed) if score is None]
    if failed:
        digit_ids = [tokenizer.encode(str(d), add_special_tokens=False)[-1] for d in range(8)]
        score_tag = tokenizer.encode("\n<Score>", add_special_tokens=False)
        logits = logits_after(judge, [prompts[i] for i in failed],
                              [outputs[i] for i in failed], score_tag, stop_ids)
        digit_probs = logits[:, digit_ids].float().softmax(-1)  # [F, 8]
        digits = torch.arange(8.0, device=digit_probs.device)  # [8]
        scores[failed] = (digit_probs * digits).sum(-1).cpu()  # [F], the expected digit
    return scores, texts, [score is None for score in parsed]  # [M], M texts, M bools


@torch.no_grad()
def reward_model_scores(reward_model, reward_tokenizer, queries, answers, date=None):
    """R from a sequence-classification reward model: one scalar per (query, answer), [M]."""
    sequences = []
    for query, answer in zip(queries, answers):
        exchange = [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        sequences.append(inputs.chat_ids(reward_tokenizer, exchange,
                                         add_generation_prompt=False, date=date))
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
    challenger_pay = challenger_values(rewards.mean(dim=1), challenger_reward)  # [N]
    if quality is None:
        solver_rewards, challenger_rewards = rewards, challenger_pay  # [N, G], [N]
    else:
        solver_rewards = rewards + quality  # [N, G]
        challenger_rewards = challenger_pay + quality.mean(dim=1)  # [N]
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


def iteration_advantages(queries, valid, rewards, quality, game, recent, args):
    """(solver_advantages [N, G], challenger_advantages [N], keys) of an iteration's N queries,
    keys the problem each valid query states (None for an invalid one). With the edge reward a
    problem repeated in this step or from the `recent` steps costs the Challenger."""
    keys = [inputs.problem_key(game, query) if ok else None for query, ok in zip(queries, valid)]
    repeats = repeat_counts(keys, recent) if args.challenger_reward == "edge" else None
    solver_advantages, challenger_advantages = lsp_advantages(
        rewards, quality, valid, args.challenger_reward, repeats, args.repeat_penalty)
    return solver_advantages, challenger_advantages, keys


# --- Loss and update (Algorithm 1, step 5) ---------------------------------------------------

def k3_kl(logprobs, ref_logprobs, completion_mask):
    """Per-token KL estimate exp(r) - r - 1, r = log pi_Ref - log pi, [B, T] (deviation 1).

    It is >= 0, 0 where pi == pi_Ref, and its expected gradient is that of KL(pi_Ref || pi):
    it pulls the policy back. The paper's log(pi / pi_Ref) does not, on average.
    """
    log_ratio = ref_logprobs - logprobs  # [B, T]
    return (log_ratio.exp() - log_ratio - 1) * completion_mask  # [B, T]


def micro_batches(num_sequences, size):
    return [slice(start, start + size) for start in range(0, num_sequences, size)]


@torch.no_grad()
def reference_logprobs(reference, prompts, completions, args):
    """log pi_Ref of every completion token, a micro-batch at a time: [b, T] each."""
    return [token_logprobs(reference, prompts[batch], completions[batch], args.temperature)[0]
            for batch in micro_batches(len(prompts), args.micro_batch_size)]


def policy_update(policy, optimizer, prompts, completions, ref_logprobs, advantages, weights,
                  args):
    """One optimizer step on L = L_Sol + alpha_Ch L_Ch (Eq. loss) over every sampled sequence.

    Sequence s adds weights[s] * -(A_s * log pi(s) - beta * KL(s)), both summed over its tokens
    (deviation 5). On-policy, the paper's pi / stopgrad(pi) * A has the gradient of
    A * log pi, which we differentiate. ref_logprobs: `reference_logprobs` of the sequences.
    Returns per-sequence KL [S] and lengths [S], the loss and the gradient norm; a non-finite
    one skips the step. Under torchrun every process calls it, with its own share of the
    sequences (none is fine), and the gradients are summed.
    """
    policy.train()  # activation checkpointing only runs in train mode; Llama has no dropout
    advantages, weights = advantages.to(policy.device), weights.to(policy.device)  # [S], [S]
    total_loss, seq_kls, lengths = 0.0, [torch.zeros(0)], [torch.zeros(0)]
    for batch, batch_ref_logprobs in zip(micro_batches(len(prompts), args.micro_batch_size),
                                         ref_logprobs):
        logprobs, completion_mask = token_logprobs(policy, prompts[batch], completions[batch],
                                                   args.temperature)  # [b, T], [b, T]
        seq_kl = k3_kl(logprobs, batch_ref_logprobs, completion_mask).sum(-1)  # [b]
        seq_logprob = logprobs.sum(-1)  # [b]
        objective = advantages[batch] * seq_logprob - args.beta * seq_kl  # [b]
        loss = -(weights[batch] * objective).sum()
        loss.backward()  # gradients add up over micro-batches: one step for the whole batch
        total_loss += loss.item()
        seq_kls.append(seq_kl.detach().cpu())
        lengths.append(completion_mask.sum(-1).cpu())
    distributed.sum_gradients(policy.parameters())  # under torchrun: every process's sequences
    total_loss = distributed.sum_over_processes(total_loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm).item()
    if math.isfinite(total_loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy.eval()
    return torch.cat(seq_kls), torch.cat(lengths).float(), total_loss, grad_norm


# --- One iteration (Algorithm 1) -------------------------------------------------------------

def by_query(values, valid, group):
    """Values per answer [Nv * G] of the valid queries -> [N, G], NaN rows for invalid ones."""
    table = torch.full((len(valid), group), float("nan"))
    table[valid] = values.view(-1, group)
    return table


def data_queries(dataset, seed, first, count):
    """With --queries (the data baseline) the Solver answers `count` queries of the file from
    the `first`. Every run of a seed reads the same queries step by step (`inputs.data_order`):
    arms of a comparison are paired, and a resumed run reads what it would have read."""
    picks = inputs.data_order(len(dataset), seed, first + count)[first:]
    return [dataset[i] for i in picks.tolist()], ["ok"] * count, []


class Scorers:
    """The frozen scorers of step 3: R from a reward model, a reward function or the judge
    ('self'), and R_Q from the judge, the frozen reference pi_Ref."""

    def __init__(self, args, tokenizer, reference, reward_model, reward_tokenizer,
                 reward_function, stop_ids, fast):
        self.args, self.tokenizer, self.stop_ids = args, tokenizer, stop_ids
        self.reference, self.reward_model = reference, reward_model
        self.reward_tokenizer, self.reward_function = reward_tokenizer, reward_function
        self.fast = fast and not args.load_in_4bit  # NF4 breaks CUDA graphs

    def task_reward_model(self):
        """The frozen model that gives R: the reward model, the judge ('self'), or none."""
        if self.reward_function:
            return None
        return self.reference if self.reward_model is None else self.reward_model

    def mark_unscorable(self, queries, statuses):
        """The statuses, with a valid query that the reward function cannot score (it returns
        None whatever the answer) marked 'unscorable': not a valid problem."""
        if not self.reward_function:
            return statuses
        scores = inputs.call_reward_function(self.reward_function, queries, [""] * len(queries))
        return ["unscorable" if status == "ok" and not ok else status
                for status, ok in zip(statuses, scores.isfinite())]

    def task_rewards(self, queries, answers):
        """R [M], and the judge's (texts, parse failures) when the judge gives R ('self')."""
        if self.reward_function:
            return inputs.call_reward_function(self.reward_function, queries, answers,
                                               answered=True), None
        if self.args.reward_model == "self":
            scores, texts, failed = self.judge(REWARD_PROMPT, queries, answers)
            return scores, (texts, failed)
        return reward_model_scores(self.reward_model, self.reward_tokenizer, queries, answers,
                                   self.args.chat_date), None

    def judge(self, prompt_template, queries, answers):
        """The frozen reference's scores [M] of (query, answer) pairs (`judge_scores`)."""
        texts = [prompt_template.format(instruction=query, response=answer)
                 for query, answer in zip(queries, answers)]
        prompts = [inputs.chat_prompt(self.tokenizer, text, self.args.chat_date) for text in texts]
        return judge_scores(self.reference, self.tokenizer, prompts, self.args.max_judge_tokens,
                            self.stop_ids, self.fast)


class SelfPlay:
    """Holds the models and runs one LSP iteration at a time (`step`)."""

    def __init__(self, args, policy, tokenizer, reference, reward_model=None,
                 reward_tokenizer=None, reward_function=None, adapters=None):
        self.args, self.policy, self.tokenizer, self.reference = args, policy, tokenizer, reference
        self.adapters = adapters  # with --lora: the peft model that saves and turns them off
        self.dataset = inputs.read_instructions(args.queries) if args.queries else None
        self.stop_ids = stop_token_ids(policy, tokenizer)
        # under torchrun each process samples its own queries and answers
        self.generator = torch.Generator(policy.device).manual_seed(args.seed + distributed.rank())
        self.cpu_bf16 = devices.use_cpu_bf16(args.cpu_bf16, policy.device)  # deviation 7
        trained = [parameter for parameter in policy.parameters() if parameter.requires_grad]
        self.optimizer = devices.make_optimizer(trained, args.learning_rate, policy.device)
        self.game = inputs.load_game(args.game) if args.game else None
        # the problems the Challenger stated in each of the last --repeat-window steps
        self.recent = collections.deque(maxlen=args.repeat_window)
        self.steps_done = 0  # iterations run, resumed ones included
        self.fast_sampler = devices.use_fast_sampler(args.fast_sampler, policy.device)
        # timed phases; with --offload-frozen the frozen models wait on the CPU between uses
        self.phases = devices.Phases(policy.device, args.offload_frozen, [reference, reward_model],
                                     adapters)
        self.challenger_prompt, self.query_stop_ids = challenger_prompt(
            tokenizer, args, self.stop_ids)
        self.scorers = Scorers(args, tokenizer, reference, reward_model, reward_tokenizer,
                               reward_function, self.stop_ids, self.fast_sampler)

    def state_dict(self):
        return {**runs.training_state(self.optimizer, self.generator), "recent": list(self.recent)}

    def load_state_dict(self, state):
        runs.load_training_state(state, self.optimizer, self.generator)
        self.recent.extend(state.get("recent", []))
        self.steps_done = state["step"]

    def user_turn(self, text):
        return inputs.chat_prompt(self.tokenizer, text, self.args.chat_date)

    def roll_out(self, prompts, max_tokens, stop_ids):
        """Sample with the policy at the training temperature: token lists."""
        sampler = sample_fast if self.fast_sampler else sample
        return unpad(*sampler(self.policy, prompts, max_tokens, stop_ids, self.args.temperature,
                              self.args.top_p, self.generator))

    # 1. The Challenger writes N queries from one prompt (N / K per process under torchrun)
    def write_queries(self, count):
        """(queries, statuses, the Challenger's token lists): empty or cut queries are invalid."""
        query_tokens = self.roll_out([self.challenger_prompt] * count,
                                     self.args.max_query_tokens, self.query_stop_ids)
        template = self.args.template if self.args.fill_template else None  # the query fills it
        queries, statuses = zip(*[read_query(self.tokenizer, tokens, self.query_stop_ids,
                                             template) for tokens in query_tokens])
        return list(queries), list(statuses), query_tokens

    # 2. The Solver answers each valid query G times, as a plain user turn
    def answer(self, answered):
        """(prompts, token lists, texts) of one answer per entry of `answered`."""
        if not answered:  # no valid query
            return [], [], []
        prompts = [self.user_turn(query) for query in answered]
        tokens = self.roll_out(prompts, self.args.max_completion_length, self.stop_ids)
        return prompts, tokens, self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    # 5. One gradient step for both roles
    def update(self, prompts, completions, advantages, weights, sequences_in_iteration):
        """(per-sequence KL [S], lengths [S], loss, gradient norm) of one step on L (Eq. loss),
        pi_Ref's log-probs first: with --offload-frozen it leaves before any gradient exists."""
        with self.phases("reference", uses=self.reference):
            ref_logprobs = reference_logprobs(self.reference, prompts, completions, self.args)
        with self.phases("update"):
            if not sequences_in_iteration:  # every query unscorable: nothing to train on
                return torch.zeros(0), torch.zeros(0), 0.0, 0.0
            return policy_update(self.policy, self.optimizer, prompts=prompts,
                                 completions=completions, ref_logprobs=ref_logprobs,
                                 advantages=advantages, weights=weights, args=self.args)

    def step(self):
        """One iteration of Algorithm 1: (metrics dict, one episode dict per query)."""
        with torch.autocast("cpu", torch.bfloat16, enabled=self.cpu_bf16):  # deviation 7
            result = self.iteration()
        self.steps_done += 1
        return result

    def iteration(self):
        args, group = self.args, self.args.num_generations
        phase, scorers = self.phases, self.scorers
        with phase("challenger"):  # 1. N queries: the Challenger's, or with --queries a file's
            count = args.num_queries // distributed.world_size()  # this process's share
            if self.dataset:
                first = self.steps_done * args.num_queries + distributed.rank() * count
                queries, statuses, query_tokens = data_queries(self.dataset, args.seed, first,
                                                               count)
            else:
                queries, statuses, query_tokens = self.write_queries(count)
            statuses = scorers.mark_unscorable(queries, statuses)
        valid = torch.tensor([status == "ok" for status in statuses])  # [N]
        answered = [query for query, ok in zip(queries, valid) if ok for _ in range(group)]
        with phase("solver"):  # 2. G answers per valid query
            solver_prompts, answer_tokens, answers = self.answer(answered)
        rewards, quality, judged = torch.empty(0), torch.empty(0), {}  # [Nv * G] each
        if answered:
            with phase("reward", uses=scorers.task_reward_model()):  # 3. R, then R_Q (judge)
                rewards, judge_output = scorers.task_rewards(answered, answers)
            if judge_output:
                judged["reward_judge_texts"], judged["reward_judge_parse_failed"] = judge_output
            if not args.no_self_reward:
                with phase("judge", uses=self.reference):
                    quality, *judge_output = scorers.judge(QUALITY_PROMPT, answered, answers)
                judged["judge_texts"], judged["judge_parse_failed"] = judge_output
        rewards = by_query(rewards, valid, group)  # [N, G], NaN rows for invalid queries
        quality = None if args.no_self_reward else by_query(quality, valid, group)  # [N, G]

        # 4. The advantages need all N queries: under torchrun every process's, then our share
        all_queries, all_valid, all_rewards, all_quality, own = distributed.gather_iteration(
            queries, valid, rewards, quality)
        recent = set().union(*self.recent)  # the problems of the last --repeat-window steps
        solver_advantages, challenger_advantages, keys = iteration_advantages(
            all_queries, all_valid, all_rewards, all_quality, self.game, recent, args)
        if query_tokens:  # the Challenger's problems, not a data set's
            self.recent.append([key for key in keys if key is not None])
        curriculum = logs.curriculum_metrics(keys, recent, all_queries, all_rewards, self.game)
        solver_advantages = solver_advantages[own]  # [N, G]
        challenger_advantages = challenger_advantages[own]  # [N]

        # 5. Answers come first, so that a micro-batch mostly shares one prompt (`prefill`)
        written = len(query_tokens)  # Challenger sequences: N, or 0 with --queries
        answers_in_iteration = group * int(all_valid.sum())  # every process's
        seq_kl, lengths, loss, grad_norm = self.update(
            prompts=solver_prompts + [self.challenger_prompt] * written,
            completions=answer_tokens + list(query_tokens),
            advantages=torch.cat([solver_advantages[valid].flatten(),
                                  challenger_advantages[:written]]),
            weights=torch.cat([torch.full((len(answers),), 1 / max(1, answers_in_iteration)),
                               torch.full((written,), args.alpha_ch / args.num_queries)]),
            sequences_in_iteration=answers_in_iteration + written)

        cut = [tokens[-1] not in self.stop_ids for tokens in answer_tokens]  # at the length limit
        answered_rows = (rewards[valid], None if quality is None else quality[valid],
                         solver_advantages[valid])  # [Nv, G] each
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "grad_clipped": float(grad_norm > args.max_grad_norm),
                   "update_skipped": float(not math.isfinite(loss + grad_norm))}
        metrics.update(logs.step_metrics(statuses, *answered_rows, challenger_advantages,
                                         seq_kl / lengths, lengths, written, cut, judged))
        metrics.update(curriculum)
        metrics.update(phase.take_times())
        episodes = logs.episode_records(queries, statuses, answers, *answered_rows,
                                        challenger_advantages, judged)
        return metrics, episodes


# --- Training loop ---------------------------------------------------------------------------

@torch.no_grad()
def greedy_answers(selfplay, queries):
    """The Solver's most likely answers, for --eval-every's dev curve (`inputs.dev_accuracy`)."""
    prompts = [selfplay.user_turn(query) for query in queries]
    answer_tokens = unpad(*sample(selfplay.policy, prompts, selfplay.args.max_completion_length,
                                  selfplay.stop_ids, temperature=0))
    return selfplay.tokenizer.batch_decode(answer_tokens, skip_special_tokens=True)


def train(args, selfplay, start_step=0):
    out = Path(args.out)
    skipped = runs.SkippedUpdates(out)
    steps = range(start_step + 1, args.steps + 1)
    bar = tqdm(steps, initial=start_step, total=args.steps, desc="LSP", dynamic_ncols=True,
               disable=distributed.rank() != 0)
    with runs.StopRequest() as stop, logs.open_logs(out) as (metrics_file, episodes_file):
        for step in bar:
            started = time.perf_counter()
            metrics, episodes = selfplay.step()
            evaluating = args.eval_every and (step % args.eval_every == 0 or step == 1)
            if evaluating and distributed.rank() == 0:
                evaluated = time.perf_counter()
                metrics["dev_accuracy"] = inputs.dev_accuracy(
                    selfplay.game, selfplay.scorers.reward_function,
                    functools.partial(greedy_answers, selfplay))
                metrics["time/eval"] = time.perf_counter() - evaluated
            metrics["time/step"] = time.perf_counter() - started
            logs.log_step(step, metrics, episodes, metrics_file, episodes_file, bar)
            if step % args.log_every == 0 or step == 1:
                logs.show_example(step, episodes)
            skipped.count(step, metrics["update_skipped"])
            stopping = stop.agreed()  # under torchrun, every process stops at the same step
            if step % args.save_every == 0 or step == args.steps or stopping:
                runs.save_checkpoint(selfplay, out, step, args.keep)
            stop.exit_if_asked(step, "lsp.py", out)
    tqdm.write(f"done: {args.steps} steps; metrics in {out / 'metrics.jsonl'}, "
               f"model in {runs.checkpoints(out)[-1]}")


# --- Main ------------------------------------------------------------------------------------

def start(args):
    """Load the models: (SelfPlay, first step); a run in --out goes on from its last checkpoint."""
    saved = runs.checkpoints(args.out)
    torch.manual_seed(args.seed)
    device = devices.default_device()
    reward_function = inputs.load_reward_function(args.reward_model)  # None for a reward model
    # with --lora the policy is the starting model (NF4 with --load-in-4bit: QLoRA) and adapters
    policy_path = str(saved[-1]) if saved and not args.lora else args.model
    tokenizer, policy = load_model(policy_path, AutoModelForCausalLM, device,
                                   args.lora and args.load_in_4bit)
    # the frozen reference pi_Ref: with --lora the policy, its adapters off (`devices.Phases`);
    # else the starting model, copied, or loaded again when it is quantized or the policy was not
    if args.lora:
        reference = policy
    elif args.load_in_4bit or saved:
        _, reference = load_model(args.model, AutoModelForCausalLM, device, args.load_in_4bit)
    else:
        reference = copy.deepcopy(policy)
    freeze(reference)
    adapters = lora.add_adapters(policy, args, saved) if args.lora else None  # new or saved ones
    if device.type == "cuda":
        devices.exit_if_too_big(args, policy, device, LOGPROB_CHUNK_TOKENS)
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    reward_model = reward_tokenizer = None
    if args.reward_model != "self" and not reward_function:
        reward_tokenizer, reward_model = load_model(
            args.reward_model, AutoModelForSequenceClassification, device, args.load_in_4bit)
        freeze(reward_model)
    selfplay = SelfPlay(args, policy, tokenizer, reference, reward_model, reward_tokenizer,
                        reward_function, adapters)
    return selfplay, runs.resume(selfplay, args, device)


def main(argv=None):
    distributed.init_processes()  # under torchrun: join the other processes
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
        distributed.finish_processes()


if __name__ == "__main__":
    main()
