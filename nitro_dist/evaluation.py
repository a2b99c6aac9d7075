"""Student samples, sample grids and the digits evaluation of a training run (rank 0)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nitro_dist.digits.data import PROMPTS
from nitro_dist.images import save_grid
from nitro_dist.sampling import NitroLCMScheduler, seeded_noise

if TYPE_CHECKING:
    from nitro_dist.loop import Run

EVAL_SEED_OFFSET = 10_000_000  # evaluation never reuses a training seed


def generator_for_eval(run: Run) -> torch.nn.Module:
    """The weights samples and evaluation use: the EMA when there is one. Every rank calls it
    (under ZeRO-3 G's weights are partitioned and gathering them is collective)."""
    if run.ema is not None:
        return run.ema
    unet = run.g.full_module()
    if unet is run.models.student:
        return unet
    return unet.to(run.device).requires_grad_(False).eval()


@torch.no_grad()
def generate(
    run: Run,
    unet: torch.nn.Module,
    prompts: list[str],
    seeds: list[int],
    num_steps: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Student images for (prompt, seed) pairs; same seed -> same image (per-sample noise)."""
    was_training = unet.training
    unet.eval()
    out = []
    for s in range(0, len(prompts), batch_size):
        sd = seeds[s : s + batch_size]
        x_T = seeded_noise(sd, run.models.sample_shape).to(run.device)
        cond = run.conds(prompts[s : s + batch_size])
        x0 = run.denoiser.sample(
            unet,
            x_T,
            cond,
            num_steps,
            noise_fn=lambda k, sd=sd: seeded_noise(sd, run.models.sample_shape, step=k),
        )
        out.append(decode(run, x0).cpu())
    unet.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def decode(run: Run, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (identity for pixel-space tasks)."""
    vae = run.models.vae
    if vae is None:
        return x0.float().clamp(-1, 1)
    return vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)


def grid_prompts(n_per_prompt: int = 8) -> tuple[list[str], list[int]]:
    prompts = [p for p in PROMPTS for _ in range(n_per_prompt)]
    return prompts, [EVAL_SEED_OFFSET + i for i in range(len(prompts))]


def save_sample_grids(
    run: Run, folder: Path, tag: str, unet: torch.nn.Module | None = None
) -> list[Path]:
    per = run.cfg.train.grid_per_prompt
    prompts, seeds = grid_prompts(per)
    paths = []
    for n in (1, 2, 4):
        imgs = generate(
            run, unet if unet is not None else generator_for_eval(run), prompts, seeds, n
        )
        scale = max(1, 64 // imgs.shape[-1])
        paths.append(save_grid(imgs, per, folder / f"{tag}_{n}step.png", scale=scale))
    return paths


def evaluate(run: Run, num_images: int, unet: torch.nn.Module | None = None) -> dict[str, float]:
    """FID-digits and alignment of the student at 1/2/4 steps (digits-shaped tasks only)."""
    if run.models.sample_shape != (1, 8, 8):
        return {}
    from nitro_dist.digits.metric import DigitsEvaluator

    ev = DigitsEvaluator()
    labels = torch.arange(num_images) % 10
    prompts = [PROMPTS[int(y)] for y in labels]
    seeds = [EVAL_SEED_OFFSET + i for i in range(num_images)]
    out = {}
    for n in (1, 2, 4):
        res = ev.evaluate(
            generate(run, unet if unet is not None else generator_for_eval(run), prompts, seeds, n),
            labels,
        )
        out[f"fid_digits_{n}step"] = res["fid_digits"]
        out[f"alignment_{n}step"] = res["alignment"]
    return out


def scheduler_for(run: Run) -> NitroLCMScheduler:
    return scheduler_from_schedule(
        run.models.schedule, run.cfg.sampler.shift, run.cfg.sampler.original_inference_steps
    )


def scheduler_from_schedule(
    s: dict, shift: int, original_inference_steps: int = 4
) -> NitroLCMScheduler:
    """The exported scheduler for a model's noise schedule (diffusers scheduler config)."""
    return NitroLCMScheduler(
        num_train_timesteps=int(s.get("num_train_timesteps", 1000)),
        beta_start=float(s.get("beta_start", 0.00085)),
        beta_end=float(s.get("beta_end", 0.012)),
        beta_schedule=s.get("beta_schedule", "scaled_linear"),
        prediction_type=s.get("prediction_type", "epsilon"),
        shift=shift,
        original_inference_steps=original_inference_steps,
    )
