"""What the image API does, without Ray: the request schema, its limits, batched generation
grouped by (steps, size), and PNG encoding. ``nitro_dist.serve`` puts this behind Ray Serve."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nitro_dist.images import to_pil, to_uint8_hwc
from nitro_dist.inference import Generator

MAX_IMAGES = 8  # per request
MAX_PROMPT_CHARS = 2000  # longer bodies are refused; token truncation happens well before
SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """Sizes the loaded generator accepts, in pixels: multiples of ``multiple`` from
    ``min_side`` to ``max_side`` (half to twice the training size)."""

    native: int
    multiple: int
    min_side: int
    max_side: int
    max_tokens: int
    channels: int

    @classmethod
    def of(cls, gen: Generator) -> Limits:
        native, m = gen.native_size, gen.size_multiple
        return cls(
            native=native,
            multiple=m,
            min_side=max(m, (native // 2) // m * m),
            max_side=native * 2,
            max_tokens=gen.text.max_length,
            channels=gen.sample_shape[0],
        )

    def check_side(self, name: str, value: int | None) -> int:
        if value is None:
            return self.native
        if not self.min_side <= value <= self.max_side or value % self.multiple:
            raise ValueError(
                f"{name}: {value} is not allowed; use a multiple of {self.multiple} from "
                f"{self.min_side} to {self.max_side} (trained at {self.native})"
            )
        return value


StrictInt = Annotated[int, Field(strict=True)]


class ImageRequest(BaseModel):
    """Body of ``POST /v1/images``. Unknown fields are refused (a typo never goes unnoticed)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    steps: StrictInt = Field(default=1, ge=1, le=4)
    seed: StrictInt | None = Field(default=None, ge=0, le=SEED_MAX)
    num_images: StrictInt = Field(default=1, ge=1, le=MAX_IMAGES)
    height: StrictInt | None = None
    width: StrictInt | None = None
    format: Literal["json", "png"] = "json"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty or only spaces")
        return v


@dataclass
class Job:
    """One request as the generator replica sees it; ``num_images`` images from seed, seed+1…"""

    prompt: str
    steps: int
    seed: int
    num_images: int
    height: int
    width: int

    def key(self) -> tuple[int, int, int]:
        return (self.steps, self.height, self.width)


@dataclass
class Result:
    pngs: list[bytes]
    seeds: list[int]
    prompt_tokens: int
    truncated: bool
    batch_images: int = 0  # images in the generator call this job rode in
    meta: dict = field(default_factory=dict)


def encode_png(image_CHW: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(to_uint8_hwc(image_CHW[None])[0]).save(buf, format="PNG")
    return buf.getvalue()


def png_strip(pngs: list[bytes]) -> bytes:
    """Several PNGs side by side in one PNG (the ``format: png`` answer for num_images > 1)."""
    from PIL import Image

    imgs = [Image.open(io.BytesIO(p)) for p in pngs]
    strip = Image.new(imgs[0].mode, (sum(i.width for i in imgs), imgs[0].height))
    x = 0
    for img in imgs:
        strip.paste(img, (x, 0))
        x += img.width
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def run_jobs(gen: Generator, jobs: list[Job]) -> list[Result]:
    """Generate for many requests at once: one generator call per (steps, height, width) group,
    results back in request order. Same seed -> same image, whatever the batch-mates."""
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.key()].append(i)
    results: list[Result | None] = [None] * len(jobs)
    for (steps, h, w), idx in groups.items():
        prompts, seeds = [], []
        for i in idx:
            job = jobs[i]
            prompts += [job.prompt] * job.num_images
            seeds += [job.seed + k for k in range(job.num_images)]
        images = gen(prompts, seeds, steps, (h, w))
        start = 0
        for i in idx:
            job = jobs[i]
            n_tok = gen.prompt_tokens(job.prompt)
            chunk = images[start : start + job.num_images]
            start += job.num_images
            results[i] = Result(
                pngs=[encode_png(im) for im in chunk],
                seeds=seeds[start - job.num_images : start],
                prompt_tokens=n_tok,
                truncated=n_tok > gen.text.max_length,
                batch_images=len(prompts),
            )
    return results  # type: ignore[return-value]
