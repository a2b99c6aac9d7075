"""Images out: [-1, 1] tensors -> PNG files, grids and sample grids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nitro_dist.tasks import EVAL_SEED_OFFSET


def to_uint8_hwc(images_NCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 N x H x W x C; 1 channel stays grey, 3 are RGB, others show the first 3."""
    x = images_NCHW.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x[:, :3]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(image_HWC: np.ndarray, scale: int = 1) -> Image.Image:
    img = Image.fromarray(image_HWC[..., 0] if image_HWC.shape[-1] == 1 else image_HWC)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def save_grid(
    images_NCHW: torch.Tensor, nrow: int, path: str | Path, scale: int = 1, pad: int = 1
) -> Path:
    """A grid with ``nrow`` images per row, ``pad`` pixels of black between them."""
    arr = to_uint8_hwc(images_NCHW)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(canvas, scale).save(path)
    return path


def save_sample_grids(
    generate: Callable[[list[str], list[int], int], torch.Tensor],
    prompts: list[str],
    per_prompt: int,
    folder: Path,
    tag: str,
    steps: tuple[int, ...] = (1, 2, 4),
) -> list[Path]:
    """``{tag}_{k}step.png`` for each step count: one row per prompt, ``per_prompt`` seeds each
    (the evaluation seed range, the same seeds at every step count)."""
    rows = [p for p in prompts for _ in range(per_prompt)]
    seeds = [EVAL_SEED_OFFSET + i for i in range(len(rows))]
    paths = []
    for k in steps:
        imgs = generate(rows, seeds, k)
        scale = max(1, 64 // imgs.shape[-1])
        paths.append(save_grid(imgs, per_prompt, folder / f"{tag}_{k}step.png", scale=scale))
    return paths
