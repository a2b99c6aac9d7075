"""Build student, teacher, text conditioning and VAE from a diffusers folder, a single file, or a
tiny config.

A "diffusers folder" is the layout of a diffusers pipeline: ``unet/``, ``text_encoder/``
(+ ``text_encoder_2/`` for SDXL), optional ``tokenizer/``/``tokenizer_2/``, ``scheduler/``,
optional ``vae/``. The teacher may instead be a single-file SDXL checkpoint (original key layout)
whose configs come from such a folder (``model.config_path``, weights not needed there); the
student may be a UNet folder, a single-file checkpoint, or a bare UNet state dict (see
``single_file``). Only local paths and safetensors are read: nothing is fetched from a hub.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from nitro_dist.models import single_file, tiny
from nitro_dist.models.text import TextConditioner
from nitro_dist.models.tokenizer import clip_tokenizer


@dataclass
class Models:
    teacher: UNet2DConditionModel  # frozen; its down blocks + mid are the discriminator backbone
    student: UNet2DConditionModel
    text: TextConditioner
    schedule: dict[str, Any]  # the teacher's diffusers scheduler config (noise schedule)
    vae: AutoencoderKL | None
    sample_shape: tuple[int, int, int]  # (C, H, W) of what the UNet denoises

    @property
    def sdxl(self) -> bool:
        return self.text.sdxl


M = TypeVar("M", bound=torch.nn.Module)


def freeze(module: M) -> M:
    module.requires_grad_(False)
    module.eval()
    return module


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"{what}: {path} is not a directory")
    return path


def load_unet(path: str | Path) -> UNet2DConditionModel:
    """A UNet folder (config.json + safetensors) or a pipeline folder with ``unet/``."""
    p = Path(path)
    if (p / "unet" / "config.json").exists():
        p = p / "unet"
    if not (p / "config.json").exists():
        raise ValueError(f"model.student_path/teacher_path: no UNet config.json under {path}")
    return UNet2DConditionModel.from_pretrained(p, use_safetensors=True)


def _load_tokenizer(folder: Path, *, pad_token: str, max_length: int) -> CLIPTokenizer:
    if (folder / "vocab.json").exists() or (folder / "tokenizer.json").exists():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return clip_tokenizer(model_max_length=max_length, pad_token=pad_token)


def _tokenizers(root: Path, encoders: list[Any], *, sdxl: bool) -> list[CLIPTokenizer]:
    return [
        _load_tokenizer(
            root / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}"),
            pad_token="!" if (sdxl and i == 1) else "<|endoftext|>",
            max_length=enc.config.max_position_embeddings,
        )
        for i, enc in enumerate(encoders)
    ]


def load_text(root: Path, *, sdxl: bool) -> TextConditioner:
    enc_dirs = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    encoders = []
    for i, name in enumerate(enc_dirs):
        folder = _require_dir(root / name, f"text encoder {name}")
        cls = CLIPTextModelWithProjection if (sdxl and i == 1) else CLIPTextModel
        enc = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        encoders.append(freeze(enc))
    return TextConditioner(_tokenizers(root, encoders, sdxl=sdxl), encoders, sdxl=sdxl)


def load_schedule(root: Path) -> dict[str, Any]:
    cfg_path = root / "scheduler" / "scheduler_config.json"
    if not cfg_path.exists():
        return dict(tiny.SDXL_SCHEDULE)
    return json.loads(cfg_path.read_text())


def _unet_sample_shape(
    unet: UNet2DConditionModel, vae: AutoencoderKL | None
) -> tuple[int, int, int]:
    size = unet.config.sample_size
    return (unet.config.in_channels, size, size)


def is_single_file(path: str | Path) -> bool:
    """A path to one weights file (as opposed to a diffusers folder)."""
    return str(path).endswith(".safetensors") or Path(path).is_file()


def single_file_configs(teacher_path: str | Path, config_path: str | Path | None) -> Path:
    """The local diffusers folder whose configs describe the single file ``teacher_path``."""
    if not config_path:
        raise ValueError(
            f"model.config_path: required when model.teacher_path is a single file "
            f"({teacher_path}): a folder with the diffusers configs (unet/config.json, "
            f"text_encoder/ and text_encoder_2/ config.json, tokenizer/, tokenizer_2/, scheduler/, "
            f"vae/config.json), e.g. stable-diffusion-xl-base-1.0 without its weights"
        )
    root = _require_dir(Path(config_path), "model.config_path")
    if not (root / "unet" / "config.json").exists():
        raise ValueError(f"model.config_path: no unet/config.json under {root}")
    return root


def _sdxl_unet_config(root: Path) -> dict[str, Any]:
    config = dict(UNet2DConditionModel.load_config(root / "unet", local_files_only=True))
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"model.config_path: {root}/unet/config.json is not an SDXL UNet (no text_time "
            f"conditioning); single files are read as SDXL checkpoints"
        )
    return config


def load_text_and_vae(
    teacher_path: str | Path, config_path: str | Path | None, *, sdxl: bool, vae: bool
) -> tuple[TextConditioner, AutoencoderKL | None]:
    """The teacher's text conditioning, and its VAE when ``vae``, from a diffusers folder or a
    single file (only those parts of the file are read)."""
    if not is_single_file(teacher_path):
        root = _require_dir(Path(teacher_path), "model.teacher_path")
        text = load_text(root, sdxl=sdxl)
        if not vae:
            return text, None
        _require_dir(root / "vae", "model.use_vae")
        return text, freeze(AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True))
    root = single_file_configs(teacher_path, config_path)
    prefixes: tuple[str, ...] = (single_file.CLIP_PREFIX, single_file.OPEN_CLIP_PREFIX)
    prefixes += (single_file.VAE_PREFIX,) if vae else ()
    sd = single_file.read_safetensors(teacher_path, "model.teacher_path", prefixes)
    where = f"model.teacher_path {teacher_path}"
    encoders = [freeze(e) for e in single_file.text_encoders_from_single_file(sd, root, where)]
    text = TextConditioner(_tokenizers(root, encoders, sdxl=True), encoders, sdxl=True)
    if not vae:
        return text, None
    if not (root / "vae" / "config.json").exists():
        raise ValueError(f"model.use_vae: no vae/config.json under model.config_path {root}")
    return text, freeze(single_file.vae_from_single_file(sd, root, where))


def unet_weights(path: str | Path, config: Mapping[str, Any], key: str) -> dict[str, torch.Tensor]:
    """Diffusers-layout UNet weights from a UNet or pipeline folder, a single-file SDXL checkpoint
    or a bare UNet state dict, checked against the architecture of ``config``. ``key``: the
    config key or flag ``path`` came from (errors name it)."""
    p = Path(path)
    where = f"{key} {p}"
    if p.is_dir():
        try:
            sd = load_unet(p).state_dict()
        except ValueError:
            raise ValueError(f"{key}: no UNet config.json under {p}") from None
        single_file.check_keys(
            {k: tuple(v.shape) for k, v in single_file.meta_unet(config).state_dict().items()},
            sd,
            f"{where} does not match the UNet config",
        )
        return sd
    return single_file.unet_state_dict(single_file.read_safetensors(p, key), config, where)


def load_student(path: str | Path, teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    """A diffusers UNet folder, or a single file (a single-file SDXL checkpoint's UNet, or a bare
    UNet state dict) loaded into a UNet of the teacher's architecture."""
    if Path(path).is_dir():
        return load_unet(path)
    config = teacher.config
    weights = unet_weights(path, config, "model.student_path")
    return single_file.unet_from_state_dict(config, weights)


