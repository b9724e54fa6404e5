"""Evaluation and plots for Language Self-Play: did the self-play make the model better?

    eval   pairwise win rate of a model (e.g. a trainer checkpoint) against a baseline (e.g. the
           model it started from), judged by a language model, in the spirit of the paper's
           AlpacaEval numbers (win rate against the base model).
    score  accuracy of a model on a game's held-out set (arith_game.heldout_set by default),
           per level, with 95% Wilson intervals: the exact, judge-free check of a game run.
    plot   the training curves of a run directory (RUN_DIR/metrics.jsonl -> RUN_DIR/curves.png).
    curriculum  what a game run's Challenger wrote: distinct problems, the most frequent ones,
           difficulty early and late, and the Solver's success on them.
    merge  a LoRA checkpoint (lsp.py --lora) as a plain model directory; the other commands
           read such a checkpoint as it is.

How `eval` scores, and the choices made:
    1. Both models answer every instruction greedily (temperature 0 with lsp.sample). The paper
       samples at temperature 0.01, of which greedy decoding is the limit; greedy also makes a run
       repeatable.
    2. The judge (by default the baseline model itself) sees the instruction and both answers with
       PAIRWISE_PROMPT and must end with [[A]], [[B]] or [[tie]]. Each pair is judged twice, once
       with the model's answer first and once with the baseline's first: judges, small ones above
       all, prefer one position, and the two orders cancel that preference.
    3. A verdict gives the model 1 (win), 0.5 (tie) or 0 (loss). An instruction's score is the
       mean of its two orders (0, .25, .5, .75 or 1); the win rate is the mean over instructions,
       with a 95% interval from the spread of the per-instruction scores.
    4. Judge text without exactly one valid tag is a parse failure, handled as lsp.py handles
       judge scores (its deviation 3): we append "[[" to the judge's own text and take whichever
       of "A" and "B" the judge gives the higher probability next. Failures are counted in the
       report and marked in the verdicts file.
    5. The trainer sees no data at all, so any instruction set is held out. The built-in set
       (EVAL_INSTRUCTIONS, 40 instructions written for this project) is a quick check; for
       numbers comparable to the paper pass AlpacaEval's 805 instructions with --prompts.

How `score` scores: the model answers each held-out problem greedily, as one user turn, and is
right when the game's reward gives its answer 1 (for arith_game: when the last integer of its
text is the true value). Greedy,
because it is the answer the model finds most likely and has no sampling noise: a score is
repeatable, and two checkpoints differ only by their weights. An interval is Wilson's
(`wilson_interval`), which, unlike p +- 1.96 sqrt(p (1 - p) / n), stays within [0, 1] and is not
zero-width at 0 or n right, both common for a small model on 64 problems a level.

Run (from the repository root):
    python eval.py eval --model runs/demo/checkpoint-000003 --baseline smollm2 \
        --max-new-tokens 128 --max-judge-tokens 32 --out runs/demo/verdicts.jsonl
    python eval.py score --model smollm2                        # CPU, the base model
    python eval.py score --model runs/game/checkpoint-000025    # a run on the arithmetic game
    python eval.py plot runs/demo                               # runs/demo/curves.png
    python eval.py merge runs/lora/checkpoint-000050 --out runs/lora-merged
"""

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import lsp
from judge_prompts import EVAL_INSTRUCTIONS, PAIRWISE_PROMPT
from machinery import lora
from machinery.devices import default_device
from machinery.inputs import (call_reward_function, chat_prompt, load_game, problem_key,
                              read_instructions)
from machinery.logs import read_jsonl


