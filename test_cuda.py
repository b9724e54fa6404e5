"""Tests of lsp.py that need a CUDA GPU: what test_lsp.py cannot check on a CPU. Without CUDA they are skipped.

    a. a run on CUDA resumes from its checkpoint (bf16 weights, 8-bit AdamW states) and goes on (`python lsp.py`)
    b. load_model on CUDA: bf16, and with load_in_4bit bitsandbytes NF4 layers, both giving finite logits; an NF4
       reward model scores
    c. the 8-bit AdamW with stochastic rounding: it learns, keeps bf16 weights and CUDA states, and its state saved
       and loaded on the CPU (as a resumed run loads it) continues exactly as if never saved
    d. the first step's KL to the reference: 0 for an exact copy, > 0 for an NF4 reference (both printed)
    e. the fast sampler (torch.compile with CUDA graphs) gives the eager sampler's and generate's greedy tokens
       and keeps its CUDA graphs from call to call
    f. --offload-frozen: the frozen reference visits the GPU for its phase only, in a new run and a resumed one
    g. QLoRA (--lora --load-in-4bit, needs peft): an NF4 base, float32 adapters that alone train, a first-step KL
       of 0, and a run that resumes from its adapter checkpoint

Tiny random Llamas with the offline Llama-3-style tokenizer of conftest.py: no network, no weights, no gguf.
Run on a GPU machine (needs torch with CUDA, transformers, accelerate and bitsandbytes):

    python -m pytest -q -s test_cuda.py
"""

