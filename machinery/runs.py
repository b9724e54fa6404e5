"""Checkpoints written atomically, resume as if never stopped, the run directory, updates
skipped for a non-finite loss, and signals: the first Ctrl-C or SIGTERM saves after the step."""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from machinery.distributed import barrier, collective_device, gather, rank, world_size
from machinery.logs import restore_log, write_atomically


def checkpoints(out):
    """The run's complete checkpoint directories, oldest first (one being written ends in .tmp)."""
    return sorted(Path(out).glob("checkpoint-*[0-9]"))  # 6 zero-padded digits: they sort by step


def random_states(generator):
    return {
        "sampler_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all(),  # [] on a CPU
    }


def training_state(optimizer, generator):
    """What a resumed run needs besides the weights to continue exactly as if never stopped:
    the optimizer and the random states; under torchrun every process's, in rank order."""
    state = {"optimizer": optimizer.state_dict(), **random_states(generator)}
    if dist.is_initialized():
        state["rank_random_states"] = gather([random_states(generator)])
    return state


def load_training_state(state, optimizer, generator):
    optimizer.load_state_dict(state["optimizer"])
    mine = state["rank_random_states"][rank()] if "rank_random_states" in state else state
    generator.set_state(mine["sampler_rng"])
    torch.set_rng_state(mine["torch_rng"])
    torch.cuda.set_rng_state_all(mine["cuda_rng"])  # CUDA's drives the stochastic rounding


def save_checkpoint(trainer, out, step, keep):
    """Write RUN_DIR/checkpoint-STEP: what from_pretrained (or `lsp.load_model`) loads, and
    trainer_state.pt.

    It is written as .tmp and renamed when complete: a kill while saving leaves the previous
    one intact. Only the newest `keep` checkpoints stay. Under torchrun every process calls it
    (it gathers their random states) and rank 0 writes.
    """
    state = {"step": step, **trainer.state_dict()}
    if rank() != 0:
        return barrier()
    final = out / f"checkpoint-{step:06d}"
    partial = final.with_name(final.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)  # left over by a save that was killed
    if trainer.adapters:  # --lora: the adapters only (20 MB for SmolLM2 at rank 16)
        trainer.adapters.save_pretrained(partial, save_embedding_layers=False)
    else:
        trainer.policy.save_pretrained(partial)
    trainer.tokenizer.save_pretrained(partial)
    torch.save(state, partial / "trainer_state.pt")
    if hasattr(os, "sync"):
        os.sync()  # on disk before the rename makes it visible: survives a power cut too
    os.replace(partial, final)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    barrier()


def read_trainer_state(checkpoint, device):
    """trainer_state.pt of a checkpoint, read onto the CPU (RNG states must stay CPU tensors;
    the optimizer moves its own states to the GPU). A run resumes on the kind of device it was
    trained on: AdamW's states and 8-bit AdamW's do not convert."""
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    if bool(state["cuda_rng"]) != (device.type == "cuda"):
        trained_on = "GPU" if state["cuda_rng"] else "CPU"
        sys.exit(f"error: {checkpoint.parent} was trained on a {trained_on}: resume it on one")
    processes = len(state.get("rank_random_states", [state]))
    if processes != world_size():
        sys.exit(f"error: {checkpoint.parent} was trained by {processes} processes: resume it "
                 f"with as many (torchrun --nproc_per_node {processes}), not {world_size()}")
    return state


def resume(trainer, args, device):
    """Continue from the newest checkpoint in --out, if any, and prepare the run directory.
    Returns the last step done: 0 for a new run."""
    saved = checkpoints(args.out)
    if not saved:
        prepare_run_dir(args, -1)  # no checkpoint: no line of the logs counts
        return 0
    state = read_trainer_state(saved[-1], device)
    trainer.load_state_dict(state)
    tqdm.write(f"resuming {args.out} from {saved[-1].name}")
    prepare_run_dir(args, state["step"])
    return state["step"]


def prepare_run_dir(args, last_step):
    """Create --out, save the options, and drop log lines after last_step (-1: no checkpoint)."""
    out = Path(args.out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        options = {key: value for key, value in vars(args).items() if key != "resume"}
        write_atomically(out / "config.json", json.dumps(options, indent=1))
        for log in ("metrics.jsonl", "episodes.jsonl"):
            restore_log(out / log, last_step)
    barrier()


class SkippedUpdates:
    """Counts updates skipped in a row for a non-finite loss or gradient; too many: diverged."""

    def __init__(self, out, limit=10):
        self.out, self.limit, self.in_a_row = out, limit, 0

    def count(self, step, skipped):
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped:
            tqdm.write(f"step {step}: non-finite loss or gradient, update skipped "
                       f"({self.in_a_row} in a row)")
        if self.in_a_row == self.limit:
            sys.exit(f"error: {self.limit} updates in a row had a non-finite loss or gradient: "
                     "the run has diverged. Skipped updates left the policy unchanged. Look at "
                     f"{self.out / 'metrics.jsonl'} (loss, grad_norm, kl), then start a new run "
                     "with a lower --learning-rate or --max-grad-norm.")


class StopRequest:
    """The first Ctrl-C or SIGTERM saves and stops after the current step; a second stops now.

    Under torchrun, torchrun passes a signal on to every process, which would count as a
    second: there every signal only asks to stop, and `agreed` makes the processes stop at the
    same step (torchrun kills them if they take longer than 30 s to finish it).
    """

    def __enter__(self):
        self.signal = None
        self.previous = {
            signum: signal.signal(signum, self.handle)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signal is not None and not dist.is_initialized():
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving after this step "
                   "(Ctrl-C again stops now, without saving)")

    def agreed(self):
        """The signal some process got, or None: the same answer on every process."""
        if dist.is_initialized():
            asked = torch.tensor([self.signal or 0], device=collective_device())
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
            self.signal = asked.item() or None
        return self.signal

    def exit_if_asked(self, step, script, out):
        """After the checkpoint of `step`: exit with 128 + the signal's number (130, 143)."""
        if self.signal:
            tqdm.write(f"stopped after step {step}, checkpoint saved. "
                       f"Resume with: python {script} --resume {out}")
            sys.exit(128 + self.signal)