# --- Options ---------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="Evaluate LSP models, score them on the arithmetic game, plot LSP runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("eval", help="win rate of --model against --baseline")
    arg = compare.add_argument
    arg("--model", required=True, help="hub id, local path (a run's checkpoint) or 'smollm2'")
    arg("--baseline", required=True, help="model to compare with, e.g. the one trained from")
    arg("--judge", help="model that judges the pairs (default: the baseline)")
    arg("--prompts", help="instructions: one per line, or JSONL with an 'instruction' field "
        "(default: the built-in 40)")
    arg("--out", default="verdicts.jsonl", help="per-instruction verdicts, a JSON line each")
    arg("--max-new-tokens", type=int, default=256, help="longest answer of each model")
    arg("--max-judge-tokens", type=int, default=128, help="longest judge output")
    arg("--batch-size", type=int, default=8, help="prompts per batch when generating")
    heldout = commands.add_parser("score", help="accuracy on a game's held-out set")
    arg = heldout.add_argument
    arg("--model", required=True, help="hub id, local path (a run's checkpoint) or 'smollm2'")
    arg("--game", default="arith_game.py", help="the game file, with heldout_set() and reward")
    arg("--split", choices=["heldout", "dev"], default="heldout",
        help="heldout: for results; dev: for choosing settings")
    arg("--per-level", type=int, help="problems per level (default: the set's own, 64 held out)")
    arg("--max-new-tokens", type=int, default=32, help="longest answer")
    arg("--batch-size", type=int, default=16, help="prompts per batch when generating")
    arg("--out", default="heldout.jsonl", help="per-problem answers, a JSON line each")
    merge = commands.add_parser("merge", help="a LoRA checkpoint as a plain model directory")
    merge.add_argument("checkpoint", help="a checkpoint of a run trained with --lora")
    merge.add_argument("--out", required=True, help="directory for the merged model")
    curriculum = commands.add_parser("curriculum", help="sum up a game run's Challenger")
    curriculum.add_argument("run_dir", help="run directory written by lsp.py --game")
    curriculum.add_argument("--window", type=int, default=10, help="steps counted as early/late")
    plot = commands.add_parser("plot", help="plot RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir", help="run directory written by the trainer (--out)")
    plot.add_argument("--out", help="image file (default: RUN_DIR/curves.png)")
    return parser


# --- Generation: answers and judgements ------------------------------------------------------

def greedy(model, tokenizer, prompts, max_new_tokens, batch_size, desc):
    """Greedy completions (token lists, with the stop token) of token-id prompts, in their order.

    Prompts are batched in order of length, so that a batch wastes little compute on padding.
    """
    stop_ids = lsp.stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, dynamic_ncols=True):
        rows = order[start:start + batch_size]
        batch = [prompts[i] for i in rows]
        sampled = lsp.sample(model, batch, max_new_tokens, stop_ids, temperature=0)
        for i, tokens in zip(rows, lsp.unpad(*sampled)):
            completions[i] = tokens
    return completions


def answer(model, tokenizer, instructions, args, desc):
    """(answer texts, how many were cut at --max-new-tokens): each instruction as one user turn."""
    prompts = [chat_prompt(tokenizer, instruction) for instruction in instructions]
    tokens = greedy(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, desc)
    stop_ids = lsp.stop_token_ids(model, tokenizer)
    clipped = sum(not t or t[-1] not in stop_ids for t in tokens)
    return tokenizer.batch_decode(tokens, skip_special_tokens=True), clipped


VERDICT_TAG = re.compile(r"\[\[([^\[\]]*)\]\]")
VERDICTS = {"a": "A", "b": "B", "tie": "tie"}


def parse_verdict(text):
    """'A', 'B' or 'tie' from the judge's [[...]] tag (any case), or None.

    None when there is no tag, a tag holds anything else, or tags disagree. Only the judge's own
    output is parsed, never the prompt, so an answer that contains "[[A]]" cannot decide.
    >>> parse_verdict("A is correct and B is not. [[A]]"), parse_verdict("[[A]] or [[B]]")
    ('A', None)
    """
    values = {value.strip().lower() for value in VERDICT_TAG.findall(text)}
    return VERDICTS.get(values.pop()) if len(values) == 1 else None


