"""
This trainer against TRL's GRPOTrainer, side by side on the same work: the arithmetic game's data
baseline (`lsp.py --queries`), which is what most people would run with TRL.

    python bench.py --against trl              # the same as: python bench_trl.py
    python bench_trl.py --steps 25             # the documented comparison (docs/performance.md)

It needs `pip install trl`; the trainer does not. Both trainers get:
    the same model        SmolLM2-135M-Instruct (a GPU: --model with the 3B shape's directory),
                          saved once as a plain checkpoint that both load
    the same queries      the game's training set (arith_game.training_set, 512 problems)
    the same reward       arith_game.reward
    the same work         N = 4 queries x G = 8 answers a step, in micro-batches of 8, 32 answer
                          tokens, temperature 0.7, learning rate 1e-5 (constant), beta 0.05 (the
                          k3 KL to a frozen reference), AdamW without weight decay, clipping at
                          1, float32, and the same number of steps
They run one after the other, each in its own process, so that each peak memory is its own. Then
`eval.py score` scores both final models on the held-out set. The table gives seconds per step
(the mean over the steps after the first), split into generation and the rest, the peak
resident memory of each process, and the held-out accuracy per level. What cannot match exactly
is listed under the table (UNMATCHED).
"""

import argparse
import json
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

HERE = Path(__file__).parent
UNMATCHED = [
    "Loss normalization: ours sums log-probs over an answer's tokens and weighs each answer "
    "1 / (N G); TRL's loss_type='dr_grpo', the closest, divides the same sum by N G times "
    "max_completion_length (L = 32). Adam does not see a constant factor, but clipping does: "
    "TRL clips at max_grad_norm / L, so that both clip the same gradient.",
    "Ratio: TRL multiplies the advantage by pi / pi_old, clipped at 1 +- 0.2; with one update "
    "per generation (num_iterations=1) the ratio is 1 and the gradient is ours.",
    "Queries: both draw 4 of the 512 training problems a step with their own samplers, so the "
    "problems differ from step to step, not in distribution.",
    "Sampling: TRL generates with model.generate, we with our own sampler; both sample at "
    "temperature 0.7 with no top-p or top-k truncation and stop at the EOS.",
    "Precision: float32 in both (our --cpu-bf16 off); on a CPU with bf16 units ours runs faster "
    "with its default bf16 autocast.",
]


def settings(options):
    """The work both trainers do, in the names of lsp.py's options."""
    return {"model": options.model, "queries": options.queries, "steps": options.steps,
            "num_queries": 4, "num_generations": 8, "micro_batch_size": 8,
            "max_completion_length": 32, "temperature": 0.7, "learning_rate": 1e-5,
            "beta": 0.05, "max_grad_norm": 1.0, "seed": 0}


def trl_config(work, out):
    """TRL's GRPOConfig for the same work: one optimizer step per N x G answers, generated at
    once and trained on in micro-batches (gradient accumulation)."""
    from trl import GRPOConfig  # optional: pip install trl
    micro_batches = work["num_queries"] * work["num_generations"] // work["micro_batch_size"]
    return GRPOConfig(
        output_dir=out, max_steps=work["steps"], seed=work["seed"],
        per_device_train_batch_size=work["micro_batch_size"],
        gradient_accumulation_steps=micro_batches, steps_per_generation=micro_batches,
        num_generations=work["num_generations"], num_iterations=1,
        max_completion_length=work["max_completion_length"], temperature=work["temperature"],
        top_p=1.0, top_k=0, learning_rate=work["learning_rate"], lr_scheduler_type="constant",
        beta=work["beta"], loss_type="dr_grpo", scale_rewards="none",
        mask_truncated_completions=False,
        max_grad_norm=work["max_grad_norm"] / work["max_completion_length"],  # UNMATCHED[0]
        weight_decay=0.0, optim="adamw_torch", gradient_checkpointing=False, bf16=False,
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True)


