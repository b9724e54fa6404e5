"""Tests of data-parallel training under torchrun, all on a CPU with gloo and 2 processes: the
2-process update equals the 1-process update on the same sequences, both processes hold the same
parameters after a self-play step, and `torchrun ... lsp.py` plays the game, writes one log and a
loadable checkpoint, stops together on Ctrl-C, and resumes."""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import lsp
from machinery import runs
from conftest import tiny_config

HERE = Path(__file__).parent
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [5, 6, 7, 8, 9, 10]]
COMPLETIONS = [[20, 21, 1], [22], [23, 24, 25, 26], [27, 1]]
ADVANTAGES = torch.tensor([1.0, -0.5, 0.25, -1.0])
WEIGHTS = torch.tensor([0.25, 0.25, 0.125, 0.5])  # the iteration's global weights


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def update(rows):
    """One policy_update of a fresh tiny model on the sequences `rows`: its parameters after."""
    policy = tiny_model()
    reference = lsp.freeze(copy.deepcopy(policy))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    args = SimpleNamespace(micro_batch_size=2, temperature=0.7, beta=0.05, max_grad_norm=1.0)
    prompts, completions = [PROMPTS[i] for i in rows], [COMPLETIONS[i] for i in rows]
    ref_logprobs = lsp.reference_logprobs(reference, prompts, completions, args)
    lsp.policy_update(policy, optimizer, prompts, completions, ref_logprobs, ADVANTAGES[rows], WEIGHTS[rows], args)
    return [parameter.detach().clone() for parameter in policy.parameters()]


def join(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def half_update(rank, store, results):
    join(rank, store)
    results[rank] = update([0, 1] if rank == 0 else [2, 3])  # each process its own sequences
    dist.destroy_process_group()


def test_two_processes_take_one_processs_update_on_all_the_sequences(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(half_update, args=(str(tmp_path / "store"), results), nprocs=2)
    alone = update([0, 1, 2, 3])
    for first, second, single in zip(results[0], results[1], alone):
        assert torch.equal(first, second)  # the same gradient sum and the same optimizer step
        assert torch.allclose(first, single, atol=1e-6)  # float sums in another order
    assert any(not torch.equal(a, b) for a, b in zip(alone, tiny_model().parameters()))


def selfplay_step(rank, store, results, model_dir, out):
    join(rank, store)
    args = lsp.parse_args(["--game", str(HERE / "arith_game.py"), "--model", model_dir,
                           "--num-queries", "4", "--num-generations", "2",
                           "--max-query-tokens", "12", "--max-completion-length", "8",
                           "--learning-rate", "1e-3", "--out", out])
    selfplay, _ = lsp.start(args)
    metrics, episodes = selfplay.step()
    checksum = torch.tensor([float(p.detach().double().sum()) for p in selfplay.policy.parameters()])
    results[rank] = (checksum, [e["query"] for e in episodes], metrics["grad_norm"])
    dist.destroy_process_group()


def test_after_a_step_both_processes_hold_the_same_parameters(tmp_path, tiny_model_dir):
    results = mp.Manager().dict()
    mp.spawn(selfplay_step, nprocs=2, args=(str(tmp_path / "store"), results,
                                            str(tiny_model_dir), str(tmp_path / "run")))
    (first, first_queries, first_norm), (second, second_queries, second_norm) = results[0], results[1]
    assert torch.equal(first, second) and first_norm == second_norm > 0
    assert len(first_queries) == len(second_queries) == 2  # N / K queries each
    before = torch.tensor([float(p.detach().double().sum()) for p in
                           AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()])
    assert not torch.equal(first, before)


def torchrun(*options):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(HERE / "lsp.py"), *options]


def game_run(model_dir, out, *extra):
    return torchrun("--game", str(HERE / "arith_game.py"), "--model", str(model_dir),
                    "--num-queries", "4", "--num-generations", "2", "--max-query-tokens", "12",
                    "--max-completion-length", "8", "--save-every", "1", "--out", str(out), *extra)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_plays_the_game_with_one_log_and_checkpoint_and_resumes(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = subprocess.run(game_run(tiny_model_dir, out, "--steps", "2", "--eval-every", "2"),
                            env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]  # one process writes, each step once
    assert all(0 <= m["dev_accuracy"] <= 1 for m in metrics)
    assert [e["step"] for e in read_jsonl(out / "episodes.jsonl")] == [1] * 4 + [2] * 4
    assert len(re.findall(r"--- step 1\b", result.stdout)) == 1  # one process prints
    state = torch.load(out / "checkpoint-000002" / "trainer_state.pt", weights_only=True)
    assert len(state["rank_random_states"]) == 2
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-000002")
    resumed = subprocess.run(torchrun("--resume", str(out), "--steps", "3"), env=OFFLINE,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    alone = subprocess.run([sys.executable, str(HERE / "lsp.py"), "--resume", str(out),
                            "--steps", "4"], env=OFFLINE, capture_output=True, text=True,
                           timeout=600)
    assert alone.returncode != 0 and "was trained by 2 processes" in alone.stderr


def test_under_torchrun_ctrl_c_stops_every_process_at_one_step_and_saves_it(tmp_path,
                                                                            tiny_model_dir):
    out = tmp_path / "run"
    process = subprocess.Popen(game_run(tiny_model_dir, out, "--steps", "200"), env=OFFLINE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    while not (out / "checkpoint-000002").exists() and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    stdout, stderr = process.communicate(timeout=120)
    assert "checkpoint saved" in stdout, stderr[-3000:]
    last = runs.checkpoints(out)[-1]
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, int(last.name.split("-")[1]) + 1))  # nothing half-written
    assert not list(out.glob("*.tmp"))
