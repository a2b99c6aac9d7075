"""Weights in the forms users hold them: a single-file SDXL teacher (configs from a local folder),
a student as a UNet folder, a single file or a bare state dict; and the errors for files that do
not fit."""

import pytest
import torch
from safetensors.torch import save_file
from sdxl_files import assert_same_weights, perturbed, write_configs, write_single_file

from nitro_dist.config import load_config
from nitro_dist.models import single_file, tiny
from nitro_dist.models.builders import (
    build_sdxl_from_configs,
    build_tiny_sdxl,
    load_diffusers_folder,
    unet_weights,
)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL as a single file + its config folder (scheduler with its own beta_end)."""
    root = tmp_path_factory.mktemp("sdxl")
    m = build_tiny_sdxl(0, with_vae=True)
    configs = write_configs(m, root / "configs", {**tiny.SDXL_SCHEDULE, "beta_end": 0.02})
    return m, write_single_file(m, root / "sdxl.safetensors"), configs


def test_single_file_teacher_loads_exactly(sdxl):
    m, path, configs = sdxl
    got = load_diffusers_folder(path, use_vae=True, config_path=str(configs))
    assert_same_weights(got.teacher, m.teacher)
    assert_same_weights(got.student, m.teacher)  # no student_path: a copy of the teacher
    assert_same_weights(got.vae, m.vae)
    for a, b in zip(got.text.encoders, m.text.encoders, strict=True):
        assert_same_weights(a, b)
    assert got.schedule["beta_end"] == 0.02  # the config folder's scheduler
    a, b = got.text.encode(["a red cube"]), m.text.encode(["a red cube"])
    assert torch.equal(a.hidden_BLD, b.hidden_BLD) and torch.equal(a.pooled_BD, b.pooled_BD)
    assert got.text.tokenizers[1].pad_token == "!"
    assert not any(p.requires_grad for p in got.teacher.parameters())
    assert all(p.requires_grad for p in got.student.parameters())


def test_single_file_teacher_needs_config_path(sdxl, tmp_path):
    _, path, configs = sdxl
    with pytest.raises(ValueError, match="model.config_path: required"):
        load_diffusers_folder(path)
    with pytest.raises(ValueError, match="model.config_path: no unet/config.json"):
        load_diffusers_folder(path, config_path=str(tmp_path))
    with pytest.raises(ValueError, match="model.config_path: required when"):
        load_config("tiny", ["model.source=diffusers", f"model.teacher_path={path}"])
    with pytest.raises(ValueError, match="model.config_path: only read when"):
        load_config("tiny", [f"model.config_path={configs}"])
    cfg = load_config(
        "tiny",
        ["model.source=diffusers", f"model.teacher_path={path}", f"model.config_path={configs}"],
    )
    assert cfg.model.config_path == str(configs)


@pytest.mark.parametrize("form", ["folder", "single_file", "original_unet", "diffusers_unet"])
def test_student_in_every_form(sdxl, tmp_path, form):
    m, teacher_file, configs = sdxl
    student = perturbed(m.teacher, seed=1)
    if form == "folder":
        student.save_pretrained(tmp_path / "student")
        path = tmp_path / "student"
    elif form == "single_file":
        path = write_single_file(m, tmp_path / "student.safetensors", student)
    else:
        sd = student.state_dict()
        if form == "original_unet":  # a UNet-only file in the original layout, no prefix
            sd = single_file.unet_to_original(sd, student.config)
        path = tmp_path / "student.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        assert single_file.unet_form(sd) == form
    got = load_diffusers_folder(teacher_file, str(path), config_path=str(configs))
    assert_same_weights(got.student, student)
    assert_same_weights(got.teacher, m.teacher)
    assert got.student.dtype == torch.float32 and got.student.training


def test_student_state_dict_into_a_folder_teachers_unet(tmp_path):
    """The NitroFusion recipe: a bare state dict into a UNet built from the teacher's config."""
    from test_models import write_sdxl_folder

    m = write_sdxl_folder(tmp_path / "sdxl")
    student = perturbed(m.teacher, seed=2)
    save_file(student.state_dict(), str(tmp_path / "nitro_unet.safetensors"))
    got = load_diffusers_folder(tmp_path / "sdxl", str(tmp_path / "nitro_unet.safetensors"))
    assert_same_weights(got.student, student)