import copy
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import lsp
from machinery import devices, forward, inputs, runs
from test_lsp import OFFLINE, PROMPTS, TINY_RUN, read_jsonl, stop_mid_row, tiny_config, tiny_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = torch.device("cuda")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama3_tokenizer):
    """A tiny random Llama and the stand-in Llama 3 tokenizer, saved as a checkpoint directory. Its sizes are multiples
    of 64, bitsandbytes' NF4 block; one token in eight ends a turn, so random text stops within a few tokens;
    num_labels=1 lets it load as a reward model too (this body and a new 1-output head), as bench.py's do."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(llama3_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, num_labels=1, pad_token_id=0,  # tied and 1 label: as Llama-3.2-3B
                         bos_token_id=llama3_tokenizer.bos_token_id, eos_token_id=llama3_tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = list(range(0, len(llama3_tokenizer), 8))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    llama3_tokenizer.save_pretrained(path)
    return path


def chat_prompts(tokenizer):
    return [inputs.chat_prompt(tokenizer, text, date="01 Jan 2025")
            for text in ("What is 2 + 3?", "Name a colour.", "Write a short poem about the sea.")]


# --- a. resume -------------------------------------------------------------------------------


def test_a_run_on_cuda_resumes_from_its_checkpoint_and_goes_on(tmp_path, model_dir):
    out = tmp_path / "run"
    first = subprocess.run(tiny_run(model_dir, out, "--steps", "2", "--save-every", "1"),
                           env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    print("\n" + "".join(line for line in first.stdout.splitlines() if line.startswith("step 1: KL")))
    checkpoint = runs.checkpoints(out)[-1]
    assert checkpoint.name == "checkpoint-000002"
    # what makes it a CUDA run: bf16 weights, 8-bit AdamW states, CUDA's RNG state
    assert {t.dtype for t in load_file(checkpoint / "model.safetensors").values()} == {torch.bfloat16}
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    leaves = torch.utils._pytree.tree_leaves(state["optimizer"]["state"])
    assert any(isinstance(leaf, torch.Tensor) and leaf.dtype == torch.uint8 for leaf in leaves)
    assert len(state["cuda_rng"]) >= 1
    resumed = subprocess.run(tiny_run(model_dir, out, "--steps", "3", "--save-every", "1"),
                             env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out} from checkpoint-000002" in resumed.stdout
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert runs.checkpoints(out)[-1].name == "checkpoint-000003"
    assert json.loads((out / "config.json").read_text())["steps"] == 3


# --- b. loading ------------------------------------------------------------------------------


def finite_logits(model, tokenizer):
    ids, mask = lsp.pad(chat_prompts(tokenizer), "left", DEVICE)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits.shape == (*ids.shape, len(tokenizer)) and bool(logits.float().isfinite().all())


def test_load_model_on_cuda_gives_bf16_weights(model_dir):
    tokenizer, model = lsp.load_model(str(model_dir), AutoModelForCausalLM, DEVICE)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}
    assert finite_logits(model, tokenizer)


def test_load_model_in_4bit_gives_nf4_layers_on_cuda(model_dir):
    import bitsandbytes as bnb
    tokenizer, model = lsp.load_model(str(model_dir), AutoModelForCausalLM, DEVICE, load_in_4bit=True)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up and down of each layer; not the (tied) lm_head
    for layer in quantized:
        assert layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8  # packed 4-bit pairs
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state is not None
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert {p.dtype for p in model.parameters() if p.dtype != torch.uint8} == {torch.bfloat16}  # norms, embeddings
    assert finite_logits(model, tokenizer)


def test_an_nf4_reward_model_scores_each_pair_on_cuda(model_dir):
    tokenizer, reward_model = lsp.load_model(str(model_dir), AutoModelForSequenceClassification, DEVICE, load_in_4bit=True)
    scores = lsp.reward_model_scores(reward_model, tokenizer, ["What is 2 + 3?", "Name a colour."], ["5", "Blue."],
                                     date="01 Jan 2025")
    assert scores.shape == (2,) and scores.isfinite().all()


# --- c. the 8-bit optimizer ------------------------------------------------------------------


def test_8bit_adamw_learns_keeps_bf16_and_resumes_from_a_state_loaded_on_the_cpu(tmp_path, model_dir):
    tokenizer, model = lsp.load_model(str(model_dir), AutoModelForCausalLM, DEVICE)
    prompts = chat_prompts(tokenizer)
    completions = [tokenizer("The answer is five.", add_special_tokens=False).input_ids] * len(prompts)

    def loss():
        logprobs, mask = lsp.token_logprobs(model, prompts, completions, 1.0)
        return -logprobs.sum() / mask.sum()  # mean negative log-likelihood of the fixed completions
    model.train()
    optimizer = devices.adamw_8bit_stochastic_rounding(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    print(f"\n8-bit AdamW on a fixed batch, loss per step: {[round(x, 3) for x in losses]}")
    assert losses[-1] < losses[0] - 0.1
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    assert states and {v.device.type for v in states} == {"cuda"}
    assert any(v.dtype == torch.uint8 for v in states)  # 8-bit moments for the large matrices

    # the resume path: the state saved, loaded on the CPU into a new optimizer, must step as the one that never stopped
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    optimizer.zero_grad()
    loss().backward()
    gradients = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)  # the stochastic rounding draws from CUDA's generator
    optimizer.step()
    continued = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for parameter, weight, gradient in zip(model.parameters(), weights, gradients):
            parameter.copy_(weight)
            parameter.grad = gradient.clone()
    resumed = devices.adamw_8bit_stochastic_rounding(model.parameters(), lr=3e-3)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", map_location="cpu", weights_only=True))
    torch.manual_seed(1)
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(continued, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # the step did move the weights
    assert {v.device.type for state in resumed.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)} == {"cuda"}


# --- d. first-step KL ------------------------------------------------------------------------


def test_first_step_kl_is_zero_for_an_exact_reference_and_positive_for_an_nf4_one(model_dir):
    tokenizer, policy = lsp.load_model(str(model_dir), AutoModelForCausalLM, DEVICE)
    exact = lsp.freeze(copy.deepcopy(policy))
    nf4 = lsp.freeze(lsp.load_model(str(model_dir), AutoModelForCausalLM, DEVICE, load_in_4bit=True)[1])
    prompts = chat_prompts(tokenizer) * 2
    completions = lsp.unpad(*lsp.sample(policy, prompts, 16, [], generator=torch.Generator(DEVICE).manual_seed(0)))
    with torch.no_grad():
        logprobs, mask = lsp.token_logprobs(policy, prompts, completions, 1.0)

        def kl(reference):  # as the metric "kl": per-token k3 KL, averaged in each sequence, then over sequences
            ref_logprobs, _ = lsp.token_logprobs(reference, prompts, completions, 1.0)
            return (lsp.k3_kl(logprobs, ref_logprobs, mask).sum(-1) / mask.sum(-1)).mean().item()
        exact_kl, nf4_kl = kl(exact), kl(nf4)
    print(f"\nfirst-step KL to the reference, nats per token: exact bf16 copy {exact_kl:.3g}, NF4 {nf4_kl:.3g}")
    assert exact_kl < 1e-6
    assert nf4_kl > 0


# --- e. the fast sampler ---------------------------------------------------------------------


def test_fast_sampler_with_cuda_graphs_gives_the_eager_samplers_and_generates_tokens(monkeypatch):
    # float32, so that the compiled kernels, the eager ones and generate's agree on every greedy choice
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval().to(DEVICE)  # test_lsp's tiny model, on the GPU
    prompts = PROMPTS + PROMPTS[:1]  # a prompt twice: its prefill is copied into the static cache's rows
    stop = stop_mid_row(model, PROMPTS, row=2, step=3)
    ids, mask = lsp.pad(prompts, "left", DEVICE)
    generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                               pad_token_id=0, eos_token_id=[stop])[:, ids.shape[1]:].tolist()
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in generated]  # up to the stop token
    from torch._dynamo.utils import counters
    forward.decoder("cuda")  # compiles with errors suppressed (lsp then decodes eagerly); here an error must show
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)
    torch._dynamo.reset()  # compiles afresh, whatever ran before in this process
    counters.clear()
    eager = lsp.sample(model, prompts, 12, [stop], temperature=0)
    fast = forward.sample_fast(model, prompts, 12, [stop], temperature=0)
    fast_again = forward.sample_fast(model, prompts, 12, [stop], temperature=0)  # replays the recorded graphs
    print(f"\ncompiled graphs {counters['stats']['unique_graphs']}, CUDA graph skips "
          f"{dict(counters['inductor']).get('cudagraph_skips', 0)}, row lengths {[len(row) for row in expected]}")
    assert lsp.unpad(*eager) == expected
    assert lsp.unpad(*fast) == expected and lsp.unpad(*fast_again) == expected
    assert len({len(row) for row in expected}) > 1  # the rows stop at different steps
    for completion_ids, completion_mask in (eager, fast):
        for row, tokens in zip(completion_mask.tolist(), expected):  # the mask: up to the stop token, nothing after
            assert row == [1] * len(tokens) + [0] * (len(row) - len(tokens))
    assert counters["stats"]["unique_graphs"] >= 1, "the fast sampler's decoder was not compiled"
    assert not counters["inductor"]["cudagraph_skips"], "compiled, but without CUDA graphs"


def test_the_fast_sampler_keeps_its_cuda_graphs_from_call_to_call(monkeypatch):
    """A run samples thousands of times, each time into a new static KV cache: new addresses, so torch records the graphs
    again. Where it counts those recordings against cudagraph_unexpected_rerecord_limit (128), it drops the graphs for
    good past it (~40 steps of 3 calls); the limit set to 2 here, 6 calls would show it."""
    import torch._inductor.config
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval().to(DEVICE)
    forward.decoder("cuda")
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)
    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_unexpected_rerecord_limit", 2)
    torch._dynamo.reset()
    counters.clear()
    first = forward.sample_fast(model, PROMPTS, 12, [], temperature=0)[0]
    for _ in range(5):
        assert torch.equal(forward.sample_fast(model, PROMPTS, 12, [], temperature=0)[0], first)
    print(f"\n6 fast sampler calls: CUDA graph skips {dict(counters['inductor']).get('cudagraph_skips', 0)}")
    assert not counters["inductor"]["cudagraph_skips"], "CUDA graphs dropped after repeated recordings"


# --- f. --offload-frozen ---------------------------------------------------------------------


def devices_of(model):
    return {p.device.type for p in model.parameters()}


def test_offloaded_reference_visits_the_gpu_for_its_phase_alone_in_a_new_and_a_resumed_run(
        tmp_path, model_dir, monkeypatch):
    argv = ["--model", str(model_dir), *TINY_RUN, "--offload-frozen", "--out", str(tmp_path / "run")]
    uses = []
    for function in ("sample", "token_logprobs", "logits_after"):
        def spy(model, *args, real=getattr(lsp, function), **kwargs):
            uses.append((model is selfplay.reference, devices_of(model), devices_of(selfplay.reference)))
            return real(model, *args, **kwargs)
        monkeypatch.setattr(lsp, function, spy)
    for start_step in (0, 1):  # a new run; then, from its checkpoint, a resumed one, whose reference load_model loads
        selfplay, first = lsp.start(lsp.parse_args(argv))
        assert first == start_step and devices_of(selfplay.reference) == {"cpu"} and devices_of(selfplay.policy) == {"cuda"}
        uses.clear()
        metrics, _ = selfplay.step()
        assert {is_reference for is_reference, _, _ in uses} == {True, False}  # the judge, the reference log-probs
        for is_reference, model_devices, reference_devices in uses:  # used on the GPU; away while the policy works
            assert model_devices == {"cuda"} and reference_devices == ({"cuda"} if is_reference else {"cpu"})
        assert devices_of(selfplay.reference) == {"cpu"} and devices_of(selfplay.policy) == {"cuda"}
        assert metrics["time/offload"] > 0 and metrics["update_skipped"] == 0
        if not start_step:
            runs.save_checkpoint(selfplay, tmp_path / "run", 1, keep=1)


# --- g. QLoRA --------------------------------------------------------------------------------


def test_qlora_trains_float32_adapters_on_an_nf4_base_and_resumes(tmp_path, model_dir):
    pytest.importorskip("peft")
    import bitsandbytes as bnb
    out = tmp_path / "run"
    qlora = ["--lora", "8", "--load-in-4bit", "--save-every", "1"]
    first = subprocess.run(tiny_run(model_dir, out, *qlora, "--steps", "2"), env=OFFLINE, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_jsonl(out / "metrics.jsonl")[0]["kl"] == 0.0  # pi_Ref is the NF4 base: the policy at step 0
    adapters = load_file(runs.checkpoints(out)[-1] / "adapter_model.safetensors")
    assert adapters and {t.dtype for t in adapters.values()} == {torch.float32}
    resumed = subprocess.run(tiny_run(model_dir, out, *qlora, "--steps", "3"), env=OFFLINE, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    args = lsp.parse_args(["--model", str(model_dir), *TINY_RUN, "--out", str(tmp_path / "live"), *qlora])
    selfplay, _ = lsp.start(args)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in selfplay.policy.modules())
    before = {name: p.detach().clone() for name, p in selfplay.policy.named_parameters()}
    selfplay.step()
    changed = {name for name, p in selfplay.policy.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all("lora_" in name for name in changed)
