"""Adversarial losses over the active heads' scores.

Each element of a score tensor is one judgement (a sample for global heads, a patch for local
heads); a head's loss is the mean over its judgements and the pool's loss the mean over heads.

Hinge (Lim & Ye 2017; as in NitroFusion):
    L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))],    L_G = -E[D(fake)]
Non-saturating (Goodfellow et al. 2014):
    L_D = E[softplus(-D(real))] + E[softplus(D(fake))],   L_G = E[softplus(-D(fake))]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss_head(real: torch.Tensor, fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "non_saturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"loss.type: {kind!r} is not hinge or non_saturating")


def g_loss_head(fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"loss.type: {kind!r} is not hinge or non_saturating")


def d_loss(
    reals: list[torch.Tensor],
    fakes: list[torch.Tensor],
    kind: str = "hinge",
    weights: list[float] | None = None,
    num_heads: int | None = None,
) -> torch.Tensor:
    """Mean over active heads of each head's discriminator loss (``mean_over_heads``)."""
    losses = [d_loss_head(r, f, kind) for r, f in zip(reals, fakes, strict=True)]
    return mean_over_heads(losses, weights, num_heads)


def g_loss(
    fakes: list[torch.Tensor],
    kind: str = "hinge",
    weights: list[float] | None = None,
    num_heads: int | None = None,
) -> torch.Tensor:
    """Mean over active heads of each head's generator loss (``mean_over_heads``)."""
    return mean_over_heads([g_loss_head(f, kind) for f in fakes], weights, num_heads)


def mean_over_heads(
    losses: list[torch.Tensor], weights: list[float] | None, num_heads: int | None
) -> torch.Tensor:
    """The plain mean, or with a t* bucket per sample (``step.judge``) sum(weight x loss) over
    the heads that judged samples here, divided by all ``num_heads`` active heads."""
    if weights is None:
        return torch.stack(losses).mean()
    assert num_heads is not None and len(weights) == len(losses)
    return torch.stack([w * x for w, x in zip(weights, losses, strict=True)]).sum() / num_heads


@torch.no_grad()
def d_accuracy(reals: list[torch.Tensor], fakes: list[torch.Tensor]) -> tuple[float, float]:
    """Share of judgements right on real (> 0) and on fake (< 0), over all active heads."""
    r = torch.cat([x.flatten() for x in reals])
    f = torch.cat([x.flatten() for x in fakes])
    return (r > 0).float().mean().item(), (f < 0).float().mean().item()
