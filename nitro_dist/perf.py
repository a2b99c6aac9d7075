"""Performance helpers: FLOP accounting for MFU, a one-process process group, and fast inference
calls (bf16 without autocast, CUDA-graph replay) for the generation path.

MFU here is *model* FLOPs per second over the card's dense bf16 peak: FLOPs counted with
``torch.utils.flop_counter`` over a real iteration (that count includes what activation
checkpointing recomputes: "hardware" FLOPs), minus the recomputation. HFU keeps it in.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from nitro_dist.discriminator.backbone import backbone_features
from nitro_dist.loop import Run, autocast, train_step
from nitro_dist.models.text import Cond
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


def init_process_group(device: torch.device) -> None:
    """A one-rank process group (NCCL on GPU, gloo on CPU) for DeepSpeed outside any launcher."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    env = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


# ---------------------------------------------------------------------------------------------
# FLOPs of a training iteration


@dataclass
class IterationFlops:
    """FLOPs of one iteration on one rank. They depend on the draw only through the backward
    simulation (sample b runs k_b - 1 extra student forwards), so for any iteration
    hardware = base + per_backsim * n_backsim with n_backsim = sum_b (k_b - 1)."""

    base: float
    per_backsim: float  # one student forward of one sample (no grad)
    recompute: float | None  # what activation checkpointing recomputes per iteration
    counted: float  # hardware FLOPs of the counted iteration

    def hardware(self, n_backsim: float) -> float:
        return self.base + self.per_backsim * n_backsim

    def model(self, n_backsim: float) -> float | None:
        return None if self.recompute is None else self.hardware(n_backsim) - self.recompute


def n_backsim(metrics: dict[str, float], local_batch: int) -> float:
    """Student forwards of the backward simulation in an iteration, from its ``mean_k``."""
    return local_batch * (metrics["mean_k"] - 1.0)


def recompute_flops(
    unet_config: dict[str, Any],
    sample_shape: tuple[int, int, int],
    cond: Cond,
    *,
    student_checkpointing: bool,
    backbone_checkpointing: bool,
    backbone_passes: int,
) -> float:
    """FLOPs that activation checkpointing recomputes for one sample of an iteration: the
    student's forward with grad (diffusers checkpoints its resnets and transformer blocks) and
    each backbone pass with grad (``backbone_features`` checkpoints whole blocks). Counted exactly
    as (forward + backward with checkpointing) - (without), on meta tensors: no memory, no
    compute, any size on a CPU (SDXL at 1024²: ~15 s)."""

    def fwd_bwd(student: bool, ckpt: bool) -> int:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            x = torch.zeros(1, *sample_shape, requires_grad=not student)
            t = torch.full((1,), 500)
            c = cond.index(slice(0, 1)).to("meta", torch.float32)
        unet.requires_grad_(student).train()
        if student and ckpt:
            unet.enable_gradient_checkpointing()

        def run() -> None:
            if student:
                unet(x, t, **c.unet_kwargs()).sample.sum().backward()
            else:
                feats = backbone_features(unet, x, t, c, activation_checkpointing=ckpt)
                sum(f.sum() for f in feats).backward()

        return count_flops(run)[0]

    total = 0.0
    if student_checkpointing:
        total += fwd_bwd(True, True) - fwd_bwd(True, False)
    if backbone_checkpointing:
        total += backbone_passes * (fwd_bwd(False, True) - fwd_bwd(False, False))
    return total


def run_recompute_flops(run: Run) -> float:
    """``recompute_flops`` per sample for this run's models and settings."""
    return recompute_flops(
        dict(run.models.teacher.config),
        run.models.sample_shape,
        run.conds([""]),
        student_checkpointing=getattr(run.models.student, "is_gradient_checkpointing", False),
        backbone_checkpointing=run.cfg.model.gradient_checkpointing,
        backbone_passes=2 if "local_uncond" in run.layout.kinds else 1,
    )


def iteration_flops(
    run: Run, iteration: int, recompute_per_sample: float | None = None
) -> tuple[IterationFlops, dict[str, float]]:
    """Count one full iteration (it trains: the model steps) and one student forward of one
    sample; returns the FLOP model and the iteration's metrics. ``recompute_per_sample``:
    ``run_recompute_flops(run)``; None leaves the model FLOPs unknown (hardware only)."""
    hw, metrics = count_flops(lambda: train_step(run, iteration))
    b = run.cfg.train.batch_size // run.world_size
    x = torch.zeros(1, *run.models.sample_shape, device=run.device)
    t = torch.full((1,), 999, dtype=torch.long, device=run.device)
    cond = run.conds([""])
    with torch.no_grad(), autocast(run):
        student, _ = count_flops(lambda: run.denoiser(run.g.module, x, t, cond))
    base = hw - student * n_backsim(metrics, b)
    recompute = None if recompute_per_sample is None else b * recompute_per_sample
    return IterationFlops(base, float(student), recompute, float(hw)), metrics