def load_diffusers_folder(
    teacher_path: str | Path,
    student_path: str | None = None,
    *,
    use_vae: bool = False,
    config_path: str | None = None,
) -> Models:
    """Models from a diffusers folder, or a single-file SDXL checkpoint with the configs of
    ``config_path`` (``model.config_path``)."""
    if is_single_file(teacher_path):
        root = single_file_configs(teacher_path, config_path)
        config = _sdxl_unet_config(root)
        # + SD 1.x/2.x's text encoder: only there in a file of the wrong family (named in errors)
        prefix = (single_file.UNET_PREFIX, "cond_stage_model.")
        sd = single_file.read_safetensors(teacher_path, "model.teacher_path", prefix)
        where = f"model.teacher_path {teacher_path}"
        unet = single_file.unet_from_state_dict(
            config, single_file.unet_state_dict(sd, config, where)
        )
        del sd
    else:
        root = _require_dir(Path(teacher_path), "model.teacher_path")
        unet = load_unet(root)
    teacher = freeze(unet)
    student = load_student(student_path, teacher) if student_path else copy.deepcopy(teacher)
    student.requires_grad_(True)
    student.train()
    sdxl = teacher.config.addition_embed_type == "text_time"
    text, vae = load_text_and_vae(teacher_path, config_path, sdxl=sdxl, vae=use_vae)
    return Models(
        teacher, student, text, load_schedule(root), vae, _unet_sample_shape(teacher, vae)
    )


def build_sdxl_from_configs(
    unet_cfg: dict[str, Any],
    text_cfgs: list[dict[str, Any]],
    vae_cfg: dict[str, Any] | None,
    seed: int = 0,
) -> Models:
    """An SDXL-architecture model with random weights from configs (tests, benchmarks).

    Build under ``with torch.device("cuda"):`` to initialise large ones on the GPU."""
    torch.manual_seed(seed)
    teacher = freeze(UNet2DConditionModel(**unet_cfg))
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    enc1 = CLIPTextModel(CLIPTextConfig(**text_cfgs[0]))
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfgs[1]))
    text = TextConditioner(
        [clip_tokenizer(77), clip_tokenizer(77, pad_token="!")],
        [freeze(enc1), freeze(enc2)],
        sdxl=True,
    )
    vae = freeze(AutoencoderKL(**vae_cfg)) if vae_cfg is not None else None
    return Models(
        teacher, student, text, dict(tiny.SDXL_SCHEDULE), vae, _unet_sample_shape(teacher, vae)
    )


def build_tiny_sdxl(seed: int = 0, *, with_vae: bool = False) -> Models:
    """A tiny SDXL-architecture model with random weights (tests, dry runs)."""
    vae = tiny.TINY_VAE if with_vae else None
    return build_sdxl_from_configs(tiny.TINY_SDXL_UNET, tiny.TINY_SDXL_TEXT_ENCODERS, vae, seed)


def build_models(model_cfg: Any, seed: int = 0, task_dir: Path | None = None) -> Models:
    """Entry point: ``model_cfg`` is a ``config.ModelConfig``; ``task_dir`` the task's own
    diffusers folder (``Task.model_dir()``), read when ``model_cfg.source`` is ``task``."""
    if model_cfg.source == "tiny_sdxl":
        models = build_tiny_sdxl(seed, with_vae=model_cfg.use_vae)
    elif model_cfg.source == "task":
        if task_dir is None:
            raise ValueError("model.source=task: this task ships no models; use diffusers")
        models = load_diffusers_folder(task_dir, model_cfg.student_path, use_vae=model_cfg.use_vae)
    else:
        models = load_diffusers_folder(
            model_cfg.teacher_path,
            model_cfg.student_path,
            use_vae=model_cfg.use_vae,
            config_path=model_cfg.config_path,
        )
    if model_cfg.gradient_checkpointing:
        models.student.enable_gradient_checkpointing()
    return models
