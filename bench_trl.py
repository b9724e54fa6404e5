"""This trainer against TRL's GRPOTrainer, side by side on the same work, over paired seeds: the
arithmetic game's data baseline (`lsp.py --queries`), which is what most people run with TRL.

    python bench.py --against trl                            # 10 steps, seed 0
    python bench.py --against trl --steps 10 25 --seeds 0 1 2   # docs/performance.md

It needs `pip install trl`; the trainer does not. For each seed both trainers get:
    the same model        SmolLM2-135M-Instruct (a GPU: --model with the 3B shape's directory),
                          saved once as a plain checkpoint that both load
    the same queries      the game's training set (arith_game.training_set, 512 problems), read
                          in the same order step by step: the seed's `data_order`, which lsp.py
                          reads itself and TRL reads as its dataset, unshuffled
    the same reward       arith_game.reward
    the same update       N = 4 queries x G = 8 answers a step, in micro-batches of 8, 32 answer
                          tokens, temperature 0.7, learning rate 1e-5 (constant), beta 0.05 (the
                          k3 KL to a frozen reference), AdamW without weight decay, lsp.py's
                          clipping, float32: on the same answers both take the same step
They run one after the other, each in its own process, so that each peak memory is its own. Then
`eval.py score` scores both models on the held-out set at each of --steps. The table gives, per
seed and as the mean over seeds with its 95% interval (seeds.py), the held-out score per level,
seconds per step (the mean over the steps after the first) split into generation and the rest,
the peak resident memory of each process, the share of groups whose answers all got the same
reward, and the share of steps whose gradient was clipped. What cannot match is listed under
the table (UNMATCHED).
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import eval as evaluation  # an alias: `eval` would shadow the builtin
from machinery.inputs import data_order
from seeds import mean_interval, show

HERE = Path(__file__).parent
UNMATCHED = [
    "Loss normalization: ours sums log-probs over an answer's tokens and weighs each answer "
    "1 / (N G); TRL's loss_type='dr_grpo', the closest, divides the same sum by N G times "
    "max_completion_length (L = 32). Its gradient is ours / L, so TRL clips at "
    "max_grad_norm / L and its Adam eps is 1e-8 / L: then both take the same step.",
    "Ratio and KL: TRL multiplies the advantage by pi / pi_old, clipped at 1 +- 0.2; with one "
    "update per generation (num_iterations=1) the ratio is 1 and the gradient is ours. TRL's "
    "KL correction (use_bias_correction_kl) is off, so its KL term is the k3 of ours.",
    "Queries: the same, step by step (the seed's data_order); TRL reads them unshuffled.",
    "Sampling: TRL generates with model.generate, we with our own sampler; both sample at "
    "temperature 0.7 with no top-p or top-k truncation and stop at the EOS, but from different "
    "random streams: the answers differ from the first step on, not in distribution.",
    "Precision: float32 in both (our --cpu-bf16 off); on a CPU with bf16 units ours runs faster "
    "with its default bf16 autocast.",
]


def lsp_default(name):
    """The default of one of lsp.py's options (offline: no hub model is named)."""
    import lsp
    with tempfile.TemporaryDirectory() as empty:
        defaults = lsp.parse_args(["--model", "smollm2", "--reward-model", "self", "--out", empty])
    return getattr(defaults, name)


def settings(options, seed=0):
    """The work both trainers do, in the names of lsp.py's options."""
    return {"model": options.model, "queries": options.queries, "steps": max(options.steps),
            "save_at": sorted(options.steps), "num_queries": 4, "num_generations": 8,
            "micro_batch_size": 8, "max_completion_length": 32, "temperature": 0.7,
            "learning_rate": 1e-5, "beta": 0.05,
            "max_grad_norm": lsp_default("max_grad_norm"), "seed": seed}


