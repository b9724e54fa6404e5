"""A step's metrics and episodes, one JSON line each, written at once and repaired on resume;
the example printed every --log-every steps; the curriculum's metrics."""

import contextlib
import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from machinery.distributed import gather, mean_over_processes, rank


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
