"""The process group a training run belongs to (torch.distributed, started by `torchrun`).

`World.from_env()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and joins the default process group: NCCL when the run trains on CUDA, gloo on CPU; the same code
either way. Without torchrun (or with one process) it is the single-process world and every
collective below is a no-op, so single-process training runs exactly the operations it always did.

Collectives used by data-parallel training (`training.trainer`): gradient and statistics all-reduce,
broadcast of rank 0's initial weights, gathering every rank's stream and RNG state for a checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: `rank` of `size` processes (`local_rank` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: torch.device | str | None = None) -> World:
        """The world torchrun describes in the environment; joins its process group (NCCL when `device` is
        CUDA, else gloo). The single-process world when WORLD_SIZE is unset or 1."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            cuda = torch.device(device).type == "cuda" if device is not None else False
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(rank, size, local_rank)

    def device(self, requested: torch.device) -> torch.device:
        """This rank's device: CUDA device `local_rank` when the run trains on CUDA, else `requested`."""
        if requested.type == "cuda" and self.distributed:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return requested

    # ------------------------------------------------------------------ collectives (no-ops for one process)
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place; returns it."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` with rank `src`'s, in place; returns it."""
        if self.distributed:
            dist.broadcast(t, src)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (at the end of a run)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