@dataclass
class TrainingMeasure:
    batch: int  # local batch (per rank)
    seconds: list[float]  # wall time of each timed iteration
    peak_mem_gib: float  # CUDA memory allocated at peak over the timed iterations (0 on CPU)
    breakdown_s: dict[str, float]  # mean seconds per phase (PhaseTimer, synchronised)
    hardware_flops: float | None  # per timed iteration, mean (None: not counted)
    model_flops: float | None
    next_iteration: int

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
    flops: bool = True,
    recompute_per_sample: float | None = None,
) -> TrainingMeasure:
    """``iters`` timed iterations from ``start`` (warm up before), then ``breakdown_iters`` under a
    synchronising ``PhaseTimer`` (where the time goes) and, with ``flops``, one counted iteration
    that gives the FLOPs of every timed one (``IterationFlops``; model FLOPs need
    ``recompute_per_sample``, see ``run_recompute_flops``)."""
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
    hw = model = None
    if flops:
        # The counted iteration runs under FlopCounterMode, which on an H100 at SDXL scale needed
        # ~10 GiB more than a plain iteration (ZeRO-2's gradient partition did not fit): the
        # timings above must survive that, so a failed count only leaves the FLOPs unknown.
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        try:
            fl, _ = iteration_flops(run, it, recompute_per_sample)
        except torch.OutOfMemoryError as e:
            print(f"FLOP count skipped (out of memory under the counter): {e}", flush=True)
        else:
            hw = sum(fl.hardware(n) for n in backsim) / iters
            if fl.recompute is not None:
                model = hw - fl.recompute
        it += 1
    return TrainingMeasure(b, seconds, peak, breakdown, hw, model, it)


# ---------------------------------------------------------------------------------------------
# fast inference calls (generation latency)


class CudaGraphed:
    """Replays a CUDA graph of ``fn`` (inference only: no autograd, fixed shapes). The first
    call with a new input signature warms up on a side stream and captures; later calls copy
    the inputs into the captured buffers and replay. Tensor outputs are cloned (the next replay
    overwrites the captured ones). Removes the CPU's per-kernel launch cost, which dominates a
    batch-1 UNet step in eager mode."""

    def __init__(self, fn: Callable[..., Any], warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[list[Any], torch.cuda.CUDAGraph, Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        key = (
            str(spec),
            tuple((tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else v for v in flat),
        )
        if key not in self.graphs:
            self.graphs[key] = self._capture(flat, spec)
        static, graph, out = self.graphs[key]
        for dst, src in zip(static, flat, strict=True):
            if torch.is_tensor(dst):
                dst.copy_(src)
        graph.replay()
        return tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, out)

    @torch.no_grad()
    def _capture(self, flat: list[Any], spec: Any) -> tuple[list[Any], torch.cuda.CUDAGraph, Any]:
        static = [v.clone() if torch.is_tensor(v) else v for v in flat]
        args, kwargs = tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*args, **kwargs)
        return static, graph, out


def _cast(dtype: torch.dtype) -> Callable[[Any], Any]:
    return lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v


class LowPrecisionUNet:
    """A UNet held in ``dtype`` called without autocast (as diffusers pipelines run): floating
    inputs are cast to ``dtype`` and the prediction comes back fp32, so the sampler's maths
    stays fp32. ``graphs``: replay CUDA graphs (``CudaGraphed``); ``compile``: a
    ``torch.compile`` mode ("default", "reduce-overhead", ...). Same call as the UNet."""

    def __init__(
        self,
        unet: torch.nn.Module,
        dtype: torch.dtype = torch.bfloat16,
        *,
        graphs: bool = False,
        compile: str | None = None,
    ) -> None:
        self.dtype = dtype

        def predict(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
            return unet(x, t, **kw).sample

        fn: Callable[..., torch.Tensor] = predict
        if compile is not None:
            fn = torch.compile(fn, mode=compile)
        self.fn = CudaGraphed(fn) if graphs else fn
        self.compiled = compile is not None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> SimpleNamespace:
        if self.compiled:  # compiled CUDA graphs: a new step may overwrite the last outputs
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(_cast(self.dtype)(x), t, **tree_map(_cast(self.dtype), kw))
        return SimpleNamespace(sample=out.float())


class LowPrecisionDecoder:
    """``vae.decode(latents / scaling).sample`` in the VAE's dtype without autocast, optionally
    CUDA-graphed or compiled like ``LowPrecisionUNet``; returns fp32 pixels in [-1, 1]-ish."""

    def __init__(self, vae: torch.nn.Module, *, graphs: bool = False, compile: str | None = None):
        self.dtype = next(vae.parameters()).dtype
        scale = vae.config.scaling_factor

        def decode(z: torch.Tensor) -> torch.Tensor:
            return vae.decode(z / scale).sample

        fn: Callable[[torch.Tensor], torch.Tensor] = decode
        if compile is not None:
            fn = torch.compile(fn, mode=compile)
        self.fn = CudaGraphed(fn) if graphs else fn
        self.compiled = compile is not None

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(latents.to(self.dtype)).float()
