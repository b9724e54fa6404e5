"""Where and in what precision a run computes: the device, bf16 on a CPU, 8-bit AdamW with
stochastically rounded bf16 updates on CUDA, the check at start that a run fits its GPU, and the
phases of an iteration, timed, with frozen models offloaded between the phases that use them."""

import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist

from machinery.inputs import REWARD_FUNCTION


def default_device():
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if dist.is_initialized():  # under torchrun: this process's own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda")


def use_cpu_bf16(setting, device):
    """Whether --cpu-bf16 (auto, on, off) runs matrix products in bf16 on this device."""
    if device.type != "cpu":
        return False
    return setting == "on" or (setting == "auto" and cpu_has_bf16())


def use_fast_sampler(setting, device):
    """Whether --fast-sampler (auto, on, off) samples with `forward.sample_fast`: auto on CUDA."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); if not, bf16 is slow."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def make_optimizer(parameters, learning_rate, device):
    """AdamW without weight decay: float32 on a CPU; on CUDA 8-bit states for bf16 weights."""
    if device.type == "cuda":  # 2 bytes of state per weight instead of 8
        return adamw_8bit_stochastic_rounding(parameters, learning_rate)
    return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)


def round_to_bf16_stochastically_(values):
    """Round float32 values in place to bf16 ones: up with probability the fraction cut off.

    Random low bits added before the lower 16 bits are dropped make the rounding unbiased.
    In place, 16M values at a time: no memory beyond `values`.
    """
    for bits in values.view(torch.int32).view(-1).split(1 << 24):
        bits.add_(torch.randint_like(bits, 0, 1 << 16))
        bits.bitwise_and_(-65536)
    return values


def adamw_8bit_stochastic_rounding(parameters, learning_rate):
    """bitsandbytes' 8-bit AdamW for bf16 weights, with updates applied by stochastic rounding.

    At lr 3e-6 a step is far below half the bf16 spacing of a typical weight (6e-5 at 0.02):
    rounding to nearest would drop it. Each tensor is updated in float32, then rounded.
    """
    import bitsandbytes as bnb  # needed on CUDA only, and slow to import

    class AdamW8bitStochasticRounding(bnb.optim.AdamW8bit):
        def update_step(self, group, param, gindex, pindex):
            if param.dtype != torch.bfloat16:
                return super().update_step(group, param, gindex, pindex)
            weight, grad = param.data, param.grad
            param.data, param.grad = weight.float(), grad.float()
            super().update_step(group, param, gindex, pindex)
            # exact: the values are bf16 ones now
            weight.copy_(round_to_bf16_stochastically_(param.data))
            param.data, param.grad = weight, grad

    return AdamW8bitStochasticRounding(parameters, lr=learning_rate, weight_decay=0.0)


# what the update keeps for backward per token, layer and hidden unit in bf16 (docs/memory.md)
ACTIVATION_BYTES = 48


LEVERS = ("--offload-frozen", "--gradient-checkpointing", "--load-in-4bit")


def memory_problem(args, policy, gpu_bytes, logit_chunk_tokens):
    """Why the run cannot fit this GPU and the flags that make it fit, or None.

    Bytes: 6 per policy parameter (bf16 weights and gradients, 8-bit AdamW states), 2 per
    frozen one (NF4: 0.7; offloaded: 0), and the larger of the update's backward and the
    optimizer step's float32 copies of the largest weight and its gradient. With --lora the
    policy is a frozen base, which is also pi_Ref and the judge, and 10 bytes per adapter
    parameter (float32 weights and gradients, 8-bit AdamW states).
    """
    own_judge = args.reward_model == "self" or REWARD_FUNCTION.fullmatch(args.reward_model)
    reward_models = 0 if own_judge else 1
    trained = [p.numel() for p in policy.parameters() if p.requires_grad]
    adapter_parameters = sum(trained) if args.lora else 0
    base_parameters = policy.num_parameters() - adapter_parameters
    tokens = args.micro_batch_size * (args.max_query_tokens + args.max_completion_length)
    config = policy.config
    optimizer_step = 8 * max(trained)
    logit_chunks = 3 * 4 * logit_chunk_tokens * config.vocab_size  # about 3 float32 copies

    def need(flags):
        frozen_bytes = 2
        if "--offload-frozen" in flags:
            frozen_bytes = 0
        elif "--load-in-4bit" in flags:
            frozen_bytes = 0.7
        kept_layers = config.num_hidden_layers
        if "--gradient-checkpointing" in flags:
            # a layer keeps its bf16 input (2 of the 48 bytes); one is recomputed at a time
            kept_layers = kept_layers * 2 / ACTIVATION_BYTES + 1
        activations = tokens * kept_layers * ACTIVATION_BYTES * config.hidden_size
        if args.lora:  # one frozen base (with --load-in-4bit in NF4) and the reward model
            weights = adapter_parameters * 10 + base_parameters * frozen_bytes * (1 + reward_models)
        else:
            weights = base_parameters * (6 + frozen_bytes * (1 + reward_models))
        return weights + max(activations + logit_chunks, optimizer_step)

    chosen = {flag for flag in LEVERS if getattr(args, flag[2:].replace("-", "_"))}
    usable = 0.9 * gpu_bytes  # 10%: CUDA's own memory and fragmentation
    if need(chosen) <= usable:
        return None
    candidates = ("--offload-frozen", "--gradient-checkpointing",
                  "--offload-frozen --gradient-checkpointing")
    if args.lora:  # nothing to offload: pi_Ref is the base
        candidates = ("--gradient-checkpointing", "--load-in-4bit",
                      "--load-in-4bit --gradient-checkpointing")
    kept = chosen if args.lora else chosen - {"--load-in-4bit"}  # the flags a fix keeps
    fixes = [flags for flags in candidates if set(flags.split()) >= kept and need(flags) <= usable]
    if not fixes:
        fix = "a smaller --micro-batch-size or --model, or a GPU with more memory"
    elif "--load-in-4bit" in chosen and not args.lora:  # NF4 and offloading cannot be combined
        fix = fixes[0] + " instead of --load-in-4bit"
    else:
        fix = fixes[0]
    return (f"weights, gradients, optimizer states and activations need about "
            f"{need(chosen) / 2**30:.1f} GiB; this GPU has {gpu_bytes / 2**30:.1f} GiB. Use {fix}.")


def exit_if_too_big(args, policy, device, logit_chunk_tokens):
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    problem = memory_problem(args, policy, gpu_bytes, logit_chunk_tokens)
    if problem:
        sys.exit(f"error: this run does not fit: {problem}")


class Phases:
    """Times the phases of an iteration. With --offload-frozen the frozen models (pi_Ref, the
    reward model) wait on the CPU, and each visits the GPU alone for the phases that use it.

        with phases("judge", uses=reference):
            ...
    A visiting model stays until a phase uses another model or none (the update). With --lora
    (`adapters`, the peft model) pi_Ref is the policy itself: its phases turn the adapters off.
    """

    def __init__(self, device, offload, frozen_models, adapters=None):
        self.device, self.offload, self.visitor, self.times = device, offload, None, {}
        self.adapters = adapters
        for model in frozen_models:
            self.move(model, "cpu")
        self.times = {}  # the first move is the run's, not step 1's

    @contextlib.contextmanager
    def __call__(self, name, uses=None):
        started = time.perf_counter()
        if uses is not self.visitor:
            self.move(self.visitor, "cpu")
            self.move(uses, self.device)
            self.visitor = uses
        adapters_off = self.adapters is not None and uses is self.adapters.get_base_model()
        with self.adapters.disable_adapter() if adapters_off else contextlib.nullcontext():
            yield
        self.add(name, time.perf_counter() - started)

    def move(self, model, device):
        if self.offload and model is not None:
            started = time.perf_counter()
            model.to(device)
            self.add("offload", time.perf_counter() - started)

    def add(self, name, seconds):
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + seconds

    def take_times(self):
        """The seconds of each phase since the last call, as metrics."""
        times, self.times = self.times, {}
        return times
