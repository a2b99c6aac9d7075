"""Training throughput: images/s per worker and where one iteration goes, for a named config.

  python benchmarks/train_throughput.py [--config tiny] [--workers 2] [--iters 5] [--warmup 1]
      [--teacher both|offline|online] [--engine deepspeed|torch] [--compare KEY=A,B]
      [--json PATH] [key=value ...]

``--compare pool.overlap_comm=false,true`` measures each value of one config key side by side
in the same run (a column per teacher mode and value), e.g. a performance option before/after.

Each worker builds the run as training does (``loop.build_run``), then ``--engine deepspeed``
applies ``distributed.parallel.parallelize`` (G under DeepSpeed, the head pool sharded over W > 1
ranks) and ``--engine torch`` a plain AdamW with gradients averaged over ranks (and the same
sharded pool). W > 1 workers are processes (torch.multiprocessing) in one gloo group on the CPU,
or NCCL with one GPU each. Teacher offline (pairs precomputed once: ``teacher.offline_pairs`` is
cut to what the timed iterations draw) and online side by side. The breakdown comes from a
synchronising phase timer (``timing.PhaseTimer``) over extra iterations, rank 0's; exclusive
times, so the phases add up to the iteration. On a GPU: peak memory, MFU and HFU (FLOPs counted
with torch.utils.flop_counter, peak from the device name; ``nitro_dist.perf``).

A diffusers preset whose model paths are placeholders (sdxl_realism, sdxl_vibrant) runs with
random weights from SDXL's configs, and placeholder shards become the digits prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from nitro_dist import perf
from nitro_dist.build import build_run
from nitro_dist.config import Config, load_config, with_values
from nitro_dist.distributed.g_update import TorchUpdate
from nitro_dist.models import tiny
from nitro_dist.models.builders import Models, build_sdxl_from_configs
from nitro_dist.step import train_step

PHASE_ORDER = [
    "data", "teacher", "pool_gather", "g_backsim", "g_forward", "backbone", "heads",
    "g_backward", "g_optimizer", "d_backward", "pool_comm", "heads_optimizer", "refresh",
]  # fmt: skip


def make_config(args: argparse.Namespace, mode: str, variant: str = "") -> Config:
    cfg = load_config(args.config, args.overrides + ([variant] if variant else []))
    values: dict = {"teacher.mode": mode, "logging.wandb": False, "logging.progress": False}
    values["distributed.num_workers"] = args.workers
    if not any(o.startswith("teacher.offline_pairs=") for o in args.overrides):
        values["teacher.offline_pairs"] = max(cfg.train.batch_size * 2, 16)
    if cfg.data.source == "shards" and "PLACEHOLDER" in cfg.data.shards:
        # the digits task's built-in prompts stand in for captions: the latents' size counts
        values["task"], values["data.source"] = "digits", "task"
    return with_values(cfg, values)


def synthetic_models(cfg: Config, device: torch.device, resolution: int) -> Models | None:
    """Random SDXL weights for a diffusers preset whose paths are placeholders, trained at
    ``resolution`` pixels (latents of a VAE with 8x downsampling)."""
    if cfg.model.source != "diffusers" or Path(cfg.model.teacher_path or "").exists():
        return None
    with torch.device(device):
        models = build_sdxl_from_configs(tiny.SDXL_UNET, tiny.SDXL_TEXT_ENCODERS, None, cfg.seed)
    side = resolution // 8
    models.sample_shape = (4, side, side)
    if cfg.model.gradient_checkpointing:
        models.student.enable_gradient_checkpointing()
    return models


def measure_mode(
    args: argparse.Namespace, mode: str, rank: int, world: int, variant: str = ""
) -> dict:
    cfg = make_config(args, mode, variant)
    gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    models = synthetic_models(cfg, device, args.resolution)
    run = build_run(
        cfg, rank=rank, world_size=world, owned_heads=None if world == 1 else [],
        progress=False, models=models,
    )  # fmt: skip
    if args.engine == "deepspeed":
        from nitro_dist.distributed.parallel import parallelize

        parallelize(run, rank, world)
    elif world > 1:
        from nitro_dist.distributed.pool_sync import ShardedPool

        run.pool = ShardedPool(run.layout, cfg.pool, cfg.seed, rank, world, run.device)
        run.g = TorchUpdate(run.models.student, cfg, world_size=world)
    for it in range(args.warmup):
        train_step(run, it)
    flops = perf.run_iteration_flops(run) if device.type == "cuda" else None  # meta tensors
    m = perf.measure_training(
        run, args.warmup, args.iters, breakdown_iters=args.breakdown_iters, flops=flops
    )
    mfu, hfu = m.utilisation(perf.peak_flops(perf.device_name(device)))
    it_s = sum(m.seconds) / len(m.seconds)
    return {
        "mode": mode,
        "variant": variant,
        "device": perf.device_name(device),
        "workers": world,
        "batch_per_worker": m.batch,
        "iteration_ms": 1000 * it_s,
        "images_per_s_per_worker": m.images_per_s,
        "images_per_s": m.images_per_s * world,  # every rank times the same iterations
        "peak_mem_gib": m.peak_mem_gib,
        "mfu": mfu,
        "hfu": hfu,
        "breakdown_ms": {k: 1000 * v for k, v in m.breakdown_s.items()},
    }


def worker(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world)
    gpu = torch.cuda.is_available() and "train.device=cpu" not in args.overrides
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    modes = ["offline", "online"] if args.teacher == "both" else [args.teacher]
    results = [
        measure_mode(args, mode, rank, world, variant)
        for mode in modes
        for variant in variants(args.compare)
    ]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(results, gathered, dst=0)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def table(per_rank: list[list[dict]], args: argparse.Namespace) -> str:
    rows = per_rank[0]
    lines = [
        f"# Training throughput: --config {args.config} {' '.join(args.overrides)}".rstrip(),
        f"{rows[0]['workers']} worker(s) on {rows[0]['device']}, engine {args.engine}, "
        f"{args.iters} timed iterations after {args.warmup} warm-up",
        "",
        "| | " + " | ".join(column(r) for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]

    def row(name: str, vals: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(vals) + " |")

    row("batch per worker", [str(r["batch_per_worker"]) for r in rows])
    row("ms / iteration", [f"{r['iteration_ms']:.1f}" for r in rows])
    row("images/s per worker", [f"{r['images_per_s_per_worker']:.2f}" for r in rows])
    row("images/s, all workers", [f"{r['images_per_s']:.2f}" for r in rows])
    if rows[0]["device"] != "CPU":
        row("peak memory GiB", [f"{r['peak_mem_gib']:.1f}" for r in rows])
        row("MFU / HFU", [f"{_pct(r['mfu'])} / {_pct(r['hfu'])}" for r in rows])
    phases = [p for p in PHASE_ORDER if any(p in r["breakdown_ms"] for r in rows)]
    phases += sorted({p for r in rows for p in r["breakdown_ms"]} - set(phases))
    for p in phases:
        row(f"{p} ms", [f"{r['breakdown_ms'].get(p, 0.0):.1f}" for r in rows])
    row("sum of phases ms", [f"{sum(r['breakdown_ms'].values()):.1f}" for r in rows])
    return "\n".join(lines)


def variants(compare: str | None) -> list[str]:
    """``KEY=A,B`` -> ["KEY=A", "KEY=B"]; none -> [""] (the config as given)."""
    if not compare:
        return [""]
    key, _, values = compare.partition("=")
    return [f"{key}={v}" for v in values.split(",")]


def column(r: dict) -> str:
    return f"teacher {r['mode']}" + (f", {r['variant']}" if r.get("variant") else "")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="tiny", help="preset name or YAML path")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--breakdown-iters", type=int, default=2)
    ap.add_argument("--teacher", choices=["both", "offline", "online"], default="both")
    ap.add_argument("--engine", choices=["deepspeed", "torch"], default="deepspeed")
    ap.add_argument("--resolution", type=int, default=1024, help="SDXL presets: pixels")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: share)")
    ap.add_argument("--compare", default=None, help="KEY=A,B: each value side by side")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    try:
        for variant in variants(args.compare):
            cfg = load_config(args.config, args.overrides + ([variant] if variant else []))
            with_values(cfg, {"distributed.num_workers": args.workers})  # batch divides
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if args.workers == 1:
            worker(0, 1, args, out)
        else:
            torch.multiprocessing.spawn(worker, args=(args.workers, args, out), nprocs=args.workers)
        per_rank = json.loads(Path(out).read_text())
    print(table(per_rank, args))
    if args.json:
        args.json.write_text(json.dumps(per_rank, indent=1))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
