"""Build student, teacher, text conditioning and VAE from a diffusers folder or a tiny config.

A "diffusers folder" is the layout of a diffusers pipeline: ``unet/``, ``text_encoder/``
(+ ``text_encoder_2/`` for SDXL), optional ``tokenizer/``/``tokenizer_2/``, ``scheduler/``,
optional ``vae/``. Only local paths and safetensors are read: nothing is fetched from a hub.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from nitro_dist.models import tiny
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


def load_text(root: Path, *, sdxl: bool) -> TextConditioner:
    enc_dirs = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    tokenizers, encoders = [], []
    for i, name in enumerate(enc_dirs):
        folder = _require_dir(root / name, f"text encoder {name}")
        cls = CLIPTextModelWithProjection if (sdxl and i == 1) else CLIPTextModel
        enc = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        tok_dir = root / name.replace("text_encoder", "tokenizer")
        tokenizers.append(
            _load_tokenizer(
                tok_dir,
                pad_token="!" if (sdxl and i == 1) else "<|endoftext|>",
                max_length=enc.config.max_position_embeddings,
            )
        )
        encoders.append(freeze(enc))
    return TextConditioner(tokenizers, encoders, sdxl=sdxl)


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


def load_diffusers_folder(
    teacher_path: str | Path, student_path: str | None = None, *, use_vae: bool = False
) -> Models:
    root = _require_dir(Path(teacher_path), "model.teacher_path")
    teacher = freeze(load_unet(root))
    student = load_unet(student_path) if student_path else copy.deepcopy(teacher)
    student.requires_grad_(True)
    student.train()
    sdxl = teacher.config.addition_embed_type == "text_time"
    text = load_text(root, sdxl=sdxl)
    vae = None
    if use_vae:
        _require_dir(root / "vae", "model.use_vae")
        vae = freeze(AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True))
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
            model_cfg.teacher_path, model_cfg.student_path, use_vae=model_cfg.use_vae
        )
    if model_cfg.gradient_checkpointing:
        models.student.enable_gradient_checkpointing()
    return models
