"""Where computation runs: the torch device and this process's place in a ``torchrun`` job."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from n2g_ct.errors import ConfigError


@dataclass(frozen=True)
class Processes:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0


def torchrun_processes() -> Processes:
    """This process's place as ``torchrun`` announces it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), without
    joining a process group: for work split up front that needs no communication."""
    return Processes(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                     int(os.environ.get("LOCAL_RANK", "0")))


def init_processes(requested_device: str = "auto") -> Processes:
    """This process's rank under ``torchrun`` (initialising the process group), else a single process.

    The backend is NCCL when the processes will use CUDA (``requested_device``), gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    if not dist.is_initialized():
        cuda = requested_device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def select_device(requested: str, processes: Processes) -> torch.device:
    """The torch device for ``requested`` (auto/cpu/cuda/cuda:N); under torchrun, GPU = local rank."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} was asked for, but no CUDA device is available (use --device cpu)")
    if requested in ("auto", "cuda"):
        return torch.device("cuda", processes.local_rank if processes.world_size > 1 else 0)
    return torch.device(requested)
