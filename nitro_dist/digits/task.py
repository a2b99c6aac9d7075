"""The built-in digits task: ten prompts, the shipped 8x8 teacher, FID-digits and alignment.

Registered as the ``digits`` entry point of ``nitro_dist.tasks`` (pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nitro_dist.digits.data import PROMPTS

if TYPE_CHECKING:
    from nitro_dist.digits.metric import DigitsEvaluator

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
IMAGE_SHAPE = (1, 8, 8)  # what the metric network reads


class DigitsTask:
    name = "digits"

    def __init__(self, sample_prompts: Sequence[str] = ()) -> None:
        self.prompts = list(sample_prompts) or list(PROMPTS)
        self._evaluator: DigitsEvaluator | None = None

    def model_dir(self) -> Path:
        if not (WEIGHTS_DIR / "unet" / "config.json").exists():
            raise ValueError(
                f"the digits teacher weights are missing from {WEIGHTS_DIR}; "
                "train them with `python -m nitro_dist.digits.teacher`"
            )
        return WEIGHTS_DIR

    def train_prompts(self, n: int) -> list[str]:
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    def sample_prompts(self) -> list[str]:
        return self.prompts

    def eval_prompts(self, n: int) -> list[str]:
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """FID-digits and prompt alignment; none for images the metric network cannot read (a
        digits-prompted model of another shape, e.g. the tiny SDXL stand-in)."""
        if tuple(images.shape[1:]) != IMAGE_SHAPE or any(p not in PROMPTS for p in prompts):
            return {}
        if self._evaluator is None:
            from nitro_dist.digits.metric import DigitsEvaluator

            self._evaluator = DigitsEvaluator()
        labels = torch.tensor([PROMPTS.index(p) for p in prompts])
        res = self._evaluator.evaluate(images, labels)
        return {"fid_digits": res["fid_digits"], "alignment": res["alignment"]}