def trl_config(work, out):
    """TRL's GRPOConfig for the same work: one optimizer step per N x G answers, generated at
    once and trained on in micro-batches (gradient accumulation)."""
    from trl import GRPOConfig  # optional: pip install trl
    micro_batches = work["num_queries"] * work["num_generations"] // work["micro_batch_size"]
    length = work["max_completion_length"]  # dr_grpo's gradient is ours / length: UNMATCHED[0]
    return GRPOConfig(
        output_dir=out, max_steps=work["steps"], seed=work["seed"],
        per_device_train_batch_size=work["micro_batch_size"],
        gradient_accumulation_steps=micro_batches, steps_per_generation=micro_batches,
        num_generations=work["num_generations"], num_iterations=1, shuffle_dataset=False,
        max_completion_length=length, temperature=work["temperature"], top_p=1.0, top_k=0,
        learning_rate=work["learning_rate"], lr_scheduler_type="constant", beta=work["beta"],
        use_bias_correction_kl=False, loss_type="dr_grpo", scale_rewards="none",
        mask_truncated_completions=False, max_grad_norm=work["max_grad_norm"] / length,
        adam_epsilon=1e-8 / length, weight_decay=0.0, optim="adamw_torch",
        gradient_checkpointing=False, bf16=False, use_cpu=not torch.cuda.is_available(),
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)


def ordered_queries(work):
    """The queries of every step, in order: what lsp.py reads with --queries and this seed."""
    from machinery import inputs
    queries = inputs.read_instructions(work["queries"])
    order = data_order(len(queries), work["seed"], work["steps"] * work["num_queries"])
    return [queries[i] for i in order.tolist()]


def train_ours(work, out):
    """Our trainer, as `python lsp.py --game arith_game.py --queries ...` runs it: the
    checkpoints at work["save_at"] and each step's metrics."""
    import lsp
    every = math.gcd(*work["save_at"])
    lsp.main(["--game", str(HERE / "arith_game.py"), "--queries", work["queries"],
              "--model", work["model"], "--steps", str(work["steps"]),
              "--num-queries", str(work["num_queries"]),
              "--num-generations", str(work["num_generations"]),
              "--micro-batch-size", str(work["micro_batch_size"]),
              "--max-completion-length", str(work["max_completion_length"]),
              "--temperature", str(work["temperature"]),
              "--learning-rate", str(work["learning_rate"]), "--beta", str(work["beta"]),
              "--max-grad-norm", str(work["max_grad_norm"]), "--seed", str(work["seed"]),
              "--cpu-bf16", "off", "--eval-every", "0", "--log-every", str(work["steps"]),
              "--save-every", str(every), "--keep", str(work["steps"] // every), "--out", out])
    steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    episodes_file = Path(out) / "episodes.jsonl"
    episodes = [json.loads(line) for line in episodes_file.read_text().splitlines()]
    queries = [[episode["query"] for episode in episodes if episode["step"] == step["step"]]
               for step in steps]
    return {"models": {step: str(Path(out) / f"checkpoint-{step:06d}")
                       for step in work["save_at"]},
            "steps": [step["time/step"] for step in steps],
            "generation": [step["time/solver"] for step in steps],
            "rewards": [step["reward"] for step in steps],
            "no_signal": [step["frac_reward_zero_std"] for step in steps],
            "clipped": [step["grad_clipped"] for step in steps], "queries": queries}


def train_trl(work, out):
    """TRL's GRPOTrainer on the same work: the models at work["save_at"] and each step's
    seconds, generation seconds, mean reward, groups without signal and clipping."""
    from datasets import Dataset
    from trl import GRPOTrainer
    import arith_game
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": query}]}
                                 for query in ordered_queries(work)])

    queries = []  # each step's, as the reward sees them: TRL scores a step's answers at once

    def arithmetic(prompts, completions, **kwargs):  # TRL's reward signature
        questions = [prompt[-1]["content"] for prompt in prompts]
        answers = [completion[-1]["content"] for completion in completions]
        queries.append(list(dict.fromkeys(questions)))  # G answers a query
        return arith_game.reward(questions, answers)

    config = trl_config(work, out)
    trainer = GRPOTrainer(model=work["model"], reward_funcs=[arithmetic], args=config,
                          train_dataset=dataset)
    step_times, generation_times, models = [], [], {}
    generate = trainer._generate  # time what TRL spends sampling, as our time/solver does

    def timed_generate(*args, **kwargs):
        started = time.perf_counter()
        result = generate(*args, **kwargs)
        generation_times.append(time.perf_counter() - started)
        return result
    trainer._generate = timed_generate

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.started)
            if state.global_step in work["save_at"]:  # not timed: our saving is not either
                models[state.global_step] = os.path.join(out, f"step-{state.global_step}")
                trainer.save_model(models[state.global_step])
    trainer.add_callback(StepTimer())
    trainer.train()
    logged = [line for line in trainer.state.log_history if "reward" in line]
    return {"models": models, "steps": step_times, "generation": generation_times,
            "rewards": [line["reward"] for line in logged],
            "no_signal": [line["frac_reward_zero_std"] for line in logged],
            "clipped": [float(line["grad_norm"] > config.max_grad_norm) for line in logged],
            "queries": queries}


