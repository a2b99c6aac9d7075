"""Backbone feature taps: the frozen teacher UNet's down blocks + mid block.

Levels are every skip output of the down path (conv_in's output, each resnet/attention layer and
each downsampler: 9 for SDXL) plus the mid block's output: 10 levels for SDXL. The backbone *is*
the teacher UNet (one copy in memory); only the down path runs.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch.utils.checkpoint import checkpoint

from nitro_dist.models.text import Cond


def backbone_features(
    unet: UNet2DConditionModel,
    x_BCHW: torch.Tensor,
    t_B: torch.Tensor,
    cond: Cond,
    *,
    activation_checkpointing: bool = False,
) -> list[torch.Tensor]:
    """Feature maps (one per level, each B x C_l x H_l x W_l) of noisy samples at timesteps t."""
    kw = cond.unet_kwargs()
    hidden = kw["encoder_hidden_states"]
    t_emb = unet.get_time_embed(sample=x_BCHW, timestep=t_B)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=kw.get("added_cond_kwargs")
    )
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.process_encoder_hidden_states(hidden, kw.get("added_cond_kwargs"))

    def run(block, *args):
        if activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    sample = unet.conv_in(x_BCHW)
    feats = [sample]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = run(
                lambda s, e, h, b=block: b(hidden_states=s, temb=e, encoder_hidden_states=h),
                sample,
                emb,
                hidden,
            )
        else:
            sample, res = run(lambda s, e, b=block: b(hidden_states=s, temb=e), sample, emb)
        feats.extend(res)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = run(
                lambda s, e, h: unet.mid_block(s, e, encoder_hidden_states=h), sample, emb, hidden
            )
        else:
            sample = run(lambda s, e: unet.mid_block(s, e), sample, emb)
        feats.append(sample)
    return feats


@torch.no_grad()
def level_shapes(
    unet: UNet2DConditionModel, sample_shape: tuple[int, int, int], cond: Cond
) -> list[tuple[int, int, int]]:
    """(C, H, W) of every level for one sample of ``sample_shape`` (one probe forward)."""
    x = torch.zeros(1, *sample_shape, device=unet.device, dtype=unet.dtype)
    t = torch.zeros(1, dtype=torch.long, device=unet.device)
    one = cond.index(slice(0, 1)).to(unet.device, unet.dtype)
    return [(f.shape[1], f.shape[2], f.shape[3]) for f in backbone_features(unet, x, t, one)]
