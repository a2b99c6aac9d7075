"""Parallelism applied to a built run from outside the models (STYLE.md 2).

``parallelize`` is what a Ray Train worker does to the run ``loop.build_run`` made (and what the
benchmarks do in a plain process group): the head pool sharded over ranks (``ShardedPool``) when
there is more than one, and G under DeepSpeed ZeRO (``DeepSpeedUpdate``). The process group must
exist (Ray Train's TorchConfig makes it; ``perf.init_process_group`` outside Ray).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nitro_dist.loop import Run


def parallelize(run: Run, rank: int, world_size: int) -> None:
    from nitro_dist.distributed.engine import DeepSpeedUpdate
    from nitro_dist.distributed.pool_sync import ShardedPool

    cfg = run.cfg
    if world_size > 1:  # one rank keeps the plain pool: the same maths, no packing
        run.pool = ShardedPool(run.layout, cfg.pool, cfg.seed, rank, world_size, run.device)
    run.g = DeepSpeedUpdate(run.models.student, cfg, world_size)
