"""Comparing two trainings whose only difference is floating-point summation order."""

from __future__ import annotations

import torch

# AdamW's update of an element is lr * m / (sqrt(v) + eps): for a gradient near zero (|g| ~ eps)
# a last-bit difference in g moves the update by up to lr, so such elements may differ by that
# much per step whatever the tolerance of the rest; they must stay rare
RARE = 1e-3  # at most this fraction of a tensor's elements


def assert_adamw_close(
    a: torch.Tensor, b: torch.Tensor, atol: float, lr: float, steps: int, msg=""
):
    """Every element within ``atol``, except at most a fraction ``RARE`` of them, and those
    within ``lr * steps`` (the most ``steps`` AdamW steps can move an element)."""
    d = (a.detach() - b.detach()).abs()
    far = int((d > atol).sum())
    assert far <= RARE * d.numel(), f"{msg}: {far} of {d.numel()} elements differ by > {atol}"
    worst = float(d.max()) if d.numel() else 0.0
    assert worst <= lr * steps, f"{msg}: {worst:.3g} > {steps} AdamW steps of lr {lr}"