def run_one(name, work, out):
    """In a process of its own: train with one trainer and print what was measured."""
    train = train_ours if name == "ours" else train_trl
    result = train(work, out)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
    print("BENCH " + json.dumps(result))


def measure(name, work, out):
    command = [sys.executable, str(HERE / "bench_trl.py"), "--run-one", name,
               "--work", json.dumps(work), "--out", out]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if result.returncode or not lines:
        sys.exit(f"error: the {name} run failed:\n{result.stderr[-3000:]}")
    measured = json.loads(lines[-1].removeprefix("BENCH "))
    measured["models"] = {int(step): path for step, path in measured["models"].items()}
    return measured


def heldout(model, out):
    """Right answers per level of `eval.py score` on the held-out set (it prints its table)."""
    scores = evaluation.main(["score", "--model", model, "--out", out])
    return {level: right for level, (right, n, *_) in scores.items()}


def prepare(options, workdir):
    """The shared checkpoint of the model and the training queries' file."""
    import arith_game
    import lsp
    if options.model == "smollm2":  # the GGUF file, dequantized and saved as a checkpoint
        tokenizer, model = lsp.load_model("smollm2", transformers.AutoModelForCausalLM,
                                          torch.device("cpu"))
        options.model = os.path.join(workdir, "smollm2")
        model.save_pretrained(options.model)
        tokenizer.save_pretrained(options.model)
    options.queries = os.path.join(workdir, "queries.txt")
    rows = arith_game.training_set(512, seed=0)
    Path(options.queries).write_text("".join(row["query"] + "\n" for row in rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--steps", type=int, nargs="+", default=[10],
                        help="score both models after each of these steps; train to the last")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="paired seeds")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local checkpoint")
    parser.add_argument("--run-one", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.run_one:
        return run_one(options.run_one, json.loads(options.work), options.out)
    try:
        import trl
    except ImportError:
        sys.exit("error: the comparison with TRL needs it: pip install trl")
    if max(options.steps) < 2 or min(options.steps) < 1:
        parser.error("--steps must be at least 1, the last at least 2: the first step warms up")
    if len(set(options.seeds)) < len(options.seeds):
        parser.error("--seeds must be distinct")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as workdir:  # 2 GB a checkpoint
        prepare(options, workdir)
        for seed in options.seeds:
            work = settings(options, seed)
            for name in ("ours", "trl"):
                out = os.path.join(workdir, f"{name}-{seed}")
                result = measure(name, work, out)
                result["heldout"] = {step: heldout(model, f"{out}-heldout-{step}.jsonl")
                                     for step, model in result["models"].items()}
                results[name, seed] = result
                subprocess.run(["rm", "-rf", out])  # its checkpoints: scored, no longer needed
    print_table(results, options.seeds, work, trl.__version__)
    return results


def per_seed_rows(results, seeds, work):
    """{row name: {trainer: [value per seed]}}: the table's rows before the means."""
    rows = {}

    def add(name, trainer, value):
        rows.setdefault(name, {}).setdefault(trainer, []).append(value)
    for (trainer, seed), result in results.items():
        for step in work["save_at"][:-1]:
            add(f"held-out, all, step {step}", trainer, result["heldout"][step]["all"])
        for level, right in result["heldout"][work["steps"]].items():
            add("held-out, all" if level == "all" else f"  {level}", trainer, right)
        steps = result["steps"][1:]  # the first step warms up
        generation = sum(result["generation"][1:]) / len(steps)  # one generation a step
        add("seconds per step (mean after the first)", trainer, statistics.fmean(steps))
        add("  of which generation", trainer, generation)
        add("  the rest: rewards, log-probs, backward, step", trainer,
            statistics.fmean(steps) - generation)
        add("training seconds to the last step", trainer, sum(result["steps"]))
        add("peak memory of the process, GiB", trainer, result["peak_rss"] / 2**30)
        add("mean reward of the answers, over the steps", trainer,
            statistics.fmean(result["rewards"]))
        add("groups whose answers all got one reward", trainer,
            statistics.fmean(result["no_signal"]))
        add("steps whose gradient was clipped", trainer, statistics.fmean(result["clipped"]))
    return rows


def print_table(results, seeds, work, trl_version):
    rows = per_seed_rows(results, seeds, work)
    seed_columns = " | ".join(f"seed {seed}" for seed in seeds)
    print(f"\n{work['steps']} steps, {work['num_queries']} x {work['num_generations']} answers, "
          f"paired seeds (the same queries step by step); mean ± 95% interval over seeds")
    print(f"| | trainer | {seed_columns} | mean |")
    print(f"|---|---|{'---|' * len(seeds)}---|")
    for name, by_trainer in rows.items():
        for trainer, label in (("ours", "ours"), ("trl", f"TRL {trl_version}")):
            values = by_trainer[trainer]
            digits = 0 if isinstance(values[0], int) else 3  # right answers are counts
            cells = " | ".join(f"{value:.{digits}f}" for value in values)
            print(f"| {name} | {label} | {cells} | {show(*mean_interval(values), digits)} |")
    paired = all(results["ours", seed]["queries"] == results["trl", seed]["queries"]
                 for seed in seeds)
    print(f"\nthe same queries step by step in both trainers, every seed: {paired}")
    print_catch_up(results, seeds, work)
    print(f"\nboth on {torch.__version__} / transformers {transformers.__version__}; "
          "settings that cannot match exactly:")
    for note in UNMATCHED:
        print(f"- {note}")


def print_catch_up(results, seeds, work):
    """The first of our scored steps whose mean held-out reaches TRL's at the last step, and
    the training time each trainer took to get there."""
    last = work["steps"]
    target = statistics.fmean(results["trl", seed]["heldout"][last]["all"] for seed in seeds)
    trl_seconds = statistics.fmean(sum(results["trl", seed]["steps"]) for seed in seeds)
    for step in work["save_at"]:
        ours = statistics.fmean(results["ours", seed]["heldout"][step]["all"] for seed in seeds)
        if ours >= target:
            seconds = statistics.fmean(sum(results["ours", seed]["steps"][:step])
                                       for seed in seeds)
            print(f"\nours reaches TRL's {last}-step held-out ({target:.1f}) at step {step} "
                  f"({ours:.1f}): {seconds:.0f} s of training against TRL's {trl_seconds:.0f} s, "
                  f"{seconds / trl_seconds:.2f} of TRL's time")
            return
    print(f"\nours does not reach TRL's {last}-step held-out ({target:.1f}) at any scored step")


if __name__ == "__main__":
    main()
