"""The exported generator runs in a stock diffusers SDXL pipeline with NitroLCMScheduler and
gives what the project's own sampler gives (the three lines in the README)."""

import torch
from diffusers import UNet2DConditionModel
from sdxl_files import sdxl_pipeline

from nitro_dist.diffusion import NitroLCMScheduler, StudentDenoiser
from nitro_dist.models.builders import build_tiny_sdxl


def test_stock_sdxl_pipeline_matches_student_sampler(tmp_path):
    m = build_tiny_sdxl(0, with_vae=True)
    # a checkpoint's two inference folders, as training writes them (safetensors + configs)
    m.student.save_pretrained(tmp_path / "generator", safe_serialization=True)
    NitroLCMScheduler(shift=250).save_pretrained(tmp_path / "scheduler")
    assert not list(tmp_path.rglob("*.bin"))  # no pickle anywhere
    pipe = sdxl_pipeline(m, NitroLCMScheduler())  # both replaced below, from the saved folders
    # the README's three lines
    pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path / "generator", use_safetensors=True)
    pipe.scheduler = NitroLCMScheduler.from_pretrained(tmp_path / "scheduler")
    side = m.student.config.sample_size * pipe.vae_scale_factor
    denoiser = StudentDenoiser(m.schedule, shift=250)
    cond = m.text.encode(["a red cube"], (side, side))
    for steps in (1, 4):
        latents = pipe(
            "a red cube",
            num_inference_steps=steps,
            guidance_scale=0.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(7),
        ).images
        g = torch.Generator().manual_seed(7)
        x_T = torch.randn((1, *m.sample_shape), generator=g)
        ours = denoiser.sample(
            m.student,
            x_T,
            cond,
            steps,
            noise_fn=lambda k, g=g: torch.randn((1, *m.sample_shape), generator=g),
        )
        torch.testing.assert_close(latents, ours, rtol=0, atol=1e-4)