@torch.no_grad()
def judge_pairs(judge, tokenizer, triples, args):
    """Verdicts on (instruction, answer A, answer B) triples: 'A', 'B' or 'tie' for each.

    Returns verdicts, the judge's texts and parse_failed flags. An unparsed judgement gets the
    verdict the judge leans to right after "[[" is appended to its own text (module choice 4).
    We compare "A" with "B" rather than counting a failure as a tie: ties would pull every win
    rate towards 50% by however often a weak judge fails, hiding what signal it has.
    """
    prompts = [
        chat_prompt(tokenizer, PAIRWISE_PROMPT.format(instruction=q, answer_a=a, answer_b=b))
        for q, a, b in triples
    ]
    judged = greedy(judge, tokenizer, prompts, args.max_judge_tokens, args.batch_size, "judge")
    texts = tokenizer.batch_decode(judged, skip_special_tokens=True)
    verdicts = [parse_verdict(text) for text in texts]
    parse_failed = [verdict is None for verdict in verdicts]
    failed = [i for i, f in enumerate(parse_failed) if f]
    stop_ids = lsp.stop_token_ids(judge, tokenizer)
    # the tokens "\n[[A" and "\n[[B" share, then the first where they differ: SmolLM2 splits
    # "[[" from the letter, but tokenizers differ, and one may merge a bracket with the letter
    tag_a, tag_b = (tokenizer.encode("\n[[" + letter, add_special_tokens=False) for letter in "AB")
    shared = next(k for k, (a, b) in enumerate(zip(tag_a, tag_b)) if a != b)
    letters = [tag_a[shared], tag_b[shared]]
    batches = range(0, len(failed), args.batch_size)
    for start in tqdm(batches, desc="judge, parse failures", dynamic_ncols=True):
        rows = failed[start:start + args.batch_size]
        logits = lsp.logits_after(judge, [prompts[i] for i in rows], [judged[i] for i in rows],
                                  tag_a[:shared], stop_ids)  # [b, V]
        for i, (a, b) in zip(rows, logits[:, letters].tolist()):  # "A", "B"
            verdicts[i] = "A" if a > b else "B" if b > a else "tie"
    return verdicts, texts, parse_failed


# --- Win rate --------------------------------------------------------------------------------

def order_score(verdict, model_first):
    """The model's score for one judgement: 1 win, 0.5 tie, 0 loss; A is whoever went first."""
    score = {"A": 1.0, "tie": 0.5, "B": 0.0}[verdict]
    return score if model_first else 1.0 - score


def both_orders(instructions, model_answers, baseline_answers):
    """The judge's inputs (instruction, answer A, answer B): row 2i has the model's answer first,
    row 2i + 1 the baseline's, so that a preference for one position cancels."""
    return [triple for q, ours, theirs in zip(instructions, model_answers, baseline_answers)
            for triple in ((q, ours, theirs), (q, theirs, ours))]


def score_records(instructions, model_answers, baseline_answers, verdicts, texts, failed):
    """One record per instruction from the judge's rows laid out by `both_orders`; its score is
    the mean of the model's scores in the two orders: 0, .25, .5, .75 or 1."""
    records = []
    for i, instruction in enumerate(instructions):
        record = {"instruction": instruction, "model_answer": model_answers[i],
                  "baseline_answer": baseline_answers[i]}
        for row, order in ((2 * i, "model_first"), (2 * i + 1, "baseline_first")):
            score = order_score(verdicts[row], model_first=order == "model_first")
            record[order] = {"judge_text": texts[row], "verdict": verdicts[row],
                             "parse_failed": failed[row], "score": score}
        record["score"] = (record["model_first"]["score"] + record["baseline_first"]["score"]) / 2
        records.append(record)
    return records


