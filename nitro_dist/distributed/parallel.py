"""Parallelism applied to a built run from outside the models (STYLE.md 2).

``parallelize`` is what a Ray Train worker does to the run ``build.build_run`` made (and what the
benchmarks do in a plain process group): the head pool sharded over ranks (``ShardedPool``) when
there is more than one, and G under DeepSpeed ZeRO (``DeepSpeedUpdate``). The process group must
exist (Ray Train's TorchConfig makes it; ``init_process_group`` outside Ray).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nitro_dist.build import Run


def parallelize(run: Run, rank: int, world_size: int) -> None:
    from nitro_dist.distributed.g_update import DeepSpeedUpdate
    from nitro_dist.distributed.pool_sync import ShardedPool

    cfg = run.cfg
    if world_size > 1:  # one rank keeps the plain pool: the same maths, no packing
        run.pool = ShardedPool(run.layout, cfg.pool, cfg.seed, rank, world_size, run.device)
    run.g = DeepSpeedUpdate(run.models.student, cfg, world_size)


def all_ranks_agree(ok: bool, world_size: int, device: torch.device | str = "cpu") -> bool:
    """``ok`` on every rank (one all-reduce of a flag, MIN); on one rank the local flag. Every
    rank calls it at the same point of the iteration."""
    if world_size == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device) -> None:
    """A one-rank process group (NCCL on GPU, gloo on CPU) for DeepSpeed outside any launcher."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    env = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
