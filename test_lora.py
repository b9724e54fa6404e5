"""LoRA (--lora): adapters on a frozen base, pi_Ref as the base with the adapters off, adapter-only
checkpoints that resume exactly, merge, and the options refused. Tiny random models on a CPU."""

import argparse
import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import lsp
from conftest import tiny_chat_model
from machinery import devices, lora
from machinery.forward import sample_fast
from test_lsp import HERE, OFFLINE, TINY_RUN, options, read_jsonl, tiny_run, without_timings

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


def lora_selfplay(tmp_path, tokenizer, *extra):
    """A tiny SelfPlay with rank-4 adapters, their B made non-zero so that they change the
    policy, and a copy of the base model taken before they were added."""
    policy = tiny_chat_model(tokenizer)
    base = lsp.freeze(copy.deepcopy(policy))
    args = options(tmp_path, *TINY_RUN, "--lora", "4", *extra)
    adapters = lora.add_adapters(policy, args)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    return lsp.SelfPlay(args, policy, tokenizer, policy, adapters=adapters), base


def some_sequences(tokenizer):
    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("Name a colour.")]
    completions = [tokenizer.encode("It is 5."), tokenizer.encode("Blue")]
    return prompts, completions


@needs_peft
def test_the_reference_is_the_base_model_with_the_adapters_off(tmp_path, smol_tokenizer):
    selfplay, base = lora_selfplay(tmp_path, smol_tokenizer)
    prompts, completions = some_sequences(smol_tokenizer)
    base_logprobs, _ = lsp.token_logprobs(base, prompts, completions, 1.0)
    with selfplay.phases("reference", uses=selfplay.reference):
        ref_logprobs, _ = lsp.token_logprobs(selfplay.reference, prompts, completions, 1.0)
    policy_logprobs, _ = lsp.token_logprobs(selfplay.policy, prompts, completions, 1.0)
    torch.testing.assert_close(ref_logprobs, base_logprobs)
    assert (policy_logprobs - base_logprobs).abs().max() > 1e-3  # the adapters are back on after
    assert selfplay.reference is selfplay.policy  # no second copy of the model


@needs_peft
def test_a_step_trains_only_the_adapters(tmp_path, smol_tokenizer):
    selfplay, _ = lora_selfplay(tmp_path, smol_tokenizer)
    before = {name: p.detach().clone() for name, p in selfplay.policy.named_parameters()}
    metrics, _ = selfplay.step()
    assert metrics["update_skipped"] == 0.0
    changed = {name for name, p in selfplay.policy.named_parameters()
               if not torch.equal(before[name], p)}
    adapters = {name for name in before if "lora_" in name}
    assert changed and changed <= adapters
    in_optimizer = sum(len(group["params"]) for group in selfplay.optimizer.param_groups)
    assert in_optimizer == len(adapters)


@needs_peft
def test_the_fast_sampler_gives_the_same_tokens_with_adapters(tmp_path, smol_tokenizer):
    selfplay, _ = lora_selfplay(tmp_path, smol_tokenizer)
    prompts, _ = some_sequences(smol_tokenizer)
    plain = lsp.sample(selfplay.policy, prompts, 6, selfplay.stop_ids, temperature=0)
    fast = sample_fast(selfplay.policy, prompts, 6, selfplay.stop_ids, temperature=0)
    assert [torch.equal(a, b) for a, b in zip(plain, fast)] == [True, True]


@needs_peft
def test_a_lora_run_resumes_to_the_same_adapters_and_its_checkpoints_hold_only_them(tmp_path, tiny_model_dir):
    steps = ["--lora", "4", "--save-every", "1", "--keep", "4"]
    subprocess.run(tiny_run(tiny_model_dir, tmp_path / "whole", *steps, "--steps", "4"), check=True,
                   env=OFFLINE, capture_output=True, timeout=300)
    subprocess.run(tiny_run(tiny_model_dir, tmp_path / "broken", *steps, "--steps", "2"), check=True,
                   env=OFFLINE, capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, str(HERE / "lsp.py"), "--resume", str(tmp_path / "broken"),
                             "--steps", "4"], env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    whole, resumed = (tmp_path / run / "checkpoint-000004" for run in ("whole", "broken"))
    whole_adapters, resumed_adapters = (load_file(path / "adapter_model.safetensors") for path in (whole, resumed))
    assert whole_adapters.keys() == resumed_adapters.keys() and all("lora_" in key for key in whole_adapters)
    assert all(torch.equal(whole_adapters[key], resumed_adapters[key]) for key in whole_adapters)
    assert without_timings(read_jsonl(tmp_path / "broken" / "metrics.jsonl")) == \
        without_timings(read_jsonl(tmp_path / "whole" / "metrics.jsonl"))
    # the adapters, not the model: no weights file of the base, and 4 bytes an adapter entry
    assert not list(whole.glob("model*.safetensors"))
    entries = sum(tensor.numel() for tensor in whole_adapters.values())
    assert (whole / "adapter_model.safetensors").stat().st_size < 4 * entries + 20_000
    checkpoint_2 = load_file(tmp_path / "whole" / "checkpoint-000002" / "adapter_model.safetensors")
    assert any(not torch.equal(checkpoint_2[key], whole_adapters[key]) for key in whole_adapters)  # it trained


