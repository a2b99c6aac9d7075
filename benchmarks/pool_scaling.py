"""What the dynamic, sharded head pool costs, measured side by side in one run.

  python benchmarks/pool_scaling.py [--iters 30] [--repeats 3]

1. Iteration time, dynamic pool (digits preset: 2 candidates per slot, 1% refresh) vs a static
   one-head-per-slot pool (candidates 1, no refresh), same active count, single process, timed in
   interleaved blocks. Target <= 1.10x.
2. Pool memory per rank (parameters + AdamW state, counted from the tensors a rank holds after
   a few iterations) at W=1 vs W=2, two gloo ranks on this machine. Target <= 0.55x. The SDXL
   layout of the paper (480 heads) is counted from the layout arithmetic (no tensors: it would
   not fit here), per rank at W=1/2/8.
3. Bytes moved per iteration by the pool's two packed collectives at two pool sizes (candidates
   2 and 8) with the same active count, on the same 2 ranks. Target: equal.

Prints a table and writes benchmarks/results/pool_scaling.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nitro_dist.build import build_run
from nitro_dist.config import load_config
from nitro_dist.discriminator.backbone import backbone_features
from nitro_dist.discriminator.pool import make_layout, sample_active
from nitro_dist.distributed.owners import owned_by, owner_map
from nitro_dist.distributed.pool_sync import ShardedPool
from nitro_dist.step import train_step

RESULTS = Path(__file__).resolve().parent / "results"
STATIC = ["pool.candidates=1", "pool.refresh_rate=0.0"]


def time_pools(iters: int, repeats: int) -> dict:
    """Seconds per iteration, dynamic vs static, interleaved blocks after one warm-up block."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    runs = {
        "dynamic": build_run(load_config("digits"), progress=False),
        "static": build_run(load_config("digits", STATIC), progress=False),
    }
    per_it: dict[str, list[float]] = {k: [] for k in runs}
    it = {k: 0 for k in runs}
    for block in range(repeats + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                train_step(run, it[name])
                it[name] += 1
            if block > 0:  # the first block warms up allocator and caches
                per_it[name].append((time.perf_counter() - t0) / iters)
    out = {k: statistics.median(v) for k, v in per_it.items()}
    out["num_heads"] = {k: r.layout.num_heads for k, r in runs.items()}
    out["active_heads"] = {
        k: len(sample_active(r.layout, 0, 0, 1).head_ids) for k, r in runs.items()
    }
    return out


# -- two gloo ranks ----------------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, out: str, candidates: int, iters: int) -> None:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    cfg = load_config("digits", [f"pool.candidates={candidates}", "train.batch_size=16"])
    run = build_run(cfg, rank=rank, owned_heads=[], progress=False)
    run.rank, run.world_size = rank, world
    run.pool = ShardedPool(run.layout, cfg.pool, cfg.seed, rank, world)
    moved = []
    for i in range(iters):
        train_step(run, i)
        moved.append(run.pool.bytes_moved)
    info = {
        "numel": run.pool.numel(),
        "params": sum(p.numel() for p in run.pool.local.heads.parameters()),
        "owned": len(run.pool.local.owned),
        "bytes_moved": moved,
        "active": len(sample_active(run.layout, cfg.seed, 0, 1).head_ids),
        "num_heads": run.layout.num_heads,
    }
    Path(out, f"w{world}_c{candidates}_r{rank}.json").write_text(json.dumps(info))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded(iters: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        _rank(0, 1, 0, out, 2, iters)
        for cand in (2, 8):
            mp.spawn(_rank, args=(2, free_port(), out, cand, iters), nprocs=2, join=True)
        read = {p.stem: json.loads(p.read_text()) for p in Path(out).glob("*.json")}
    w1 = read["w1_c2_r0"]
    w2 = [read[f"w2_c2_r{r}"] for r in range(2)]
    return {
        "w1_numel": w1["numel"],
        "w2_numel": [r["numel"] for r in w2],
        "w1_params": w1["params"],
        "w2_params": [r["params"] for r in w2],
        "bytes_per_iteration": {c: sorted(set(read[f"w2_c{c}_r0"]["bytes_moved"])) for c in (2, 8)},
        "num_heads": {c: read[f"w2_c{c}_r0"]["num_heads"] for c in (2, 8)},
        "active": read["w2_c2_r0"]["active"],
    }


def sdxl_counts() -> dict:
    """Per-rank pool parameters + AdamW state of the paper's SDXL pool, from the layout."""
    from diffusers import UNet2DConditionModel

    from nitro_dist.models.text import Cond
    from nitro_dist.models.tiny import SDXL_UNET

    cfg = load_config("sdxl_realism")
    with torch.device("meta"):  # shapes only: no weights are allocated
        unet = UNet2DConditionModel(**SDXL_UNET)
        side = SDXL_UNET["sample_size"]  # 128: 1024² images
        cond = Cond(torch.zeros(1, 77, 2048), torch.zeros(1, 1280), torch.zeros(1, 6))
        feats = backbone_features(
            unet, torch.zeros(1, 4, side, side), torch.zeros(1, dtype=torch.long), cond
        )
    layout = make_layout(cfg.pool, [tuple(f.shape[1:]) for f in feats])
    sizes = [layout.head_numel(h) for h in range(layout.num_heads)]
    active = sample_active(layout, cfg.seed, 0, 1).head_ids
    out = {"num_heads": layout.num_heads, "active": len(active)}
    for world in (1, 2, 8):
        owner = owner_map(layout, world)
        per_rank = [3 * sum(sizes[h] for h in owned_by(owner, r)) for r in range(world)]
        out[f"w{world}_max_rank_numel"] = max(per_rank)
    out["active_numel"] = sum(sizes[h] for h in active)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30, help="iterations per timed block")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks per pool")
    ap.add_argument("--sync-iters", type=int, default=4, help="iterations of the 2-rank runs")
    args = ap.parse_args()

    t = time_pools(args.iters, args.repeats)
    s = sharded(args.sync_iters)
    x = sdxl_counts()
    time_ratio = t["dynamic"] / t["static"]
    mem_ratio = max(s["w2_numel"]) / s["w1_numel"]
    param_ratio = max(s["w2_params"]) / s["w1_params"]
    b2, b8 = s["bytes_per_iteration"][2], s["bytes_per_iteration"][8]
    rows = [
        ("iteration time, dynamic pool (s)", f"{t['dynamic']:.4f}", ""),
        ("iteration time, static pool (s)", f"{t['static']:.4f}", ""),
        ("dynamic / static", f"{time_ratio:.3f}", "<= 1.10"),
        ("pool numel per rank W=1", f"{s['w1_numel']:,}", ""),
        ("pool numel per rank W=2 (max)", f"{max(s['w2_numel']):,}", ""),
        ("W=2 / W=1 (params + AdamW state)", f"{mem_ratio:.3f}", "<= 0.55"),
        ("W=2 / W=1 (params only)", f"{param_ratio:.3f}", "<= 0.55"),
        (f"bytes/iteration, {s['num_heads'][2]} heads", ", ".join(f"{b:,}" for b in b2), ""),
        (f"bytes/iteration, {s['num_heads'][8]} heads", ", ".join(f"{b:,}" for b in b8), ""),
        ("bytes equal at both pool sizes", str(b2 == b8), "equal"),
        (
            f"SDXL pool ({x['num_heads']} heads) numel per rank W=1/2/8",
            " / ".join(f"{x[f'w{w}_max_rank_numel'] / 1e6:.1f}M" for w in (1, 2, 8)),
            "",
        ),
        (
            "SDXL W=2 / W=1",
            f"{x['w2_max_rank_numel'] / x['w1_max_rank_numel']:.3f}",
            "<= 0.55",
        ),
    ]
    lines = [
        "| measure | value | target |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    note = (
        f"# Pool scaling (CPU, {os.cpu_count()} cores, digits preset)\n\n"
        f"Active heads per iteration: {t['active_heads']['dynamic']} (both pools); "
        f"pool sizes {t['num_heads']['dynamic']} (dynamic) vs {t['num_heads']['static']} "
        f"(static). Timing: median of {args.repeats} interleaved blocks of {args.iters} "
        f"iterations. Memory and bytes: 2 gloo ranks, {args.sync_iters} iterations, batch 16.\n\n"
    )
    (RESULTS / "pool_scaling.md").write_text(note + table + "\n")
    (RESULTS / "pool_scaling.json").write_text(
        json.dumps({"timing": t, "sharded": s, "sdxl": x}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
