"""torchrun support: the process group from torchrun's environment, and row shards.

``torchrun --nproc_per_node=N -m xfeat extract ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; xfeat then joins PyTorch's process group (NCCL on
CUDA, gloo on CPU), one device per local rank. Without those variables everything here is a
no-op and xfeat runs as one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """This process's place in the job, from torchrun's environment variables."""
    return World(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def is_distributed() -> bool:
    return current_world().size > 1


def init_process_group(device: torch.device) -> torch.device:
    """Join the job's process group (once); return this rank's device.

    NCCL when the device is CUDA (one GPU per local rank), gloo on CPU.
    """
    world = current_world()
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
        logger.info(
            "rank %d of %d joined the %s process group on %s", world.rank, world.size, backend, device
        )
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard_bounds(n: int, rank: int, size: int) -> tuple:
    """Contiguous rows ``[start, stop)`` of ``n`` for ``rank``: sizes differ by at most one."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
