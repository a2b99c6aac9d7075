"""FLOP and MFU accounting for the training iteration (benchmarks).

MFU here is *model* FLOPs per second over the card's dense bf16 peak: FLOPs counted with
``torch.utils.flop_counter`` over the iteration's own code run on meta tensors (no device memory:
counting on the GPU beside a ZeRO-2 run at SDXL scale ran out of memory), with activation
checkpointing off. HFU counts the iteration as run, recomputation included.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from nitro_dist import step as S
from nitro_dist.build import Run
from nitro_dist.config import Config
from nitro_dist.diffusion import StudentDenoiser, TeacherSampler
from nitro_dist.discriminator.backbone import level_shapes
from nitro_dist.discriminator.pool import make_layout
from nitro_dist.models.text import Cond
from nitro_dist.step import train_step
from nitro_dist.timing import PhaseTimer

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, most specific first.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (the device name says "H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in device_name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def now(device: torch.device) -> float:
    """Wall clock after the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


# ---------------------------------------------------------------------------------------------
# FLOPs of a training iteration


@dataclass
class IterationFlops:
    """FLOPs of one iteration on one rank, per sample of its local batch (every op the counter
    sees is linear in the batch). The draw changes them only through the backward simulation:
    sample b runs k_b - 1 extra student forwards, so an iteration of local batch B with
    n_backsim = sum_b (k_b - 1) costs B * per_sample + per_backsim * n_backsim."""

    hardware_per_sample: float  # with what activation checkpointing recomputes
    model_per_sample: float  # the same iteration without it
    per_backsim: float  # one student forward of one sample, no grad

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> IterationFlops:
        """From a results row that holds these fields (``dataclasses.asdict`` wrote them)."""
        return cls(rec["hardware_per_sample"], rec["model_per_sample"], rec["per_backsim"])

    def hardware(self, batch: int, n_backsim: float) -> float:
        return batch * self.hardware_per_sample + self.per_backsim * n_backsim

    def model(self, batch: int, n_backsim: float) -> float:
        return batch * self.model_per_sample + self.per_backsim * n_backsim


def n_backsim(metrics: dict[str, float], local_batch: int) -> float:
    """Student forwards of the backward simulation in an iteration, from its ``mean_k``."""
    return local_batch * (metrics["mean_k"] - 1.0)


def meta_iteration_flops(
    cfg: Config,
    student_config: dict[str, Any],
    teacher_config: dict[str, Any],
    sample_shape: tuple[int, int, int],
    cond: Cond,
    schedule: dict[str, Any],
) -> IterationFlops:
    """Count one iteration by running its own functions (step.py: G turn, backward, D turns) on
    meta copies of the models built from their configs: no memory and no compute, so any model
    at any size, on a CPU, beside a GPU that is busy training (SDXL at 1024²: about a minute).
    Counted twice, with ``cfg.model.gradient_checkpointing`` as set (hardware FLOPs) and off
    (model FLOPs). An online teacher adds its sampler's UNet evaluations; text encoders are not
    counted (the loop caches conditioning per prompt)."""
    c = cond.index(slice(0, 1)).to("meta", torch.float32)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(teacher_config).requires_grad_(False).eval()
        student = UNet2DConditionModel.from_config(student_config).train()
        layout = make_layout(cfg.pool, level_shapes(teacher, sample_shape, c))
    draw = S.draw_heads(cfg, layout, 0)  # the same shapes in any draw
    with torch.device("meta"):
        heads = {h: layout.build_head(h) for h in draw.head_ids}
        x = torch.zeros(1, *sample_shape)
    batch = S.Batch(x, x, c, c)
    noise = S.draw_iteration_noise(cfg.seed, 0, [0], sample_shape, [1], draw, layout, "meta")
    denoiser = StudentDenoiser(
        schedule, shift=cfg.sampler.shift, original_steps=cfg.sampler.original_inference_steps
    )
    denoiser.abar = denoiser.abar.to("meta")

    def iteration(ckpt: bool) -> None:
        S.replay_phases(
            student, teacher, denoiser, heads, layout, batch, noise,
            loss_type=cfg.loss.type, d_steps=cfg.optim.d_steps_per_g_step,
            activation_checkpointing=ckpt,
        )  # fmt: skip

    counts = []
    for ckpt in (cfg.model.gradient_checkpointing, False):
        if ckpt:
            student.enable_gradient_checkpointing()
        else:
            student.disable_gradient_checkpointing()
        counts.append(count_flops(functools.partial(iteration, ckpt))[0])
    t = torch.full((1,), 999, dtype=torch.long, device="meta")
    with torch.no_grad():
        student_fwd, _ = count_flops(lambda: student(x, t, **c.unet_kwargs()))
        teacher_flops = 0
        if cfg.teacher.mode == "online":
            evals = TeacherSampler.from_config(schedule, cfg.teacher).unet_evals_per_sample()
            teacher_flops = evals * count_flops(lambda: teacher(x, t, **c.unet_kwargs()))[0]
    hw, model = (n + teacher_flops for n in counts)
    return IterationFlops(float(hw), float(model), float(student_fwd))


