"""The process group: one process, torchrun (RANK / WORLD_SIZE / LOCAL_RANK), or a group a caller made (Ray Train).

NCCL on GPU, gloo on CPU. `setup()` returns a `DistContext`; `teardown()` destroys the group only when this
module created it.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device | str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group: reuse an initialised one (Ray Train), start one from torchrun's env, or none."""
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    else:
        rank, world, local_rank = 0, 1, 0
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)
    log.debug("process %d of %d on %s", rank, world, device)
    return ctx


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's `value` on every rank (small picklable values made by our own code, e.g. a checkpoint path)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistContext, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (small picklable values made by our own code)."""
    if not ctx.distributed:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def all_ok(ctx: DistContext, ok: bool) -> bool:
    """True only when every rank passes ok=True (e.g. a checkpoint part was written everywhere)."""
    if not ctx.distributed:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_collective_device(ctx))
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _collective_device(ctx: DistContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
