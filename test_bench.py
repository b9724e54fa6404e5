"""Tests for bench.py: the tiny preset end to end in a subprocess, checking the table's rows and that
every number is finite and positive (timings and their ratios are never asserted); and the CUDA
peak-memory poller, on a CPU with a stand-in for torch.cuda.mem_get_info."""

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).parent
NUMBER = re.compile(r"-?[\d,]*\.?\d+|nan|inf", re.IGNORECASE)


def test_tiny_preset_prints_a_table_of_finite_positive_numbers():
    result = subprocess.run([sys.executable, str(HERE / "bench.py"), "--preset", "tiny", "--repeats", "1", "--against", "HEAD"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == ["| measurement | value |", "|---|---|"]
    rows = dict(line.strip("| ").split(" | ", 1) for line in lines[2:])
    assert rows["device"] and re.fullmatch(r"\S+ / \S+", rows["torch / transformers"])
    sampler = "sampler, batch 4, prompts "
    timed = [name for name in rows if name.startswith(sampler)]
    assert [name.rsplit(": ", 1)[1] for name in timed] == [
        "lsp.sample", "lsp.sample fast", "model.generate", "ours / generate", "fast / eager", "fast / generate",
        "fast, first call (compiles on CUDA)"]
    phases = ["challenger", "solver", "reward", "judge", "reference", "update", "total"]
    timed += [f"LSP iteration, {version}: {phase}" for version in ("now", "before (HEAD)") for phase in phases]
    timed += ["LSP iteration: before / now", "peak memory, samplers", "peak memory, LSP iteration"]
    for name in timed:
        value = float(NUMBER.search(rows[name]).group().replace(",", ""))
        assert math.isfinite(value) and value > 0, (name, rows[name])
    assert "2 queries x 2 answers" in rows["LSP iteration settings"]
    assert re.fullmatch(r"\d+\.\d GiB", rows["memory check's estimate on a GPU (devices.memory_problem)"])


def test_worst_case_makes_every_query_valid_while_it_lasts_and_then_leaves_the_lsp_module_alone():
    import bench
    import lsp
    original = lsp.read_query
    scorers = SimpleNamespace(stop_ids=[1], reward_function=lambda queries, answers: [None] * len(answers))
    selfplay = SimpleNamespace(stop_ids=[1], scorers=scorers)
    tokenizer = SimpleNamespace(decode=lambda tokens, skip_special_tokens: "cut off here")
    with bench.worst_case(selfplay, lsp):
        assert lsp.read_query(tokenizer, [5, 6], []) == ("cut off here", "ok")  # cut, yet valid
        assert selfplay.stop_ids == selfplay.query_stop_ids == scorers.stop_ids == []
        assert scorers.reward_function(["text that runs on"] * 2, ["a", "ab"]) == [1.0, 0.0]  # every pair scored
    assert lsp.read_query is original  # no process-wide patch left behind
    assert lsp.read_query(tokenizer, [5, 6], [7])[1] == "truncated"


def test_peak_in_use_keeps_the_highest_reading_of_a_block_not_its_last(monkeypatch):
    import bench
    import torch
    gib, total = 2 ** 30, 80 * 2 ** 30
    used = [1 * gib, 3 * gib, 7 * gib, 4 * gib, 2 * gib]  # in use rises, peaks and falls back within the block
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return total - used[min(len(calls), len(used)) - 1], total  # (free, total), the last value from then on
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with bench.PeakInUse(torch.device("cuda")) as in_use:
        for _ in range(10_000):  # the block lasts until the poller has read every value (a minute at most)
            if len(calls) > len(used):
                break
            time.sleep(0.005)
    assert len(calls) > len(used), "PeakInUse did not poll while the block ran"
    assert in_use.peak == 7 * gib and not in_use.thread.is_alive()
    read = len(calls)
    time.sleep(0.05)
    assert len(calls) == read  # no reading once the block has ended


def test_the_trl_comparison_gives_trl_the_same_work(tmp_path):
    pytest.importorskip("trl")
    import bench_trl
    import lsp
    from machinery import inputs
    queries = tmp_path / "q.txt"
    queries.write_text("".join(f"What is {i} + 1?\n" for i in range(7)))
    work = bench_trl.settings(SimpleNamespace(model="m", queries=str(queries), steps=[5, 2]), seed=3)
    assert (work["steps"], work["save_at"], work["seed"]) == (5, [2, 5], 3)
    assert work["max_grad_norm"] == lsp.parse_args(["--model", "smollm2", "--reward-model", "self", "--out", str(tmp_path / "run")]).max_grad_norm  # lsp.py's default
    config = bench_trl.trl_config(work, str(tmp_path))
    answers = work["num_queries"] * work["num_generations"]
    # one generation of N x G answers per optimizer step, trained in micro-batches
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == answers
    assert config.generation_batch_size == answers and config.num_generations == 8
    assert (config.max_steps, config.num_iterations, config.beta) == (5, 1, work["beta"])
    assert (config.temperature, config.learning_rate) == (work["temperature"], work["learning_rate"])
    assert config.max_completion_length == work["max_completion_length"]
    assert config.scale_rewards == "none" and config.lr_scheduler_type == "constant"
    assert not config.gradient_checkpointing and not config.bf16
    # dr_grpo's gradient is ours / max_completion_length: the same clipping and Adam eps need the same
    # factor, and its KL term is k3 only without the bias correction
    assert config.max_grad_norm * config.max_completion_length == work["max_grad_norm"]
    assert config.adam_epsilon * config.max_completion_length == pytest.approx(1e-8)
    assert config.use_bias_correction_kl is False and config.loss_type == "dr_grpo"
    # TRL reads, unshuffled, the queries lsp.py reads step by step with this seed
    assert config.shuffle_dataset is False
    rows = queries.read_text().splitlines()
    lsp_reads = [rows[i] for i in inputs.data_order(7, 3, 5 * 4).tolist()]
    assert bench_trl.ordered_queries(work) == lsp_reads


def test_the_trl_comparison_without_trl_says_how_to_install_it(monkeypatch):
    import bench
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    with pytest.raises(SystemExit, match="pip install trl"):
        bench.main(["--against", "trl"])


def test_the_trl_comparison_runs_paired_seeds_end_to_end_on_a_tiny_model(tiny_model_dir, capsys):
    pytest.importorskip("trl")
    import bench_trl
    results = bench_trl.main(["--model", str(tiny_model_dir), "--steps", "1", "2", "--seeds", "0", "1"])
    for seed in (0, 1):
        ours, theirs = results["ours", seed], results["trl", seed]
        # both read the seed's queries, 4 a step, in the same order
        assert ours["queries"] == theirs["queries"] and [len(q) for q in ours["queries"]] == [4, 4]
        for result in (ours, theirs):
            assert len(result["steps"]) == len(result["clipped"]) == len(result["no_signal"]) == 2
            assert sorted(result["heldout"]) == [1, 2] and result["heldout"][2]["all"] <= 320
    assert results["ours", 0]["queries"] != results["ours", 1]["queries"]
    printed = capsys.readouterr().out
    assert "the same queries step by step in both trainers, every seed: True" in printed
    assert re.search(r"^\| held-out, all \| ours \| \d+ \| \d+ \| \d+", printed, re.MULTILINE)
    assert re.search(r"^\| held-out, all, step 1 \| TRL [\d.]+ \| \d+ \| \d+ \|", printed, re.MULTILINE)
    assert "steps whose gradient was clipped" in printed and "UNMATCHED" not in printed
