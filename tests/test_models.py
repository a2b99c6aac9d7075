"""Building models from a diffusers folder on disk (what real SDXL/DMD2 weights look like)."""

import pytest
import torch
from diffusers import DDPMScheduler

from nitro_dist.build import build_run
from nitro_dist.models import tiny
from nitro_dist.models.builders import build_tiny_sdxl, load_diffusers_folder
from nitro_dist.models.tokenizer import clip_tokenizer
from nitro_dist.step import train_step


def write_sdxl_folder(root):
    m = build_tiny_sdxl(0, with_vae=True)
    m.teacher.save_pretrained(root / "unet")
    m.text.encoders[0].save_pretrained(root / "text_encoder")
    m.text.encoders[1].save_pretrained(root / "text_encoder_2")
    m.text.tokenizers[0].save_pretrained(root / "tokenizer")
    m.text.tokenizers[1].save_pretrained(root / "tokenizer_2")
    m.vae.save_pretrained(root / "vae")
    DDPMScheduler.from_config(tiny.SDXL_SCHEDULE).save_pretrained(root / "scheduler")
    return m


def test_sdxl_folder_loads_with_both_encoders_and_vae(tmp_path):
    ref = write_sdxl_folder(tmp_path)
    m = load_diffusers_folder(tmp_path, use_vae=True)
    assert m.sdxl and m.vae is not None
    assert m.text.tokenizers[1].pad_token == "!"
    a = m.text.encode(["a red cube"], (128, 128))
    b = ref.text.encode(["a red cube"], (128, 128))
    assert torch.allclose(a.hidden_BLD, b.hidden_BLD) and torch.allclose(a.pooled_BD, b.pooled_BD)
    # the student is a trainable copy, the teacher frozen
    assert all(p.requires_grad for p in m.student.parameters())
    assert not any(p.requires_grad for p in m.teacher.parameters())


@pytest.mark.slow
def test_train_and_generate_from_a_diffusers_folder_with_vae(tmp_path, tiny_cfg):
    write_sdxl_folder(tmp_path / "model")
    cfg = tiny_cfg(
        "model.source=diffusers", f"model.teacher_path={tmp_path / 'model'}", "model.use_vae=true"
    )
    run = build_run(cfg, progress=False)
    train_step(run, 0)
    images = run.generator(run.models.student)(["a red cube"], [0], 2)
    assert images.shape == (1, 3, 32, 32)  # decoded by the VAE (factor 2 on 16x16 latents)
    assert images.abs().max() <= 1


def test_offline_tokenizer_matches_clip_ids():
    tok = clip_tokenizer()
    # ids of openai/clip-vit-large-patch14 for this prompt
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