@needs_peft
def test_a_merged_checkpoint_answers_as_base_plus_adapters(tmp_path, smol_tokenizer, tiny_model_dir):
    selfplay, _ = lora_selfplay(tmp_path, smol_tokenizer)
    selfplay.adapters.save_pretrained(tmp_path / "checkpoint", save_embedding_layers=False)
    (tmp_path / "checkpoint" / "adapter_config.json").write_text(
        (tmp_path / "checkpoint" / "adapter_config.json").read_text().replace("smollm2", str(tiny_model_dir)))
    prompts, _ = some_sequences(smol_tokenizer)
    expected = lsp.sample(selfplay.policy, prompts, 8, selfplay.stop_ids, temperature=0)
    _, loaded = lsp.load_model(str(tmp_path / "checkpoint"), lsp.AutoModelForCausalLM, torch.device("cpu"))
    evaluation.main(["merge", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "merged")])
    _, merged = lsp.load_model(str(tmp_path / "merged"), lsp.AutoModelForCausalLM, torch.device("cpu"))
    for model in (loaded, merged):
        assert not any("lora_" in name for name, _ in model.named_parameters())  # a plain model
        answers = lsp.sample(model, prompts, 8, selfplay.stop_ids, temperature=0)
        assert all(torch.equal(a, b) for a, b in zip(answers, expected))


@needs_peft
def test_the_memory_check_counts_one_base_and_small_adapters(tmp_path):
    from bench import LLAMA_3B
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device("meta"):
        llama_3b = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_3B))
        lora.add_adapters(llama_3b, options(tmp_path, "--lora", "16"))

    def need(gib, *flags):  # the README's iteration shape, with a 3B reward model
        args = argparse.Namespace(reward_model="some/reward-model", micro_batch_size=4, max_query_tokens=256,
                                  max_completion_length=512, lora=16, offload_frozen=False,
                                  load_in_4bit="--load-in-4bit" in flags,
                                  gradient_checkpointing="--gradient-checkpointing" in flags)
        return devices.memory_problem(args, llama_3b, gib * 2**30, lsp.LOGPROB_CHUNK_TOKENS)
    assert "Use --load-in-4bit --gradient-checkpointing." in need(12)
    assert need(12, "--load-in-4bit", "--gradient-checkpointing") is None
    assert need(24, "--gradient-checkpointing") is None
    assert "Use --gradient-checkpointing" in need(24)
    assert need(8, "--load-in-4bit", "--gradient-checkpointing") is None
    assert "a GPU with more memory" in need(6, "--load-in-4bit", "--gradient-checkpointing")


@pytest.mark.parametrize("argv, message", [
    (["--lora", "0"], "--lora is the adapters' rank: at least 1"),
    (["--lora", "8", "--offload-frozen"], "nothing to offload"),
    (["--lora", "8", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
])
def test_bad_lora_options_are_refused_before_loading(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        options(tmp_path, *argv)
    assert message in capsys.readouterr().err


def test_lora_trains_at_ten_times_the_default_learning_rate_unless_given_one(tmp_path):
    """The game's --lora 16 command trained at full fine-tuning's 1e-5 before LoRA had a default."""
    game = ["--game", str(HERE / "arith_game.py")]
    assert options(tmp_path / "full", *game).learning_rate == 1e-5
    assert options(tmp_path / "game", *game, "--lora", "16").learning_rate == 1e-4
    assert options(tmp_path / "plain", "--lora", "16").learning_rate == 3e-5
    given = options(tmp_path / "given", *game, "--lora", "16", "--learning-rate", "2e-5")
    assert given.learning_rate == 2e-5
    started = options(tmp_path / "saved", *game, "--lora", "16")
    saved = {name: value for name, value in vars(started).items() if name != "resume"}
    (tmp_path / "saved" / "run").mkdir(parents=True)
    (tmp_path / "saved" / "run" / "config.json").write_text(json.dumps(saved))
    resumed = lsp.parse_args(["--resume", str(tmp_path / "saved" / "run")])
    assert resumed.learning_rate == 1e-4  # the saved rate, not scaled again


def test_spin_has_no_lora(capsys):
    import spin
    with pytest.raises(SystemExit):
        spin.parse_args(["train", "--lora", "8"])
    assert "unrecognized arguments: --lora" in capsys.readouterr().err


def test_without_peft_lora_says_what_to_install(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(SystemExit, match="pip install peft"):
        lora.add_adapters(tiny_chat_model(smol_tokenizer), options(tmp_path, "--lora", "4"))


@needs_peft
def test_qlora_start_loads_one_nf4_base_as_policy_and_reference(tmp_path, smol_tokenizer, monkeypatch):
    """The CUDA-only path of `lsp.start` with --lora --load-in-4bit, with a stand-in loader: the policy's
    base is loaded once, in 4-bit, and is the reference too (test_cuda.py g runs it for real)."""
    calls = []

    def fake_load(name, model_class, device, load_in_4bit=False):
        calls.append(bool(load_in_4bit))
        return smol_tokenizer, tiny_chat_model(smol_tokenizer)
    monkeypatch.setattr(lsp, "load_model", fake_load)
    args = options(tmp_path, *TINY_RUN, "--lora", "4")
    args.load_in_4bit = True  # a CPU refuses it at parse time
    selfplay, _ = lsp.start(args)
    assert calls == [True] and selfplay.reference is selfplay.policy
    assert all(p.requires_grad == ("lora_" in name) for name, p in selfplay.policy.named_parameters())