def win_rate(scores):
    """(mean, low, high): the mean of per-instruction scores and its 95% interval, within [0, 1].

    Normal approximation, mean +- 1.96 sd / sqrt(n). Instructions are independent draws; the two
    orders of one instruction are not (same answers), which is why they are averaged first.
    >>> [round(x, 3) for x in win_rate([1.0, 0.5, 0.75, 0.25])]
    [0.625, 0.309, 0.941]
    """
    mean = statistics.fmean(scores)
    if len(scores) < 2:  # one instruction says nothing about the spread
        return mean, 0.0, 1.0
    half_width = 1.96 * statistics.stdev(scores) / math.sqrt(len(scores))
    return mean, max(0.0, mean - half_width), min(1.0, mean + half_width)


def evaluate(args):
    instructions = read_instructions(args.prompts) if args.prompts else EVAL_INSTRUCTIONS
    device = default_device()
    loaded, timings, started = {}, {}, time.perf_counter()

    def model_named(name):
        # one model in memory at a time; a name used twice (the judge is the baseline) loads once
        if name not in loaded:
            loaded.clear()
            tokenizer, model = lsp.load_model(name, AutoModelForCausalLM, device)
            loaded[name] = tokenizer, lsp.freeze(model)
        return loaded[name]

    answers, clipped = {}, {}
    for role in ("model", "baseline"):
        tokenizer, model = model_named(getattr(args, role))
        clock = time.perf_counter()
        answers[role], clipped[role] = answer(model, tokenizer, instructions, args,
                                              f"answers ({role})")
        timings[role] = time.perf_counter() - clock

    tokenizer, judge = model_named(args.judge or args.baseline)
    clock = time.perf_counter()
    triples = both_orders(instructions, answers["model"], answers["baseline"])
    verdicts, texts, failed = judge_pairs(judge, tokenizer, triples, args)
    timings["judge"] = time.perf_counter() - clock

    records = score_records(instructions, answers["model"], answers["baseline"], verdicts, texts,
                            failed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(record) + "\n" for record in records))

    mean, low, high = win_rate([record["score"] for record in records])
    decisive = [v for v in verdicts if v != "tie"]
    n, judgements = len(instructions), len(verdicts)
    print(f"\n{args.model} vs {args.baseline}, judged by {args.judge or args.baseline}: "
          f"{n} instructions, each judged in both orders")
    print(f"win rate {mean:.3f}  (95% interval {low:.3f} to {high:.3f}; a tie counts half)")
    order_scores = [record[order]["score"] for record in records
                    for order in ("model_first", "baseline_first")]
    print(f"judgements: {order_scores.count(1.0)} wins, {order_scores.count(0.5)} ties, "
          f"{order_scores.count(0.0)} losses of {judgements}; the first answer won "
          f"{decisive.count('A')} of {len(decisive)} decided (position bias)")
    if decisive and len(set(decisive)) == 1:
        print("warning: every decided judgement went to the same position, so the verdicts "
              "follow the order of the answers, not their content; the win rate says nothing "
              "here: use a stronger --judge")
    print(f"parse failures: {sum(failed)} of {judgements} judgements, decided by the judge's "
          "next-token probabilities of A and B")
    print(f"answers cut at {args.max_new_tokens} tokens: model {clipped['model']}, "
          f"baseline {clipped['baseline']} of {n}")
    print(f"time: answers {timings['model']:.0f} s (model) and {timings['baseline']:.0f} s "
          f"(baseline), judge {timings['judge']:.0f} s, "
          f"total {time.perf_counter() - started:.0f} s with loading")
    print(f"verdicts in {out}")
    return {"win_rate": mean, "interval": (low, high), "parse_failures": sum(failed),
            "records": records}


# --- Held-out score on the arithmetic game ---------------------------------------------------

def wilson_interval(right, n, z=1.96):
    """(low, high): the Wilson score interval of the proportion right / n, 95% for z = 1.96.

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)
    At 0 right the upper bound is z^2 / (n + z^2). No problems at all say nothing: (0.0, 1.0).
    >>> intervals = wilson_interval(41, 64) + wilson_interval(0, 64) + wilson_interval(64, 64)
    >>> [round(x, 4) for x in intervals]
    [0.5182, 0.7471, 0.0, 0.0566, 0.9434, 1.0]
    """
    if n == 0:
        return 0.0, 1.0
    p, z2 = right / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half_width), min(1.0, center + half_width)  # rounding at 0 or n right


