"""GPU check for serving: what Serve's dynamic batching buys at SDXL scale.

The replica's own code path (``nitro_dist.image_api.run_jobs`` on
``nitro_dist.inference.Generator``:
text encoders, shifted-LCM UNet steps, VAE decode, PNG encode) on an SDXL-architecture model with
random weights from the shipped configs, bf16, 1024². Eight concurrent requests served one per
model call (batching off) vs all eight in one call (batching on, what ``@serve.batch`` groups),
for 1 and 4 steps: images/s and per-request latency. Ray is not on the GPU machine (its wheel is
over the device tool's 64 MiB carry limit), so the HTTP layer is measured on CPU by
``benchmarks/serve_load.py``; this measures the model side of batching.

  python benchmarks/gpu_serve_batching.py [--side 1024] [--concurrent 8] [--reps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def build(smoke: bool):
    from diffusers import AutoencoderKL

    from nitro_dist.diffusion import NitroLCMScheduler
    from nitro_dist.inference import Generator
    from nitro_dist.models import tiny
    from nitro_dist.models.builders import build_sdxl_from_configs

    if smoke:
        unet, text, vae, dev, dtype = (
            tiny.TINY_SDXL_UNET,
            tiny.TINY_SDXL_TEXT_ENCODERS,
            tiny.TINY_VAE,
            "cpu",
            torch.float32,
        )
    else:
        unet, text, vae, dev, dtype = (
            tiny.SDXL_UNET,
            tiny.SDXL_TEXT_ENCODERS,
            tiny.SDXL_VAE,
            "cuda",
            torch.bfloat16,
        )
    with torch.device(dev):
        m = build_sdxl_from_configs(unet, text, None)
        vae_model = AutoencoderKL(**vae)
    del m.student
    sched = NitroLCMScheduler.from_schedule(m.schedule, shift=250)
    return Generator(m.teacher, m.text, sched, vae_model, device=dev, dtype=dtype)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny SDXL look-alike on CPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_serve_batching.py needs a CUDA device (or --smoke)")
    from nitro_dist.image_api import Job, run_jobs

    t0 = time.time()
    gen = build(args.smoke)
    side = gen.native_size if args.smoke else args.side
    name = torch.cuda.get_device_name() if not args.smoke else "CPU (smoke)"
    print(f"{name}: built the SDXL-architecture generator in {time.time() - t0:.1f}s", flush=True)
    n = args.concurrent
    rows = []
    for steps in (1, 4):
        jobs = [Job(f"a photo of a cat, number {i}", steps, i, 1, side, side) for i in range(n)]
        run_jobs(gen, jobs[:1])  # warm-up, both shapes
        run_jobs(gen, jobs)
        for mode in ("off", "on"):
            walls, lats = [], []
            for _ in range(args.reps):
                start = sync()
                if mode == "on":
                    run_jobs(gen, jobs)
                    lats += [sync() - start] * n  # everyone waits for the one call
                else:  # one call per request, in arrival order: request i waits for 0..i
                    for job in jobs:
                        run_jobs(gen, [job])
                        lats.append(sync() - start)
                walls.append(sync() - start)
            wall = statistics.median(walls)
            rows.append(
                {
                    "steps": steps,
                    "batching": mode,
                    "images_per_s": n / wall,
                    "mean_latency_ms": 1000 * statistics.fmean(lats),
                    "max_latency_ms": 1000 * max(lats),
                }
            )
            print(rows[-1], flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    lines = [
        f"# Serving: batching at SDXL scale on {name}",
        "",
        f"{n} concurrent requests, 1 image each, {side}x{side}, "
        f"{'bf16' if not args.smoke else 'fp32'}, the replica's code path (text encoders + UNet "
        f"steps + VAE decode + PNG); median of {args.reps}; peak memory {peak:.1f} GiB.",
        "",
        "| steps | batching | images/s | mean latency ms | max latency ms |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['batching']} | {r['images_per_s']:.2f} | "
            f"{r['mean_latency_ms']:.0f} | {r['max_latency_ms']:.0f} |"
        )
    lines.append("")
    for steps in (1, 4):
        on, off = (
            next(r for r in rows if r["steps"] == steps and r["batching"] == b)["images_per_s"]
            for b in ("on", "off")
        )
        lines.append(f"- {steps} step: batching on/off throughput {on / off:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
