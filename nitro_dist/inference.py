"""Load a trained generator from a checkpoint and make images (1-4 steps, same weights).

The same ``StudentDenoiser`` as training, configured from the checkpoint's ``scheduler/``
(NitroLCMScheduler config: noise schedule + shift), weights from ``generator/`` (safetensors).
Used by ``nitro_dist.sample``, ``nitro_dist.eval`` and the Ray Serve app (``nitro_dist.serve``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from nitro_dist import checkpoint as ckpt
from nitro_dist.config import Config, load_config
from nitro_dist.models.builders import DIGITS_DIR, build_tiny_sdxl, load_text
from nitro_dist.models.text import TextConditioner
from nitro_dist.sampling import NitroLCMScheduler, StudentDenoiser, seeded_noise


class Generator:
    def __init__(
        self,
        unet: UNet2DConditionModel,
        text: TextConditioner,
        scheduler: NitroLCMScheduler,
        vae: AutoencoderKL | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        # diffusers warns on any .to(dtype=...): pass a dtype only when it changes one
        cast_to = {} if dtype == torch.float32 else {"dtype": dtype}
        cast = lambda m: m.to(self.device, **cast_to)
        self.unet = cast(unet).eval().requires_grad_(False)
        self.text = text.to(self.device)  # text encoders stay fp32: small, and tokens matter
        self.vae = cast(vae).eval() if vae is not None else None
        c = scheduler.config
        self.denoiser = StudentDenoiser(
            dict(c), shift=c.shift, original_steps=c.original_inference_steps
        )
        size = self.unet.config.sample_size
        self.sample_shape = (self.unet.config.in_channels, size, size)
        # pixels per latent cell, and the latent multiple the UNet's downsampling needs
        self.vae_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side in pixels the generator was trained at."""
        return self.sample_shape[-1] * self.vae_factor

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes in the text encoder (with its start/end tokens)."""
        return max(len(t(prompt, truncation=False).input_ids) for t in self.text.tokenizers)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "cpu",
        use_ema: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Generator:
        path = ckpt.resolve(path)
        cfg = (
            load_config(str(path / "config.yaml")) if (path / "config.yaml").exists() else Config()
        )
        sub = "generator_ema" if use_ema and (path / "generator_ema").exists() else "generator"
        unet = UNet2DConditionModel.from_pretrained(path / sub, use_safetensors=True)
        scheduler = NitroLCMScheduler.from_pretrained(path / "scheduler")
        text, vae = _text_and_vae(cfg)
        return cls(unet, text, scheduler, vae, device, dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 1,
        size_hw: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], N x C x H x W on CPU; the same (prompt, seed, steps, size) gives
        the same pixels whatever else is in the batch (per-sample noise from the seed).
        ``size_hw`` in pixels, multiples of ``size_multiple``; default the native size."""
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        c = self.sample_shape[0]
        h, w = size_hw or (self.native_size, self.native_size)
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"size {h}x{w}: height and width must be multiples of {self.size_multiple}"
            )
        shape = (c, h // self.vae_factor, w // self.vae_factor)
        # SDXL's size micro-conditioning takes pixels; the digits UNet ignores it
        cond = self.text.encode(prompts, (h, w)).to(self.device, self.dtype)
        x_T = seeded_noise(seeds, shape).to(self.device, self.dtype)
        x0 = self.denoiser.sample(
            self.unet,
            x_T,
            cond,
            steps,
            noise_fn=lambda k: seeded_noise(seeds, shape, step=k).to(self.device, self.dtype),
        )
        if self.vae is not None:
            x0 = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return x0.float().clamp(-1, 1).cpu()


def _text_and_vae(cfg: Config) -> tuple[TextConditioner, AutoencoderKL | None]:
    m = cfg.model
    if m.source == "tiny_sdxl":
        tiny = build_tiny_sdxl(cfg.seed, with_vae=m.use_vae)
        return tiny.text, tiny.vae
    root = DIGITS_DIR if m.source == "digits" else Path(m.teacher_path)
    unet_cfg = UNet2DConditionModel.load_config(root / "unet")
    text = load_text(root, sdxl=unet_cfg.get("addition_embed_type") == "text_time")
    vae = None
    if m.use_vae:
        vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True).eval()
    return text, vae
