"""Paired seeds: run arms x seeds, score every run, and compare the arms with their spread.

    python seeds.py --seeds 0 1 2 --steps 25 50 --out runs/claim1 \\
        --arm edge "python lsp.py --game arith_game.py" \\
        --arm data "python lsp.py --game arith_game.py --queries runs/queries.txt"

An arm is a name and a command line of lsp.py. For each seed S the tool runs it with
`--seed S --out OUT/ARM/seed-S --steps MAX` (and saves at every step of --steps), one run at a
time: two torch runs on a 2-core CPU slow each other about 20x. A finished run is not run again,
an unfinished one resumes. Then `eval.py score` scores each run's checkpoint at each of --steps
on the game's held-out set (--split dev when choosing settings: never choose on held-out).

`--start ARM FROM STEP` starts an arm from another arm's checkpoint at STEP, the same seed's
(self-play after data, for one): it passes `--model` that checkpoint, which is then also the
reference, and counts the arm's steps on from STEP, so the arms compare at the same steps in all.

Pairing: a seed gives every arm the same draws where the arms allow it. Every data arm
(--queries) reads the same queries step by step (`data_order`), and every arm starts its
sampler from the same state, so the runs of a seed part only where the arms differ.

It prints Markdown tables: right answers per seed, the mean over seeds with its 95% interval
(Student's t over seeds), per level and in all; the paired difference of each arm from the
first, per seed, with its mean, interval and the number of seeds that difference would need;
the dev curve (--eval-every) averaged over seeds; and seconds per step.
"""

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

