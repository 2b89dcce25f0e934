"""test.py over several processes: `torchrun --nproc_per_node K test.py ...` (one or many nodes).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; each process takes every K-th image of the
list (its shard) on its own device (cuda:LOCAL_RANK, or the CPU). The processes exchange
only small Python objects (the plan of the run, a barrier at the end), so the gloo backend
serves on CPU and GPU machines alike. Without torchrun there is one rank and nothing here
talks to torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ofer.device import resolve_device

T = TypeVar("T")


@dataclass
class Ranks:
    """Where this process stands in the run: rank r of `world`, the `local_rank`-th on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's variables and join the process group when there is more than one rank."""
        ranks = cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))
        if ranks.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        return ranks

    def device(self, requested: str) -> torch.device:
        """`auto`: this rank's GPU when CUDA is there, else the CPU; `cuda` picks this rank's GPU.

        With more ranks on a node than GPUs, ranks share them (local rank modulo the GPU count).
        A GPU with an index becomes this process's current CUDA device (`torch.cuda.set_device`),
        so that what runs on the current device (streams, CUDA-graph capture, NCCL) uses it too.
        A value that is no device here is a ConfigError (`resolve_device`).
        """
        device = resolve_device(requested, "--device")
        if device.type == "cuda" and device.index is None and self.world > 1:
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return device

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's part of the list: every world-th item from position rank (balanced, order kept)."""
        return list(items[self.rank :: self.world])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        boxes: list[Any] = [None] * self.world
        dist.all_gather_object(boxes, obj)
        return boxes

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
