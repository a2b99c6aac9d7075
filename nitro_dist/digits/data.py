"""Digits data: images in [-1, 1] with prompts "a handwritten digit zero" ... "nine"."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a handwritten digit {name}" for name in DIGIT_NAMES)


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_dataset(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images_N1HW in [-1, 1], labels_N)."""
    images, labels = _load()
    x = torch.from_numpy(images / 16.0 * 2.0 - 1.0).unsqueeze(1)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1), torch.from_numpy(labels)
