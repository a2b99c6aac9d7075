"""Prompt conditioning: tokenizers + frozen text encoders -> UNet keyword arguments.

Two layouts are supported, picked by what the UNet expects:
- single encoder (SD 1.x style, the digits task): ``encoder_hidden_states`` = last hidden state;
- SDXL: two encoders, ``encoder_hidden_states`` = concat of both penultimate hidden states,
  ``added_cond_kwargs`` = {"text_embeds": encoder 2's pooled projection, "time_ids": size ids}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn


@dataclass
class Cond:
    """Per-sample UNet conditioning; every tensor has the batch as dim 0."""

    hidden_BLD: torch.Tensor
    pooled_BD: torch.Tensor | None = None  # SDXL only
    time_ids_B6: torch.Tensor | None = None  # SDXL only

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.hidden_BLD}
        if self.pooled_BD is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_BD,
                "time_ids": self.time_ids_B6,
            }
        return kwargs

    def _map(self, fn) -> Cond:
        return Cond(
            fn(self.hidden_BLD),
            None if self.pooled_BD is None else fn(self.pooled_BD),
            None if self.time_ids_B6 is None else fn(self.time_ids_B6),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        return self._map(
            lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        )

    def index(self, idx) -> Cond:
        return self._map(lambda t: t[idx])

    def detach(self) -> Cond:
        return self._map(lambda t: t.detach())

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        first = conds[0]
        return Cond(
            torch.cat([c.hidden_BLD for c in conds]),
            None if first.pooled_BD is None else _cat([c.pooled_BD for c in conds]),
            None if first.time_ids_B6 is None else _cat([c.time_ids_B6 for c in conds]),
        )


def _cat(ts: list[torch.Tensor | None]) -> torch.Tensor:
    """``torch.cat`` of tensors that are all there: the conds of one batch share one layout
    (all carry the SDXL tensors, or none does)."""
    return torch.cat(cast("list[torch.Tensor]", ts))


class TextConditioner(nn.Module):
    """Frozen text encoders with their tokenizers. ``encode`` never builds a graph."""

    def __init__(self, tokenizers: list, encoders: list[nn.Module], *, sdxl: bool) -> None:
        super().__init__()
        if sdxl and len(encoders) != 2:
            raise ValueError(f"SDXL conditioning needs two text encoders, got {len(encoders)}")
        self.tokenizers = tokenizers
        self.encoders = nn.ModuleList(encoders)
        self.sdxl = sdxl
        self.requires_grad_(False)
        self.eval()

    @property
    def max_length(self) -> int:
        return min(t.model_max_length for t in self.tokenizers)

    @torch.no_grad()
    def encode(self, prompts: list[str], image_hw: tuple[int, int] = (1024, 1024)) -> Cond:
        device = next(self.encoders.parameters()).device
        hiddens, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders, strict=True):
            ids = tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            if self.sdxl:
                hiddens.append(out.hidden_states[-2])
                pooled = out[0]  # encoder 2 (with projection) comes last: its text_embeds
            else:
                hiddens.append(out.last_hidden_state)
        hidden = torch.cat(hiddens, dim=-1)
        if not self.sdxl:
            return Cond(hidden)
        h, w = image_hw
        # SDXL micro-conditioning: (original size, crop top-left, target size), no cropping
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=device)
        return Cond(hidden, pooled, time_ids.repeat(len(prompts), 1))