def score(args):
    """Greedy accuracy of --model on the game's heldout_set(--per-level), or dev_set: returns
    {level: (right, n, accuracy, low, high)} for each level, in the set's order, then "all"."""
    game = load_game(args.game)
    if not hasattr(game, f"{args.split}_set"):
        sys.exit(f"error: --game {args.game} has no {args.split}_set() to score on")
    try:  # before loading the model: too many problems for a level fails at once
        problem_set = getattr(game, f"{args.split}_set")
        problems = problem_set(args.per_level) if args.per_level else problem_set()
    except ValueError as error:
        sys.exit(f"error: --per-level {args.per_level}: {error}")
    device = default_device()
    started = time.perf_counter()
    tokenizer, model = lsp.load_model(args.model, AutoModelForCausalLM, device)
    model = lsp.freeze(model)
    clock = time.perf_counter()
    prompts = [chat_prompt(tokenizer, problem["query"]) for problem in problems]
    tokens = greedy(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, "answers")
    answering = time.perf_counter() - clock
    stop_ids = lsp.stop_token_ids(model, tokenizer)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    queries = [problem["query"] for problem in problems]
    rewards = call_reward_function(game.reward, queries, texts).tolist()
    records = []
    for problem, text, reward, answer_tokens in zip(problems, texts, rewards, tokens):
        clipped = not answer_tokens or answer_tokens[-1] not in stop_ids
        records.append({**problem, "text": text, "reward": reward, "right": reward == 1.0,
                        "clipped": clipped})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(record) + "\n" for record in records))

    results = {}
    for level in [*dict.fromkeys(record["level"] for record in records), "all"]:
        rights = [record["right"] for record in records if level in ("all", record["level"])]
        right, n = sum(rights), len(rights)
        results[level] = (right, n, right / n, *wilson_interval(right, n))
    print(f"\n{args.model} on the {args.split} set of {args.game}: {len(records)} problems, "
          f"greedy, up to {args.max_new_tokens} tokens")
    print(f"{'level':<16} {'right/n':>9} {'accuracy':>9}   95% interval")
    for level, (right, n, accuracy, low, high) in results.items():
        print(f"{level:<16} {f'{right}/{n}':>9} {accuracy:>9.3f}   {low:.3f} to {high:.3f}")
    cut = sum(record["clipped"] for record in records)
    print(f"answers cut at {args.max_new_tokens} tokens: {cut} of {len(records)}")
    print(f"answers in {out}")
    total = time.perf_counter() - started
    print(f"time: answers {answering:.0f} s, total {total:.0f} s with loading")
    return results


# --- Plot ------------------------------------------------------------------------------------

PANELS = [  # (title, metrics drawn in it)
    ("solver reward R", ["reward"]),
    ("self-reward R_Q (0..7)", ["self_reward"]),
    ("challenger reward -V + V_Q", ["challenger_reward"]),
    ("KL to the reference, per token", ["kl"]),
    ("length (tokens)", ["answer_length", "query_length"]),
    ("failure rates", ["reward_judge_parse_failure_rate", "judge_parse_failure_rate",
                       "query_invalid_rate"]),
    # a game's curriculum: are the Challenger's problems new, at the Solver's edge, harder?
    ("the Challenger's problems", ["query_distinct_rate", "query_repeat_rate",
                                   "query_edge_rate"]),
    ("difficulty of the valid problems (game)", ["query_difficulty"]),
    ("dev accuracy, greedy (--eval-every)", ["dev_accuracy"]),
]


