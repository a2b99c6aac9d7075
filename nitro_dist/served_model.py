"""What a generator replica holds per served model, without Ray: the ``models`` and ``sizes``
app arguments parsed, and a checkpoint loaded into a ``Generator`` on the fast path (compiled /
CUDA-graphed, batches padded to buckets) and warmed for every (steps, size, bucket) it serves."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from nitro_dist.fast_path import FastPath, WarmUp, accelerate, batch_buckets, warm_up
from nitro_dist.image_api import Limits
from nitro_dist.inference import Generator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_models(spec: dict[str, str] | str) -> dict[str, str]:
    """``models``: {name: checkpoint}, from a dict (a Serve config file), JSON, or the command
    line's ``name=checkpoint,name=checkpoint``. Order kept: the first is the default model."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"models: not valid JSON ({e})") from None
        else:
            pairs = [p.strip() for p in text.split(",") if p.strip()]
            bad = [p for p in pairs if "=" not in p]
            if bad:
                raise ValueError(
                    f"models: {bad[0]!r} is not NAME=CHECKPOINT (e.g. "
                    "models=digits=runs/digits,big=s3://bucket/runs/big)"
                )
            names = [p.split("=", 1)[0].strip() for p in pairs]
            if len(set(names)) != len(names):
                raise ValueError(f"models: a name is given twice ({', '.join(names)})")
            spec = {p.split("=", 1)[0].strip(): p.split("=", 1)[1].strip() for p in pairs}
    if not isinstance(spec, dict):
        raise ValueError(f"models: expected NAME=CHECKPOINT pairs, got {type(spec).__name__}")
    for name, ckpt in spec.items():
        if not isinstance(name, str) or not name or not isinstance(ckpt, str) or not ckpt:
            raise ValueError(f"models: {name!r}: name and checkpoint must be non-empty strings")
    return dict(spec)


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    """``sizes``: ``"WIDTHxHEIGHT,..."`` (as OpenAI's ``size``) -> [(height, width), ...]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"([0-9]+)x([0-9]+)", part)
        if m is None:
            raise ValueError(f"sizes: {part!r} is not WIDTHxHEIGHT (e.g. sizes=1024x1024,768x1344)")
        out.append((int(m[2]), int(m[1])))
    return out


@dataclass
class ServedModel:
    """One model of a replica: its generator, limits (the sizes it serves) and warm-up."""

    name: str
    checkpoint: str
    gen: Generator
    limits: Limits
    device: str
    dtype: str
    fast: FastPath
    warm: WarmUp | None

    def info(self) -> dict[str, Any]:
        fast = {
            "compile": self.fast.compile or "off",
            "compile_backend": self.fast.backend,
            "cuda_graphs": self.fast.cuda_graphs,
            "batch_buckets": list(self.gen.batch_buckets),
        }
        if self.warm is not None:
            fast.update(self.warm.summary())
        return {
            "model": self.name,
            "checkpoint": self.checkpoint,
            "device": self.device,
            "dtype": self.dtype,
            "limits": self.limits.__dict__,
            "fast_path": fast,
        }


def load_model(
    name: str,
    checkpoint: str,
    *,
    device: str,
    dtype: str,
    use_ema: bool = True,
    fast: FastPath | None = None,
    sizes_hw: list[tuple[int, int]] | None = None,
    max_images_per_call: int = 64,
) -> ServedModel:
    """Load ``checkpoint`` (a local folder) and, on the fast path, compile and warm it for every
    (steps 1-4, size, batch bucket up to ``max_images_per_call``). ``sizes_hw``: the sizes
    served; default every size the limits allow, or on the fast path the training size only."""
    fast = fast or FastPath()
    gen = Generator.from_checkpoint(checkpoint, device=device, use_ema=use_ema, dtype=DTYPES[dtype])
    limits = Limits.of(gen)
    if sizes_hw:
        for h, w in sizes_hw:
            try:
                limits.check_side("height", h)
                limits.check_side("width", w)
            except ValueError as e:
                raise ValueError(f"sizes: {w}x{h} for model {name!r}: {e}") from None
    elif fast.on:
        sizes_hw = [(limits.native, limits.native)]
    if sizes_hw:
        limits = Limits(**{**limits.__dict__, "sizes": tuple(sizes_hw)})
    warm = None
    if fast.on:
        accelerate(gen, fast, batch_buckets(max_images_per_call))
        warm = warm_up(gen, list(limits.sizes))
    return ServedModel(name, checkpoint, gen, limits, device, dtype, fast, warm)
