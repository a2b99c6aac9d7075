"""gpu_sdxl.sh's generation phase: components, then 1-/4-step generation latency at 1024².

Components: the SDXL UNet's forward+backward as the G turn runs it, NCHW vs channels-last (the
train phase turns ``train.channels_last`` on only where this shows a gain); one AdamW step over
G's 2.6B parameters, foreach vs fused (time and the extra memory).

Generation end to end, batch 1 (text encoders + UNet steps + VAE decode, split by stage):
  eager_autocast  bf16 modules under autocast: the old path (the first H100 run)
  eager_bf16      bf16 modules without autocast (as diffusers pipelines run), fp32 sampler maths
  cuda_graphs     eager_bf16 with the UNet and the VAE decode replayed as CUDA graphs
  compiled        torch.compile(mode="reduce-overhead") UNet and VAE decode, channels-last
Each image is compared with eager_bf16's (the same kernels: a check of the graphs and of
compilation), eager_bf16's with the first variant's (autocast vs plain bf16).

  python benchmarks/gpu_sdxl_gen.py --out DIR [--variants ...] [--no-components] [--smoke]
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from gpu_sdxl import Phase, base_parser, guarded, median_ms

from nitro_dist import inference, perf
from nitro_dist.diffusion import StudentDenoiser, seeded_noise
from nitro_dist.models import tiny
from nitro_dist.models.builders import build_sdxl_from_configs
from nitro_dist.models.text import Cond

PROMPT = "a photo of a cat on a red sofa"
VARIANTS = ["eager_autocast", "eager_bf16", "cuda_graphs", "compiled"]


def components(ph: Phase, unet: torch.nn.Module, cond: Cond) -> None:
    dev, smoke = ph.dev, ph.args.smoke
    b, side = (1, 8) if smoke else (4, 64)  # smoke: the code path, not the numbers
    x = torch.randn(b, 4, side, side, device=dev)
    t = torch.randint(0, 1000, (b,), device=dev)
    c = Cond.cat([cond] * b)
    unet.requires_grad_(True).train().enable_gradient_checkpointing()

    def fwd_bwd() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = unet(x, t, **c.unet_kwargs()).sample
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    rec = {}
    for fmt in ("nchw", "channels_last"):
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        unet.to(memory_format=mf)
        rec[f"unet_fwd_bwd_{fmt}_ms"] = median_ms(
            fwd_bwd, dev, 1 if smoke else 2, 1 if smoke else 6
        )
    unet.to(memory_format=torch.contiguous_format)
    unet.requires_grad_(False).eval().disable_gradient_checkpointing()
    ph.emit("components", batch=b, side_px=side * 8, **rec)
    n = sum(p.numel() for p in unet.parameters())  # ZeRO-1/2 give AdamW one flat fp32 partition
    out: dict = {"numel": n}
    for key in ("foreach", "fused"):
        p = torch.nn.Parameter(torch.randn(n, device=dev))
        p.grad = torch.randn(n, device=dev)
        opt = torch.optim.AdamW([p], lr=1e-6, betas=(0.0, 0.99), fused=(key == "fused") or None)
        opt.step()  # creates the state
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        out[f"adamw_{key}_ms"] = median_ms(opt.step, dev, 1, 1 if smoke else 5)
        if dev.type == "cuda":
            out[f"adamw_{key}_extra_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        del p, opt
        gc.collect()
    ph.emit("components", **out)


def generate(ph: Phase, auto: bool, text, unet, decode, denoiser, steps: int, reps: int):
    """Median end-to-end latency (ms) of one image, its text/UNet/VAE split, the first image."""
    dev = ph.dev
    side, f = (32, 2) if ph.args.smoke else (1024, 8)
    shape = (4, side // f, side // f)
    split: dict[str, list[float]] = {"text": [], "unet": [], "vae": []}
    total, image = [], None
    warm = 1 if ph.args.smoke else 2  # two on a GPU: graph capture, then compilation
    for r in range(reps + warm):
        t0 = perf.now(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=auto):
            cond = text.encode([PROMPT], (side, side))
            t1 = perf.now(dev)
            x_T = seeded_noise([r], shape).to(dev)
            noise = lambda k, r=r: seeded_noise([r], shape, step=k)  # noqa: E731
            x0 = denoiser.sample(unet, x_T, cond, steps, noise_fn=noise)
            t2 = perf.now(dev)
            img = decode(x0).float().cpu()
        t3 = perf.now(dev)
        if r >= warm:
            total.append(t3 - t0)
            for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                split[k].append(v)
        image = img if image is None else image
    ms = {f"{k}_ms": 1000 * statistics.median(v) for k, v in split.items()}
    return 1000 * statistics.median(total), ms, image


def variant_calls(variant: str, unet, vae):
    """(UNet call, latents -> pixels) for a variant."""
    if variant == "eager_autocast":  # the old path: bf16 modules under autocast

        def decode(x0: torch.Tensor) -> torch.Tensor:
            return vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample

        return unet, decode
    graphs, comp = variant == "cuda_graphs", "reduce-overhead" if variant == "compiled" else None
    if comp:  # inductor picks NHWC kernels and decomposes GroupNorm: no transposes
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    u = inference.LowPrecisionUNet(unet, graphs=graphs, compile=comp)
    return u, inference.LowPrecisionDecoder(vae, graphs=graphs, compile=comp)


def run_variant(ph: Phase, variant: str, text, unet, vae, denoiser) -> None:
    reps = 1 if ph.args.smoke else 8
    if ph.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    u, decode = variant_calls(variant, unet, vae)
    auto = variant == "eager_autocast"
    t0 = time.time()
    one, split1, img = generate(ph, auto, text, u, decode, denoiser, 1, reps)
    four, split4, _ = generate(ph, auto, text, u, decode, denoiser, 4, reps)
    ph.references.setdefault(variant, img)
    vs = "eager_bf16" if variant != "eager_bf16" and "eager_bf16" in ph.references else None
    vs = vs or next(iter(ph.references))
    ref = ph.references[vs]
    ph.emit(
        "generation",
        variant=variant,
        side_px=32 if ph.args.smoke else 1024,
        one_step_ms=one,
        four_step_ms=four,
        one_step_split=split1,
        four_step_split=split4,
        rel_err=float((img - ref).norm() / ref.norm()),
        rel_err_vs=vs,
        wall_s_incl_warmup=time.time() - t0,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if ph.dev.type == "cuda" else 0.0,
    )


def gen(ph: Phase) -> None:
    from diffusers import AutoencoderKL

    dev, args = ph.dev, ph.args
    unet_cfg, text_cfgs, vae_cfg = ph.configs()
    t0 = time.time()
    with torch.device(dev):
        models = build_sdxl_from_configs(unet_cfg, text_cfgs, None)
        vae = AutoencoderKL(**vae_cfg).requires_grad_(False).eval()
    models.student = None  # one UNet is enough here
    unet = models.teacher.to(torch.bfloat16)
    text = models.text.to(torch.bfloat16)
    vae.to(torch.bfloat16)
    denoiser = StudentDenoiser(tiny.SDXL_SCHEDULE, shift=250)
    print(f"{ph.name}: built UNet, text encoders, VAE in {time.time() - t0:.1f}s", flush=True)
    if not args.no_components:
        guarded(ph, "components", components, ph, unet, text.encode([""], (64, 64)))
    for variant in args.variants:
        if dev.type != "cuda" and variant in ("cuda_graphs", "compiled"):
            continue
        need = args.compile_min_s if variant == "compiled" else 12.0
        if ph.left() < need:
            ph.emit("skipped", what=f"generation {variant}", left_s=round(ph.left()))
            continue
        guarded(ph, f"generation {variant}", run_variant, ph, variant, text, unet, vae, denoiser)


def main(argv: list[str] | None = None) -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS[:3])
    ap.add_argument("--no-components", action="store_true")
    ap.add_argument("--compile-min-s", type=float, default=60.0)
    args = ap.parse_args(argv)
    args.cmd = "gen"
    ph = Phase.start(args)
    gen(ph)
    print(f"gen done in {time.time() - ph.t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
