"""Samplers: the student's shifted-LCM sampler (1-4 steps, same weights) and the teacher sampler.

Shifted LCM (DESIGN.md §2, from NitroFusion's released inference code): step k of an n-step run
uses LCM's timesteps with ``original_inference_steps=4`` (n=4 -> [999, 749, 499, 249]); the UNet
is *told* t' = floor(t * shift / 1000) and x0 is recovered with alpha_bar(t'):

    x0_hat = (x_t - sqrt(1 - abar_t') * eps_hat) / sqrt(abar_t')

then re-noised to the next t with fresh noise. Training uses the same functions, so what is
trained is what is served. ``NitroLCMScheduler`` packages the same maths as a diffusers scheduler
so the exported generator runs in a stock diffusers pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from nitro_dist.models.text import Cond


def alphas_cumprod(schedule: dict[str, Any]) -> torch.Tensor:
    """abar_t for t = 0..T-1 (float64 for exact maths) from a diffusers scheduler config."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    sched = DDPMScheduler(**{k: schedule[k] for k in keys if k in schedule})
    return sched.alphas_cumprod.to(torch.float64)


def lcm_timesteps(
    num_steps: int, original_steps: int = 4, num_train_timesteps: int = 1000
) -> list[int]:
    """LCMScheduler's timesteps for ``num_steps`` out of ``original_steps`` (checked in tests)."""
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"steps: {num_steps} is outside 1..{original_steps}")
    c = num_train_timesteps // original_steps
    origin = [i * c - 1 for i in range(1, original_steps + 1)][::-1]  # [999, 749, 499, 249]
    skip = len(origin) // num_steps
    return origin[::skip][:num_steps]


def shifted(t: int | torch.Tensor, shift: int, num_train_timesteps: int = 1000) -> Any:
    """The timestep the UNet is told: floor(t * shift / T)."""
    return t * shift // num_train_timesteps