def train_ours(work, out):
    """Our trainer, as `python lsp.py --game arith_game.py --queries ...` runs it: the seconds
    of each step and of its generation, and each step's mean reward."""
    import lsp
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
              "--save-every", str(work["steps"]), "--keep", "1", "--out", out])
    steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"model": str(sorted(Path(out).glob("checkpoint-*"))[-1]),
            "steps": [step["time/step"] for step in steps],
            "generation": [step["time/solver"] for step in steps],
            "rewards": [step["reward"] for step in steps]}


def train_trl(work, out):
    """TRL's GRPOTrainer on the same work: the seconds of each step and of its generation, and
    each step's mean reward."""
    from datasets import Dataset
    from trl import GRPOTrainer
    import arith_game
    queries = Path(work["queries"]).read_text().split("\n")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": query}]}
                                 for query in queries if query])

    def arithmetic(prompts, completions, **kwargs):  # TRL's reward signature
        questions = [prompt[-1]["content"] for prompt in prompts]
        answers = [completion[-1]["content"] for completion in completions]
        return arith_game.reward(questions, answers)

    trainer = GRPOTrainer(model=work["model"], reward_funcs=[arithmetic],
                          args=trl_config(work, out), train_dataset=dataset)
    step_times, generation_times = [], []
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

        def on_step_end(self, *args, **kwargs):
            step_times.append(time.perf_counter() - self.started)
    trainer.add_callback(StepTimer())
    trainer.train()
    trainer.save_model(out)
    rewards = [logged["reward"] for logged in trainer.state.log_history if "reward" in logged]
    return {"model": out, "steps": step_times, "generation": generation_times,
            "rewards": rewards}


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
    return json.loads(lines[-1].removeprefix("BENCH "))


def heldout(model, out):
    """Right answers per level of `eval.py score` on the held-out set (it prints its table)."""
    scores = evaluation.main(["score", "--model", model, "--out", out])
    return {level: f"{right}/{n}" for level, (right, n, *_) in scores.items()}


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
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of each trainer")
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
    if options.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as workdir:  # 3 GB of checkpoints
        prepare(options, workdir)
        work = settings(options)
        for name in ("ours", "trl"):
            results[name] = measure(name, work, os.path.join(workdir, name))
            results[name]["heldout"] = heldout(results[name]["model"],
                                               os.path.join(workdir, f"{name}-heldout.jsonl"))
    print_table(results, work, trl.__version__)


def print_table(results, work, trl_version):
    print(f"| {work['steps']} steps, {work['num_queries']} x {work['num_generations']} answers "
          f"| ours | TRL {trl_version} GRPOTrainer | TRL / ours |")
    print("|---|---|---|---|")
    rows = {}
    for result in results.values():
        steps = result["steps"][1:]  # the first step warms up
        generation = sum(result["generation"][1:]) / len(steps)  # one generation a step
        rows.setdefault("seconds per step (mean after the first)", []).append(
            statistics.fmean(steps))
        rows.setdefault("  of which generation", []).append(generation)
        rows.setdefault("  the rest: rewards, log-probs, backward, step", []).append(
            statistics.fmean(steps) - generation)
        rows.setdefault("peak memory of the process, GiB", []).append(result["peak_rss"] / 2**30)
        rows.setdefault("mean reward of the answers, over the steps", []).append(
            statistics.fmean(result["rewards"]))
    for name, (ours, theirs) in rows.items():
        print(f"| {name} | {ours:.3g} | {theirs:.3g} | {theirs / ours:.2f} |")
    for level in results["ours"]["heldout"]:
        print(f"| held-out, {level} | {results['ours']['heldout'][level]} | "
              f"{results['trl']['heldout'][level]} | |")
    print(f"\nboth on {torch.__version__} / transformers {transformers.__version__}; "
          "settings that cannot match exactly:")
    for note in UNMATCHED:
        print(f"- {note}")


if __name__ == "__main__":
    main()
