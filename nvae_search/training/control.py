"""How the processes of a run agree: the collectives the loop needs, and a signal flag that ends a run cleanly.

Every method that all-reduces, broadcasts or gathers must be called at the same point on every rank; with one
process each one is the identity and touches no ``torch.distributed`` state.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``world`` processes, this one ``rank``, its tensors on ``device``."""

    world: int
    rank: int
    device: torch.device

    @classmethod
    def current(cls, device: torch.device) -> Ranks:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return cls(world, dist.get_rank() if world > 1 else 0, device)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls: ``model`` itself, or its DistributedDataParallel wrapper."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DistributedDataParallel(model, device_ids=[self.device.index])
        return DistributedDataParallel(model)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one: ranks must leave the loop, and save, at the same step."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def rank0_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a per-rank batch mean (equal slices, so the mean over the global batch)."""
        if self.world == 1:
            return value
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value / self.world

    def gather_rng_states(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every rank's (CPU, CUDA) generator state, in rank order; empty for one process."""
        if self.world == 1:
            return []
        mine = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, mine)
        return states


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can checkpoint and end as 'stopped' instead of dying mid-write."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def install(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, _frame: Any) -> None:
            self.reason = f"interrupted by {signal.Signals(signum).name}"

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore
