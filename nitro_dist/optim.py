"""The one AdamW every trainable part uses (G on one process, G under DeepSpeed, the heads)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], section) -> torch.optim.AdamW:
    """AdamW from a config section with ``lr``, ``betas``, ``weight_decay`` and ``fused``
    (``OptimConfig`` for G, ``PoolConfig`` for the heads). ``fused`` off leaves torch choosing
    the implementation (foreach on GPU); on, one kernel with no full-size temporaries."""
    return torch.optim.AdamW(
        params,
        lr=section.lr,
        betas=tuple(section.betas),
        weight_decay=section.weight_decay,
        fused=section.fused or None,
    )
