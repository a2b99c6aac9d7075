"""Tiny SDXL models as users hold real ones: a single-file checkpoint (original key layout), the
diffusers config folder that describes it, bare UNet state dicts (tests import this module)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from nitro_dist.models import single_file, tiny
from nitro_dist.models.builders import Models, build_sdxl_from_configs

# The tiny stand-in with text encoder 2 wider than encoder 1 (48 vs 32), as in SDXL (1280 vs
# 768): diffusers' pipeline-level single-file loader tells the encoders apart by width.
WIDE_TEXT = [
    tiny.TINY_SDXL_TEXT_ENCODERS[0],
    {**tiny.TINY_SDXL_TEXT_ENCODERS[1], "hidden_size": 48},
]
WIDE_TEXT[1]["projection_dim"] = 48
WIDE_UNET = {
    **tiny.TINY_SDXL_UNET,
    "cross_attention_dim": 32 + 48,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,
}


def sdxl_pipeline(m: Models, scheduler):
    """diffusers' own SDXL pipeline of ``m`` (with its VAE): G as the UNet."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=m.vae,
        text_encoder=m.text.encoders[0],
        text_encoder_2=m.text.encoders[1],
        tokenizer=m.text.tokenizers[0],
        tokenizer_2=m.text.tokenizers[1],
        unet=m.student,
        scheduler=scheduler,
    )


def wide_sdxl(seed: int = 0) -> Models:
    return build_sdxl_from_configs(WIDE_UNET, WIDE_TEXT, tiny.TINY_VAE, seed)


def perturbed(unet: UNet2DConditionModel, seed: int, scale: float = 0.01) -> UNet2DConditionModel:
    """A copy of ``unet`` with every weight moved by seeded noise (a "fine-tune")."""
    out = UNet2DConditionModel.from_config(unet.config)
    g = torch.Generator().manual_seed(seed)
    out.load_state_dict(
        {k: v + scale * torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()}
    )
    return out


def write_configs(m: Models, root: Path, schedule: dict | None = None) -> Path:
    """The diffusers config folder of ``m`` (configs and tokenizers, no weights)."""
    m.teacher.save_config(root / "unet")
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        m.text.encoders[i].config.save_pretrained(root / name)
        m.text.tokenizers[i].save_pretrained(root / name.replace("text_encoder", "tokenizer"))
    if m.vae is not None:
        m.vae.save_config(root / "vae")
    DDPMScheduler.from_config(schedule or tiny.SDXL_SCHEDULE).save_pretrained(root / "scheduler")
    return root


def write_single_file(m: Models, path: Path, unet: UNet2DConditionModel | None = None) -> Path:
    """``m`` (its teacher UNet, or ``unet``) as a single-file SDXL checkpoint."""
    unet = unet if unet is not None else m.teacher
    enc = m.text.encoders
    sd = single_file.single_file_state_dict(
        unet.state_dict(),
        dict(unet.config),
        (enc[0].state_dict(), enc[1].state_dict()),
        None if m.vae is None else m.vae.state_dict(),
        None if m.vae is None else dict(m.vae.config),
    )
    save_file(sd, str(path))
    return path


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))[:5]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