def _error(tmp_path, sd, *, teacher=None, configs=None):
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ValueError) as e:
        if teacher is None:
            load_diffusers_folder(path, config_path=str(configs))
        else:
            load_diffusers_folder(teacher, str(path), config_path=str(configs))
    assert str(path) in str(e.value)
    return str(e.value)


def test_sd15_single_file_is_refused_with_the_keys_that_differ(sdxl, tmp_path):
    m, path, configs = sdxl
    # an SD 1.x-style model: no text_time conditioning, one text encoder (cond_stage_model.*)
    unet_cfg = {k: v for k, v in tiny.TINY_SDXL_UNET.items() if "addition" not in k}
    unet_cfg.pop("projection_class_embeddings_input_dim")
    sd15 = build_sdxl_from_configs(
        {**unet_cfg, "cross_attention_dim": 32}, tiny.TINY_SDXL_TEXT_ENCODERS, None
    )
    sd = {
        single_file.UNET_PREFIX + k: v
        for k, v in single_file.unet_to_original(sd15.teacher.state_dict(), unet_cfg).items()
    }
    sd |= {
        f"cond_stage_model.transformer.{k}": v
        for k, v in single_file.clip_to_original(sd15.text.encoders[0].state_dict()).items()
    }
    msg = _error(tmp_path, sd, configs=configs)
    assert "4 missing keys (model.diffusion_model.label_emb.0.0.bias" in msg
    assert "shape mismatches" in msg and "attn2.to_k.weight: file (32, 32) vs model (32, 64)" in msg
    assert "Stable Diffusion 1.x/2.x" in msg
    # the same as a student: checked against the teacher's UNet
    msg = _error(tmp_path, sd, teacher=path, configs=configs)
    assert msg.startswith("model.student_path") and "4 missing keys" in msg


def test_unet_of_other_shapes_is_refused(sdxl, tmp_path):
    m, path, configs = sdxl
    wider = build_sdxl_from_configs(
        {**tiny.TINY_SDXL_UNET, "block_out_channels": [16, 32, 48]},
        tiny.TINY_SDXL_TEXT_ENCODERS,
        None,
    )
    msg = _error(tmp_path, wider.teacher.state_dict(), teacher=path, configs=configs)
    assert "model.student_path" in msg and "does not match the UNet config" in msg
    assert "236 shape mismatches (" in msg and "file (48,) vs model (32,)" in msg
    assert "2 unexpected keys (down_blocks.2.resnets.0.conv_shortcut.bias" in msg
    assert "missing" not in msg


def test_state_dict_with_missing_and_unexpected_keys(sdxl, tmp_path):
    m, path, configs = sdxl
    sd = dict(m.teacher.state_dict())
    removed = sorted(sd)[:7]
    for k in removed:
        del sd[k]
    sd["extra.weight"] = torch.zeros(1)
    msg = _error(tmp_path, sd, teacher=path, configs=configs)
    assert "7 missing keys (" in msg and "... (7 in all)" in msg
    assert all(k in msg for k in removed[:5]) and removed[5] not in msg  # at most 5 named
    assert "1 unexpected keys (extra.weight)" in msg


def test_single_file_without_text_encoders_is_refused(sdxl, tmp_path):
    m, _, configs = sdxl
    sd = single_file.single_file_state_dict(m.teacher.state_dict(), dict(m.teacher.config))
    msg = _error(tmp_path, sd, configs=configs)
    assert "text_encoder (conditioner.embedders.0.transformer.*)" in msg and "missing keys" in msg


def test_files_that_are_not_unet_weights(sdxl, tmp_path):
    m, path, configs = sdxl
    msg = _error(tmp_path, {"foo.weight": torch.zeros(2)}, teacher=path, configs=configs)
    assert "holds no UNet weights" in msg and "foo.weight" in msg
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"model.student_path: .*model.ckpt is not a .safetensors"):
        load_diffusers_folder(path, str(tmp_path / "model.ckpt"), config_path=str(configs))
    with pytest.raises(
        ValueError, match="model.student_path: .*nothing.safetensors does not exist"
    ):
        load_diffusers_folder(path, str(tmp_path / "nothing.safetensors"), config_path=str(configs))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="cannot read .*broken.safetensors as safetensors"):
        unet_weights(tmp_path / "broken.safetensors", m.teacher.config, "--custom")
