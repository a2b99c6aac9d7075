"""The fast path a serving replica runs: the UNet (and VAE decode) compiled and/or replayed as
CUDA graphs, model calls padded to a few batch sizes ("buckets"), and every (steps, size,
bucket) the replica will serve run once before it reports healthy, so that no user request pays
for compilation or graph capture.

Compiled code and CUDA graphs are specialised to input shapes: a model call's shape is
(batch, channels, height, width) of the latents, so the shapes a replica sees are its sizes x its
batch buckets. Steps do not change shapes (the timestep is a tensor), but each step count is
warmed anyway: what is measured is then exactly what is served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nitro_dist.inference import CudaGraphed, Generator, LowPrecisionDecoder, LowPrecisionUNet

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager/eager: tracing without codegen (CPU)
STEPS = (1, 2, 3, 4)
WARM_PROMPT = "warm-up"


@dataclass(frozen=True)
class FastPath:
    """``compile``: a torch.compile mode, None for eager; ``backend``: torch.compile's backend;
    ``cuda_graphs``: replay CUDA graphs (``CudaGraphed``; needs a CUDA device)."""

    compile: str | None = None
    backend: str = "inductor"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile: {self.compile!r} is not one of off, {COMPILE_MODES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"compile_backend: {self.backend!r} is not one of {BACKENDS}")

    @property
    def on(self) -> bool:
        return self.compile is not None or self.cuda_graphs


def batch_buckets(max_images: int) -> tuple[int, ...]:
    """Model-call batch sizes: 1, 2, 4, ... and ``max_images`` (a call of n images runs at the
    smallest bucket >= n: at most 2x the work, log2 of the shapes to warm)."""
    if max_images < 1:
        raise ValueError(f"max_images: {max_images} must be >= 1")
    out, b = [], 1
    while b < max_images:
        out.append(b)
        b *= 2
    return (*out, max_images)


def accelerate(gen: Generator, fast: FastPath, buckets: tuple[int, ...]) -> None:
    """Put ``gen`` on the fast path: its UNet (and VAE decode) called through the compiled /
    graphed wrappers, every model call padded to one of ``buckets`` (at most the largest)."""
    if fast.cuda_graphs and gen.device.type != "cuda":
        raise ValueError(f"cuda_graphs: CUDA graphs need device=cuda (the device is {gen.device})")
    kw = {"graphs": fast.cuda_graphs, "compile": fast.compile, "backend": fast.backend}
    gen.fast_unet = LowPrecisionUNet(gen.unet, gen.dtype, **kw)  # type: ignore[arg-type]
    if gen.vae is not None:
        gen.fast_decode = LowPrecisionDecoder(gen.vae, **kw)  # type: ignore[arg-type]
    gen.batch_buckets = tuple(sorted(set(buckets)))
    gen.batch_size = gen.batch_buckets[-1]


def compilations(gen: Generator) -> int:
    """Graphs compiled by dynamo in this process plus CUDA graphs captured for ``gen``: a
    request that changes it paid for compilation or capture."""
    from torch._dynamo.utils import counters

    captured = 0
    for wrapper in (gen.fast_unet, gen.fast_decode):
        fn = getattr(wrapper, "fn", None)
        if isinstance(fn, CudaGraphed):
            captured += len(fn.graphs)
    return int(counters["stats"]["unique_graphs"]) + captured


@dataclass
class WarmUp:
    """What ``warm_up`` ran: every (steps, height, width, batch) once, how long it took and how
    many graphs that compiled or captured."""

    runs: list[tuple[int, int, int, int]] = field(default_factory=list)
    seconds: float = 0.0
    compilations: int = 0

    def summary(self) -> dict:
        return {
            "warm_runs": len(self.runs),
            "warm_seconds": round(self.seconds, 2),
            "compilations": self.compilations,
        }


def warm_up(
    gen: Generator, sizes_hw: list[tuple[int, int]], steps: tuple[int, ...] = STEPS
) -> WarmUp:
    """Run every (steps, size, batch bucket) once; without buckets, batch 1 only."""
    before, t0, out = compilations(gen), time.perf_counter(), WarmUp()
    for h, w in sizes_hw:
        for batch in gen.batch_buckets or (1,):
            for k in steps:
                gen([WARM_PROMPT] * batch, list(range(batch)), k, (h, w))
                out.runs.append((k, h, w, batch))
    if gen.device.type == "cuda":
        torch.cuda.synchronize(gen.device)
    out.seconds = time.perf_counter() - t0
    out.compilations = compilations(gen) - before
    return out