# two-sided 95% quantiles of Student's t by degrees of freedom; 1.96 beyond 30
T95 = [math.nan, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
       2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(degrees):
    return T95[degrees] if degrees < len(T95) else 1.96


def mean_interval(values):
    """(mean, half width of its 95% t-interval) over seeds; the half width is nan for one value.

    >>> [round(x, 2) for x in mean_interval([80, 153, 140])]
    [124.33, 96.74]
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def seeds_needed(differences):
    """How many paired seeds make a difference of this mean and spread exclude 0 at 95%:
    the least n with t(n - 1) sd / sqrt(n) < |mean|; None when the mean is 0 or needs > 1000.

    >>> seeds_needed([10, 12, 8]), seeds_needed([10, -12, 8])
    (3, 143)
    """
    mean, spread = statistics.fmean(differences), statistics.stdev(differences)
    for n in range(2, 1001):
        if t95(n - 1) * spread / math.sqrt(n) < abs(mean):
            return n
    return None


def show(mean, half_width, digits=1):
    if math.isnan(half_width):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half_width:.{digits}f}"


# --- Running and scoring ---------------------------------------------------------------------

def run_dir(out, arm, seed):
    return Path(out) / arm / f"seed-{seed}"


def train(command, seed, steps, directory, start=None):
    """Run one arm's command for one seed, saving at every step of `steps`. With `start`, a
    (checkpoint, step) pair, the run starts from that checkpoint (its --model, so also its
    reference, with a fresh optimizer) and its steps count on from that step."""
    checkpoint, first = start or (None, 0)
    own_steps = [step - first for step in steps if step > first]
    every = math.gcd(*own_steps)
    extra = ["--model", str(checkpoint)] if checkpoint else []
    extra += ["--seed", str(seed), "--out", str(directory), "--steps", str(max(own_steps)),
              "--save-every", str(every), "--keep", str(max(own_steps) // every)]
    if (directory / f"checkpoint-{max(own_steps):06d}").exists():
        return
    print(f"running: {command} {shlex.join(extra)}", flush=True)
    with open(directory.parent / f"seed-{seed}.log", "a") as log:
        finished = subprocess.run([*shlex.split(command), *extra], stdout=log,
                                  stderr=subprocess.STDOUT)
    if finished.returncode:
        sys.exit(f"error: {command} failed for seed {seed}; see {log.name}")


def model_after(out, starts, arm, seed, step):
    """(run directory, its own step) that holds an arm's model after `step` steps in all. An
    arm that starts from another's checkpoint is that arm's model up to its start."""
    if arm in starts and step <= starts[arm][1]:
        source, first = starts[arm]
        return model_after(out, starts, source, seed, step)
    return run_dir(out, arm, seed), step - starts.get(arm, (None, 0))[1]


def held_out(directory, step, split):
    """{level: [right, n]} of the run's checkpoint at `step`, scored once and kept beside it."""
    import eval as evaluation  # loads torch and transformers: not needed for --help
    kept = directory / f"{split}-{step:06d}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    checkpoint = directory / f"checkpoint-{step:06d}"
    if not checkpoint.exists():  # a run stopped and resumed saves where it stopped
        sys.exit(f"error: {checkpoint} is missing: score the steps the run kept")
    game = json.loads((directory / "config.json").read_text()).get("game") or "arith_game.py"
    scores = evaluation.main(["score", "--model", str(checkpoint),
                              "--game", game, "--split", split,
                              "--out", str(directory / f"{split}-{step:06d}.jsonl")])
    counts = {level: [right, n] for level, (right, n, *_) in scores.items()}
    kept.write_text(json.dumps(counts))
    return counts


def read_metrics(directory, first=0):
    """The run's metrics.jsonl, its steps counted on from `first`."""
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [{**line, "step": line["step"] + first} for line in lines]


# --- The comparison --------------------------------------------------------------------------

def print_scores(scores, seeds, split, base=None):
    """scores[arm][seed] = {level: [right, n]}: per seed, mean and interval, per level."""
    arms = list(scores)
    levels = list(scores[arms[0]][seeds[0]])
    total = scores[arms[0]][seeds[0]]["all"][1]
    print(f"\n{split}, right answers (of {total} in all), 95% t-interval over "
          f"{len(seeds)} paired seeds" + (f"; base model {base}" if base is not None else ""))
    print(f"| arm | level | {' | '.join(f'seed {s}' for s in seeds)} | mean |")
    print(f"|---|---|{'---|' * len(seeds)}---|")
    for arm in arms:
        for level in levels:
            rights = [scores[arm][seed][level][0] for seed in seeds]
            print(f"| {arm} | {level} | {' | '.join(map(str, rights))} | "
                  f"{show(*mean_interval(rights))} |")


def print_differences(scores, seeds, level="all"):
    """Each arm against the first, seed by seed: the paired difference and its spread."""
    arms = list(scores)
    first = arms[0]
    print(f"\npaired difference from {first}, {level}: per seed, mean ± 95% interval, and the "
          "paired seeds a difference of this size and spread needs to exclude 0")
    print(f"| arm - {first} | {' | '.join(f'seed {s}' for s in seeds)} | mean | seeds needed |")
    print(f"|---|{'---|' * len(seeds)}---|---|")
    for arm in arms[1:]:
        differences = [scores[arm][seed][level][0] - scores[first][seed][level][0]
                       for seed in seeds]
        needed = seeds_needed(differences) if len(seeds) > 1 else None
        print(f"| {arm} | {' | '.join(f'{d:+d}' for d in differences)} | "
              f"{show(*mean_interval(differences))} | {needed or 'over 1000'} |")


def print_dev_curve(metrics, seeds):
    """dev_accuracy (--eval-every) at each step it was measured, mean over seeds."""
    curves = {arm: {} for arm in metrics}
    for arm, by_seed in metrics.items():
        for seed in seeds:
            for line in by_seed[seed]:
                if "dev_accuracy" in line:
                    curves[arm].setdefault(line["step"], []).append(line["dev_accuracy"])
    steps = sorted(set().union(*curves.values()))
    if not steps:
        return
    print("\ndev curve: dev_accuracy, mean over seeds (--eval-every)")
    print(f"| step | {' | '.join(curves)} |")
    print(f"|---|{'---|' * len(curves)}")
    for step in steps:
        cells = [show(*mean_interval(curves[arm][step]), 3) if step in curves[arm] else ""
                 for arm in curves]
        print(f"| {step} | {' | '.join(cells)} |")


def print_speed(metrics, seeds):
    print("\nseconds per step, mean over steps and seeds; share of steps whose gradient was "
          "clipped; share of groups whose answers all got the same reward")
    print("| arm | s/step | clipped | groups without signal |")
    print("|---|---|---|---|")
    for arm, by_seed in metrics.items():
        lines = [line for seed in seeds for line in by_seed[seed]]
        seconds = mean_of(lines, "time/step")
        clipped = mean_of(lines, "grad_clipped")
        flat = mean_of(lines, "frac_reward_zero_std")
        print(f"| {arm} | {seconds:.1f} | {clipped:.2f} | {flat:.2f} |")


def mean_of(lines, name):
    """A metric's mean over the steps that logged it: a step whose queries were all invalid
    has no groups, so no share of groups without signal."""
    values = [line[name] for line in lines if name in line]
    return statistics.fmean(values) if values else math.nan


def check_starts(parser, options):
    """{arm: (arm it starts from, step)} of --start, checked before anything runs."""
    names = [name for name, _ in options.arm]
    starts = {}
    for arm, source, step in options.start:
        if arm not in names or source not in names or names.index(source) >= names.index(arm):
            parser.error(f"--start {arm} {source} {step}: both must be arms, {source} first")
        if not step.isdigit() or int(step) not in options.steps or int(step) >= max(options.steps):
            parser.error(f"--start {arm} {source} {step}: STEP must be one of --steps, "
                         "before the last")
        starts[arm] = source, int(step)
    return starts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--arm", nargs=2, action="append", required=True,
                        metavar=("NAME", "COMMAND"), help="an arm: its name and lsp.py command")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", required=True,
                        help="score the checkpoints at these steps; runs go to the largest")
    parser.add_argument("--split", choices=["heldout", "dev"], default="heldout",
                        help="heldout: for results; dev: for choosing settings")
    parser.add_argument("--base", type=int, help="the base model's score, printed beside")
    parser.add_argument("--out", required=True, help="runs go to OUT/ARM/seed-S")
    parser.add_argument("--start", nargs=3, action="append", default=[],
                        metavar=("ARM", "FROM", "STEP"),
                        help="ARM starts from arm FROM's checkpoint at STEP (one of --steps), "
                             "the same seed's; its steps count on from STEP")
    options = parser.parse_args(argv)
    names = [name for name, _ in options.arm]
    if len(set(names)) < len(names) or any(not name.isidentifier() for name in names):
        parser.error(f"--arm names must be distinct words, got {names}")
    if min(options.steps) < 1 or len(set(options.seeds)) < len(options.seeds):
        parser.error("--steps must be at least 1 and --seeds distinct")
    starts = check_starts(parser, options)
    scores, metrics = {}, {}
    for name, command in options.arm:
        for seed in options.seeds:
            directory = run_dir(options.out, name, seed)
            directory.parent.mkdir(parents=True, exist_ok=True)
            start = None
            if name in starts:
                source, first = starts[name]
                source_dir, own_step = model_after(options.out, starts, source, seed, first)
                start = source_dir / f"checkpoint-{own_step:06d}", first
            train(command, seed, options.steps, directory, start)
    for name, command in options.arm:
        first = starts.get(name, (None, 0))[1]
        metrics[name] = {seed: read_metrics(run_dir(options.out, name, seed), first)
                         for seed in options.seeds}
        for step in sorted(options.steps):
            scores.setdefault(step, {})[name] = {
                seed: held_out(*model_after(options.out, starts, name, seed, step), options.split)
                for seed in options.seeds}
    for step in sorted(options.steps):
        print(f"\n## after {step} steps")
        print_scores(scores[step], options.seeds, options.split, options.base)
        if len(names) > 1:
            print_differences(scores[step], options.seeds)
    print_dev_curve(metrics, options.seeds)
    print_speed(metrics, options.seeds)
    return scores


if __name__ == "__main__":
    main()
