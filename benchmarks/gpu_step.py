"""GPU check: one NitroFusion iteration at SDXL scale, and generation latency.

SDXL-architecture student + teacher (2.6B-parameter UNets) and both text encoders with random
weights from the configs in ``nitro_dist/models/tiny.py`` (no download), the sdxl_realism preset
with an online DMD2-style 4-step LCM teacher, bf16 autocast, fp32 AdamW master weights, single
process (no DeepSpeed yet). Prints iteration time, images/s, peak memory and MFU (FLOPs counted
with torch.utils.flop_counter over one iteration); then 1- and 4-step generation latency at
1024x1024 end to end (text encoders + UNet + VAE decode).

  python benchmarks/gpu_step.py [--resolution 512] [--batch 4] [--iters 10] [--candidates 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

from nitro_dist.config import load_config
from nitro_dist.loop import build_run, train_step
from nitro_dist.models import tiny
from nitro_dist.models.builders import build_sdxl_from_configs
from nitro_dist.sampling import seeded_noise

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_train(args, models) -> dict:
    cfg = load_config(
        "sdxl_realism",
        [
            "data.source=digits",
            "teacher.mode=online",
            f"train.device={args.device}",
            f"train.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
            f"train.batch_size={args.batch}",
            f"pool.candidates={args.candidates}",
            f"data.resolution={args.resolution}",
        ],
    )
    side = args.resolution // 8
    models.sample_shape = (4, side, side)
    models.student.enable_gradient_checkpointing()
    run = build_run(cfg, models=models, progress=False)
    heads = run.pool.numel()
    for i in range(args.warmup):
        train_step(run, i)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.iters):
        t0 = sync_time()
        train_step(run, args.warmup + i)
        times.append(sync_time() - t0)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(run, args.warmup + args.iters)
    flops = counter.get_total_flops()
    it_s = statistics.median(times)
    peak = peak_flops(torch.cuda.get_device_name()) if args.device == "cuda" else None
    return {
        "resolution": args.resolution,
        "batch": args.batch,
        "pool_heads": run.layout.num_heads,
        "active_heads": len(run.layout.slots_of_bucket(0)) * cfg.pool.heads_per_slot,
        "pool_params_plus_state": heads,
        "iteration_s_median": it_s,
        "iteration_s_all": [round(t, 4) for t in times],
        "images_per_s": args.batch / it_s,
        "peak_mem_gib": peak_mem,
        "flops_per_iteration": flops,
        "mfu": (flops / it_s / peak) if peak else None,
        "run": run,
    }


@torch.no_grad()
def bench_generate(run, vae, steps: int, reps: int, side: int) -> float:
    """Median end-to-end latency (s) of one image: text encoders, UNet steps, VAE decode."""
    models = run.models
    student = models.student
    shape = (4, side // 8, side // 8)
    dev = run.device
    lat = []
    for r in range(reps + 2):
        t0 = sync_time()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            cond = models.text.encode(["a photo of a cat on a red sofa"], (side, side)).to(dev)
            x_T = seeded_noise([r], shape).to(dev)
            x0 = run.denoiser.sample(
                student, x_T, cond, steps, noise_fn=lambda k, r=r: seeded_noise([r], shape, step=k)
            )
            img = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample
        img.float().cpu()
        if r >= 2:  # two warm-ups
            lat.append(sync_time() - t0)
    return statistics.median(lat)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=1)
    ap.add_argument("--gen-reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--smoke", action="store_true", help="tiny SDXL look-alike on CPU (checks the script)"
    )
    args = ap.parse_args()
    if args.smoke:
        args.device, unet_cfg, text_cfgs, vae_cfg = (
            "cpu",
            tiny.TINY_SDXL_UNET,
            tiny.TINY_SDXL_TEXT_ENCODERS,
            tiny.TINY_VAE,
        )
        args.resolution, gen_side = 64, 32
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA device (or --smoke)")
    else:
        args.device, unet_cfg, text_cfgs, vae_cfg = (
            "cuda",
            tiny.SDXL_UNET,
            tiny.SDXL_TEXT_ENCODERS,
            tiny.SDXL_VAE,
        )
        gen_side = 1024
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke)"
    t0 = time.time()
    with torch.device(args.device):
        models = build_sdxl_from_configs(unet_cfg, text_cfgs, None)
        vae = AutoencoderKL(**vae_cfg)
    if args.device == "cuda":
        vae.to(torch.bfloat16)
    vae.requires_grad_(False).eval()
    print(f"{name}: built SDXL-architecture models in {time.time() - t0:.1f}s", flush=True)
    res = bench_train(args, models)
    run = res.pop("run")
    res["generate_1step_s"] = bench_generate(run, vae, 1, args.gen_reps, gen_side)
    res["generate_4step_s"] = bench_generate(run, vae, 4, args.gen_reps, gen_side)
    res["generate_side"] = gen_side
    res["device"] = name
    res["torch"] = torch.__version__
    lines = [
        f"# NitroFusion iteration at SDXL scale on {name}",
        "",
        f"- {args.resolution}x{args.resolution}, batch {args.batch}, bf16 autocast, online 4-step "
        f"LCM teacher, pool {res['pool_heads']} heads ({res['active_heads']} active), "
        "single process, plain torch AdamW (fp32 master)",
        f"- iteration: {res['iteration_s_median'] * 1000:.0f} ms median "
        f"({res['images_per_s']:.2f} images/s), peak memory {res['peak_mem_gib']:.1f} GiB",
        f"- FLOPs per iteration {res['flops_per_iteration'] / 1e12:.1f} TFLOP; "
        + (f"MFU {100 * res['mfu']:.1f}%" if res["mfu"] else "MFU: unknown peak for this card"),
        f"- generation {gen_side}x{gen_side} end to end (text encoders + UNet + VAE decode): "
        f"1 step {res['generate_1step_s'] * 1000:.0f} ms, "
        f"4 steps {res['generate_4step_s'] * 1000:.0f} ms",
    ]
    print("\n".join(lines))
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