def moving_average(values, window):
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(args):
    try:  # optional: only this command needs matplotlib
        import matplotlib
        matplotlib.use("Agg")  # write files, never open a window
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        sys.exit("error: the plot command needs matplotlib: pip install matplotlib")
    path = Path(args.run_dir) / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"error: no metrics.jsonl in {args.run_dir}")
    rows = read_jsonl(path)  # a line cut by a kill is skipped
    if not rows:
        sys.exit(f"error: {path} holds no steps")
    window = max(1, min(50, len(rows) // 10))
    figure, axes = plt.subplots(3, 3, figsize=(16, 11), sharex=True, constrained_layout=True)
    for ax, (title, names) in zip(axes.flat, PANELS):
        for color, name in zip(("C0", "C1", "C2"), names):
            # a step without the metric (null in LSP-Zero, NaN, no valid query) is left out
            points = [(row["step"], row[name]) for row in rows
                      if isinstance(row.get(name), (int, float)) and math.isfinite(row[name])]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, "o", color=color, alpha=0.4, markersize=3)
            ax.plot(steps, moving_average(values, window), "-", color=color, label=name)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:  # e.g. the self-reward of an LSP-Zero run, the difficulty of a run with no game
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_yticks([])
    for ax in axes.flat[len(PANELS):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    figure.suptitle(f"{args.run_dir}: {len(rows)} steps; dots are steps, "
                    f"lines a {window}-step moving average")
    out = args.out or Path(args.run_dir) / "curves.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    print(f"wrote {out}")
    return out


# --- The curriculum of a game run ------------------------------------------------------------

def curriculum(args):
    """Sum up what a run's Challenger wrote, from its episodes.jsonl and metrics.jsonl: the
    share of distinct problems among the valid ones, the most frequent problems, the mean
    difficulty of the first and last --window steps, and the steps whose success rate (mean R)
    lay between 0.2 and 0.8. Returns the numbers as a dict."""
    run_dir = Path(args.run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    game = load_game(config["game"]) if config.get("game") else None
    valid = [e for e in read_jsonl(run_dir / "episodes.jsonl") if e["query_status"] == "ok"]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    problems = Counter(problem_key(game, episode["query"]) for episode in valid)
    difficulty = [m["query_difficulty"] for m in metrics if "query_difficulty" in m]
    rewards = [m["reward"] for m in metrics if m.get("reward") is not None]
    summary = {
        "steps": len(metrics), "valid": len(valid), "distinct": len(problems),
        "most_frequent": problems.most_common(5),
        "difficulty_first": statistics.fmean(difficulty[:args.window] or [math.nan]),
        "difficulty_last": statistics.fmean(difficulty[-args.window:] or [math.nan]),
        "steps_at_the_edge": sum(0.2 <= reward <= 0.8 for reward in rewards),
        "steps_answered": len(rewards)}
    print(f"{run_dir}: {summary['steps']} steps, {summary['valid']} valid problems, "
          f"{summary['distinct']} distinct ({summary['distinct'] / max(1, len(valid)):.0%})")
    print("most frequent: " + ", ".join(f"{key} x{n}" for key, n in summary["most_frequent"]))
    print(f"mean difficulty: first {args.window} steps {summary['difficulty_first']:.2f}, "
          f"last {args.window} steps {summary['difficulty_last']:.2f}")
    print(f"steps whose success rate was within 0.2-0.8: {summary['steps_at_the_edge']} of "
          f"{summary['steps_answered']}")
    return summary


def merge(args):
    """Save a LoRA checkpoint's base model with the adapters added into its weights."""
    if lora.base_model_name(args.checkpoint) is None:
        sys.exit(f"error: {args.checkpoint} holds no LoRA adapters (no adapter_config.json)")
    tokenizer, model = lsp.load_model(args.checkpoint, AutoModelForCausalLM, default_device())
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged model in {args.out}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plot":
        return plot(args)
    if args.command == "merge":
        return merge(args)
    for name in ("max_new_tokens", "max_judge_tokens", "batch_size", "per_level", "window"):
        value = getattr(args, name, None)  # each command has some of these
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.command == "curriculum":
        return curriculum(args)
    return score(args) if args.command == "score" else evaluate(args)


if __name__ == "__main__":
    main()
