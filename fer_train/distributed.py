"""Processes and devices: torchrun's environment turned into a process group (NCCL on GPUs, gloo on CPUs)
or a single process, and the device each process trains on."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fer_train.errors import ConfigError

__all__ = ["Distributed", "end_distributed", "init_distributed", "select_device"]


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_rank0(self, value):
        """Rank 0's value on every rank (the value itself in a single process)."""
        if self.world == 1:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]


def init_distributed(device_kind: str) -> Distributed:
    """torchrun's environment -> the process group (NCCL on GPUs, gloo on CPUs); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def end_distributed(barrier: bool = False) -> None:
    """Destroys the process group, if one was made, before the interpreter ends: left to its teardown, the
    group's background threads (gloo's) can be destroyed while they run, and a run that succeeded aborts
    ("terminate called without an active exception"). barrier (for ranks that all ended normally): wait for
    every rank first. A gloo worker thread drops its last collective's work after the rank has moved on, and
    one that does so while the interpreter ends aborts the process in the same way (pytorch/pytorch#190489);
    the barrier returns only when every rank is there, long after.
    A DistributedDataParallel model that is no longer used but still held by a reference cycle (the Trainer is
    in one; under torch 2.11 so is DDP itself once it has run backward) is collected first, while the group is
    alive: left to a later collection, its reducer holds the group's last reference, and the reducer's
    destructor then destroys the group with the GIL held, joining gloo's worker thread while that thread waits
    for the GIL to free its last work's tensors: the process hangs (seen under torch 2.11; the group's own
    Python object releases the GIL before destroying it)."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def select_device(spec: str, distributed: Distributed = Distributed()) -> torch.device:
    """"auto" (a GPU if there is one, else the CPU), "cpu", "cuda" (this process's local GPU) or "cuda:N"."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {spec!r}: the engine runs on the CPU or CUDA GPUs (auto, cpu, cuda, cuda:N)")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"device {spec!r}: there is one CPU device, cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec} but this machine has no CUDA GPU")
        device = torch.device("cuda", device.index if device.index is not None else distributed.local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
    return device