def _gather(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return abar.to(like.device)[t.to(like.device)].to(like.dtype).view(-1, *[1] * (like.ndim - 1))


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t has one entry per sample."""
    a = _gather(abar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t_told: torch.Tensor,
    abar: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """x0 from the UNet output using abar at the timestep the UNet was told."""
    a = _gather(abar, t_told, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_out
    if prediction_type == "sample":
        return model_out
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")


class StudentDenoiser:
    """One shifted-LCM denoising step: x_t at true timestep t -> x0_hat. Holds no weights."""

    def __init__(self, schedule: dict[str, Any], *, shift: int, original_steps: int = 4) -> None:
        self.abar = alphas_cumprod(schedule)
        self.num_train_timesteps = int(schedule.get("num_train_timesteps", 1000))
        self.prediction_type = schedule.get("prediction_type", "epsilon")
        self.shift = shift
        self.original_steps = original_steps

    def timesteps(self, num_steps: int) -> list[int]:
        return lcm_timesteps(num_steps, self.original_steps, self.num_train_timesteps)

    def __call__(
        self, unet: Callable, x_t: torch.Tensor, t: torch.Tensor, cond: Cond
    ) -> torch.Tensor:
        t_told = shifted(t, self.shift, self.num_train_timesteps)
        out = unet(x_t, t_told, **cond.unet_kwargs()).sample
        return predict_x0(out, x_t, t_told, self.abar, self.prediction_type)

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, noise, t, self.abar)

    @torch.no_grad()
    def sample(
        self,
        unet: Callable,
        x_T: torch.Tensor,
        cond: Cond,
        num_steps: int,
        noise_fn: Callable[[int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """n-step generation. ``noise_fn(k)`` gives the fresh noise for re-noising before step
        k (k = 1..n-1); default draws from torch's global RNG."""
        ts = self.timesteps(num_steps)
        x, x0 = x_T, x_T
        for k, t in enumerate(ts):
            t_B = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            if k > 0:
                noise = noise_fn(k) if noise_fn is not None else torch.randn_like(x)
                x = self.renoise(x0, noise.to(x), t_B)
            x0 = self(unet, x, t_B, cond)
        return x0


def seeded_noise(seeds: list[int], shape: tuple[int, ...], step: int = 0) -> torch.Tensor:
    """Per-sample noise from per-sample seeds, so a sample never depends on its batch-mates.

    ``step`` selects an independent stream for the re-noising before step k."""
    out = [
        torch.randn(shape, generator=torch.Generator().manual_seed(int(s) * 8 + step))
        for s in seeds
    ]
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Teacher


class TeacherSampler:
    """A frozen multi-step sampler from any diffusers scheduler class (DDIM, LCM, Euler, ...)."""

    @classmethod
    def from_config(cls, schedule: dict[str, Any], teacher_cfg) -> TeacherSampler:
        """From the config's ``teacher`` section (scheduler, steps, CFG, timesteps, overrides)."""
        return cls(
            schedule,
            scheduler=teacher_cfg.scheduler,
            num_steps=teacher_cfg.num_steps,
            guidance_scale=teacher_cfg.guidance_scale,
            timesteps=teacher_cfg.timesteps,
            overrides=teacher_cfg.scheduler_overrides,
            clean_x0=teacher_cfg.clean_x0,
        )

    def __init__(
        self,
        schedule: dict[str, Any],
        *,
        scheduler: str,
        num_steps: int,
        guidance_scale: float = 0.0,
        timesteps: list[int] | None = None,
        overrides: dict[str, Any] | None = None,
        clean_x0: bool = False,
    ) -> None:
        cls: type[SchedulerMixin] | None = getattr(diffusers, scheduler, None)  # checked below
        if cls is None or not isinstance(cls, type) or not issubclass(cls, SchedulerMixin):
            raise ValueError(f"teacher.scheduler: {scheduler!r} is not a diffusers scheduler class")
        self.scheduler = cls.from_config({**schedule, **(overrides or {})})
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.timesteps = list(timesteps or [])
        self.clean_x0 = clean_x0

    def unet_evals_per_sample(self) -> int:
        """UNet evaluations one sample costs (CFG doubles each: cond and uncond)."""
        sched = self.scheduler
        if self.timesteps:
            sched.set_timesteps(timesteps=self.timesteps)
        else:
            sched.set_timesteps(self.num_steps)
        return len(sched.timesteps) * (2 if self.guidance_scale > 1.0 else 1)

    @torch.no_grad()
    def sample(
        self,
        unet: Callable,
        x_T: torch.Tensor,
        cond: Cond,
        uncond: Cond | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """x0 from x_T. CFG when guidance_scale > 1 (needs ``uncond``, batched with cond)."""
        sched = self.scheduler
        if self.timesteps and num_steps is None:
            sched.set_timesteps(timesteps=self.timesteps, device=x_T.device)
        else:
            sched.set_timesteps(num_steps or self.num_steps, device=x_T.device)
        cfg = self.guidance_scale > 1.0
        if cfg and uncond is None:
            raise ValueError("teacher.guidance_scale > 1 needs the empty-prompt conditioning")
        both = cond
        if cfg:
            assert uncond is not None  # checked above
            both = Cond.cat([uncond, cond])
        x = x_T * sched.init_noise_sigma
        denoised = x
        for t in sched.timesteps:
            inp = torch.cat([x, x]) if cfg else x
            inp = sched.scale_model_input(inp, t)
            out = unet(inp, t, **both.unet_kwargs()).sample
            if cfg:
                out_u, out_c = out.chunk(2)
                out = out_u + self.guidance_scale * (out_c - out_u)
            kwargs = {"generator": generator} if "generator" in _step_params(sched) else {}
            step = sched.step(out, t, x, **kwargs)
            x = step.prev_sample
            denoised = getattr(step, "denoised", None)
            if self.clean_x0 and denoised is None:
                denoised = getattr(step, "pred_original_sample", None)
        # LCM returns the clean estimate of its last step as ``denoised``; others end at
        # prev_sample (at abar_prev of their last step), or with ``clean_x0`` at their own
        # clean estimate (DDIM, DDPM, Euler: ``pred_original_sample``).
        return denoised if denoised is not None else x


def _step_params(sched: SchedulerMixin) -> set[str]:
    import inspect

    return set(inspect.signature(sched.step).parameters)


# ---------------------------------------------------------------------------------------------
# Export: the same maths as a diffusers scheduler


class NitroLCMScheduler(SchedulerMixin, ConfigMixin):
    """Shifted-LCM as a diffusers scheduler: ``timesteps`` are what the UNet is told (t'), and
    ``step`` recovers x0 with abar(t') and re-noises to the next true LCM timestep.

    Use in a stock pipeline: ``pipe.scheduler = NitroLCMScheduler.from_pretrained(ckpt,
    subfolder="scheduler")``, then ``pipe(prompt, num_inference_steps=1..4, guidance_scale=0)``.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        shift: int = 250,
        original_inference_steps: int = 4,
    ) -> None:
        self.denoiser = StudentDenoiser(
            dict(self.config), shift=shift, original_steps=original_inference_steps
        )
        self.init_noise_sigma = 1.0
        self.set_timesteps(1)

    @classmethod
    def from_schedule(
        cls, schedule: dict[str, Any], shift: int, original_inference_steps: int = 4
    ) -> NitroLCMScheduler:
        """The exported scheduler for a teacher's noise schedule (its diffusers scheduler config)
        and the student's shift."""
        s = schedule
        return cls(
            num_train_timesteps=int(s.get("num_train_timesteps", 1000)),
            beta_start=float(s.get("beta_start", 0.00085)),
            beta_end=float(s.get("beta_end", 0.012)),
            beta_schedule=s.get("beta_schedule", "scaled_linear"),
            prediction_type=s.get("prediction_type", "epsilon"),
            shift=shift,
            original_inference_steps=original_inference_steps,
        )

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None, **_: Any
    ) -> None:
        self.true_timesteps = self.denoiser.timesteps(num_inference_steps)
        told = [
            shifted(t, self.config.shift, self.config.num_train_timesteps)
            for t in self.true_timesteps
        ]
        self.timesteps = torch.tensor(told, dtype=torch.long, device=device)
        self.num_inference_steps = num_inference_steps

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        told = int(timestep)
        idx = [i for i, t in enumerate(self.timesteps.tolist()) if t == told][0]
        t_B = torch.full((sample.shape[0],), told, dtype=torch.long)
        x0 = predict_x0(model_output, sample, t_B, self.denoiser.abar, self.config.prediction_type)
        if idx + 1 < len(self.true_timesteps):
            noise = torch.randn(sample.shape, generator=generator, device="cpu").to(sample)
            nxt = torch.full((sample.shape[0],), self.true_timesteps[idx + 1], dtype=torch.long)
            prev = self.denoiser.renoise(x0, noise, nxt)
        else:
            prev = x0
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
