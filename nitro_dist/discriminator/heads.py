"""Discriminator heads: small conv nets on one backbone feature level.

[Conv 4x4 stride 2 -> GroupNorm -> SiLU] x depth -> Conv 1x1 to one logit channel. Once a map is
down to 1x1 the remaining layers use 3x3 stride-1 convolutions, so tiny feature maps work too.
Three kinds (NitroFusion's multi-scale dual objective):
- global_cond: whole feature map, logits averaged to one score per sample;
- local_cond: a random crop of the feature map, a patch map of logits judged one by one;
- local_uncond: like local_cond, on features from the empty-prompt backbone pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def norm_groups(width: int) -> int:
    """GroupNorm groups of >= 8 channels (at most 32 groups). Groups must span channels: heads
    reach 1x1 maps, where a one-channel group would normalise every value to zero."""
    groups = max(1, min(32, width // 8))
    while width % groups:
        groups -= 1
    return groups


class Head(nn.Module):
    def __init__(self, in_channels: int, in_size: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch, size = in_channels, in_size
        for _ in range(depth):
            if size >= 2:
                layers.append(nn.Conv2d(ch, width, 4, stride=2, padding=1))
                size //= 2
            else:
                layers.append(nn.Conv2d(ch, width, 3, stride=1, padding=1))
            layers += [nn.GroupNorm(norm_groups(width), width), nn.SiLU()]
            ch = width
        layers.append(nn.Conv2d(ch, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, feats_BCHW: torch.Tensor) -> torch.Tensor:
        """Logit map B x 1 x h x w."""
        return self.net(feats_BCHW)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Fresh weights drawn from ``generator`` (PyTorch's default conv init, made keyed).

        Drawn on the CPU and copied, so a head gets the same weights on any device."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                assert m.bias is not None  # the heads' convs have biases
                w = torch.empty(m.weight.shape)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(m.weight[0].numel())
                b = torch.empty(m.bias.shape).uniform_(-bound, bound, generator=generator)
                m.weight.copy_(w)
                m.bias.copy_(b)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def crop_size(map_size: int, crop_frac: float) -> int:
    return max(1, round(map_size * crop_frac))


def crop(feats_BCHW: torch.Tensor, size: int, top: int, left: int) -> torch.Tensor:
    return feats_BCHW[:, :, top : top + size, left : left + size]


def head_scores(head: Head, feats_BCHW: torch.Tensor, kind: str) -> torch.Tensor:
    """Scores judged one by one: B x 1 for global heads, B x P (patches) for local heads.

    Local heads get an already cropped map (the caller picks the crop so real and fake share it).
    """
    logits = head(feats_BCHW).flatten(1)
    if kind == "global_cond":
        return logits.mean(dim=1, keepdim=True)
    return logits