def run_iteration_flops(run: Run) -> IterationFlops:
    """``meta_iteration_flops`` for a built run's models and config."""
    m = run.models
    return meta_iteration_flops(
        run.cfg, dict(m.student.config), dict(m.teacher.config), m.sample_shape, run.conds([""]),
        m.schedule,
    )  # fmt: skip


@dataclass
class TrainingMeasure:
    batch: int  # local batch (per rank)
    seconds: list[float]  # wall time of each timed iteration
    peak_mem_gib: float  # CUDA memory allocated at peak over the timed iterations (0 on CPU)
    breakdown_s: dict[str, float]  # mean seconds per phase (PhaseTimer, synchronised)
    hardware_flops: float | None  # per timed iteration, mean (None: not counted)
    model_flops: float | None
    next_iteration: int
    mean_backsim: float = 0.0  # backward-simulation student forwards per timed iteration

    @property
    def images_per_s(self) -> float:
        return self.batch * len(self.seconds) / sum(self.seconds)

    def utilisation(self, peak: float | None) -> tuple[float | None, float | None]:
        """(MFU, HFU): model / hardware FLOPs per second over ``peak``."""
        if peak is None or self.hardware_flops is None:
            return None, None
        per_s = len(self.seconds) / sum(self.seconds) / peak
        mfu = None if self.model_flops is None else self.model_flops * per_s
        return mfu, self.hardware_flops * per_s


def measure_training(
    run: Run,
    start: int,
    iters: int,
    *,
    breakdown_iters: int = 2,
    flops: IterationFlops | None = None,
) -> TrainingMeasure:
    """``iters`` timed iterations from ``start`` (warm up before), then ``breakdown_iters`` under a
    synchronising ``PhaseTimer`` (where the time goes). ``flops`` (``run_iteration_flops`` or
    ``meta_iteration_flops``, computed anywhere) gives each timed iteration's FLOPs by its draw."""
    dev, b = run.device, run.cfg.train.batch_size // run.world_size
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    seconds, backsim = [], []
    it = start
    for _ in range(iters):
        t0 = now(dev)
        m = train_step(run, it)
        seconds.append(now(dev) - t0)
        backsim.append(n_backsim(m, b))
        it += 1
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    timer = PhaseTimer(sync_cuda=dev.type == "cuda")
    for _ in range(breakdown_iters):
        train_step(run, it, timer)
        it += 1
    breakdown = {k: v / max(breakdown_iters, 1) for k, v in timer.seconds.items()}
    mean_backsim = sum(backsim) / iters  # FLOPs are linear in it: the mean iteration's FLOPs
    hw = None if flops is None else flops.hardware(b, mean_backsim)
    model = None if flops is None else flops.model(b, mean_backsim)
    return TrainingMeasure(b, seconds, peak, breakdown, hw, model, it, mean_backsim)
