"""Data parallel under torchrun: joining the processes, gathering an iteration's queries,
summing gradients and numbers; rank 0 prints, logs and writes. Alone, every call is a no-op."""

import os
import sys

import torch
import torch.distributed as dist

from machinery.devices import default_device


def init_processes():
    """Join the process group under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on a CPU.

    Every process then holds the whole model and its own share of the iteration; only rank 0
    prints, logs and writes checkpoints. A plain run (no torchrun) joins nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")  # one process speaks; errors still show


def finish_processes():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(values):
    """Every process's list of values, joined in rank order (any picklable values)."""
    if not dist.is_initialized():
        return list(values)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(values))
    return [value for part in parts for value in part]


def collective_device():
    """Where the tensors of a collective live: NCCL moves GPU tensors only."""
    return default_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_processes(value):
    """A number summed over the processes."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    return total.item()


def mean_over_processes(metrics):
    """Each metric averaged over the processes that logged it."""
    if not dist.is_initialized():
        return metrics
    logged = gather([metrics])
    names = dict.fromkeys(name for part in logged for name in part)
    means = {}
    for name in names:
        values = [part[name] for part in logged if part.get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
    return means


def sum_gradients(parameters):
    """Add up the processes' gradients, so that every process holds the whole iteration's and
    takes the same optimizer step. Each process weighs its sequences by the iteration's global
    counts (1 / N of all queries, 1 / all answers), so the sum is one process's gradient on
    every sequence."""
    if not dist.is_initialized():
        return
    for parameter in parameters:
        if parameter.grad is None:  # a parameter this process's sequences did not reach
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)


def gather_iteration(queries, valid, rewards, quality):
    """All processes' queries of an iteration, in rank order, and the slice that is this
    process's own: (queries, valid [N], rewards [N, G], quality [N, G] or None, own)."""
    own = slice(rank() * len(queries), (rank() + 1) * len(queries))
    if not dist.is_initialized():
        return list(queries), valid, rewards, quality, own
    parts = gather([(list(queries), valid, rewards, quality)])  # one exchange, rank order
    queries = [query for part in parts for query in part[0]]
    valid = torch.cat([part[1] for part in parts])  # [N]
    rewards = torch.cat([part[2] for part in parts])  # [N, G]
    quality = None if quality is None else torch.cat([part[3] for part in parts])  # [N, G]
    return queries, valid, rewards, quality, own
