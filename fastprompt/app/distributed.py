"""Data-parallel training under ``torchrun``: which rank we are, and sums across ranks.

The prompt is a single small tensor, so rather than wrapping the model in
``DistributedDataParallel`` the training loop all-reduces its gradient itself,
once per optimizer step, in one buffer together with the step's loss, token
count and stop request. One collective per step, and every rank takes the same
decisions (stop, diverged) from the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_from_env(use_cuda: bool) -> Ranks:
    """Join the process group ``torchrun`` describes in the environment, or a
    single-process run when there is none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
