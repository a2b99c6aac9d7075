"""LoRA students (``student.lora.*``) through diffusers' own peft path, no hand-rolled keys.

Adapters are added with ``UNet2DConditionModel.add_adapter`` (peft ``LoraConfig``, adapter name
"default") on a frozen student, so only the adapters require grad: G's optimizer, gradient sync,
clipping, EMA and checkpoints then see only them (they take the parameters that require grad).
On disk the adapters are diffusers' LoRA file: ``get_peft_model_state_dict`` ->
``convert_state_dict_to_diffusers`` -> ``StableDiffusionXLPipeline.save_lora_weights`` (keys
``unet.*``, the peft config as metadata), the file diffusers' ``load_lora_weights`` reads. The
frozen base is never written: it is the checkpoint's ``config.yaml`` ``model`` section (the
student path, else the teacher; tiny models from the seed), rebuilt by ``base_student``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from nitro_dist.config import Config, LoraConfig

ADAPTER = "default"  # peft's and diffusers' default adapter name
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def has_adapters(module: torch.nn.Module) -> bool:
    """``module`` carries peft LoRA adapters (a LoRA student)."""
    return bool(getattr(module, "peft_config", None))


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters G's update rule steps: all of a full student, the adapters of a LoRA one
    (in module order: the order of the consolidated optimizer state)."""
    return [p for p in module.parameters() if p.requires_grad]


def add_adapters(unet: UNet2DConditionModel, section: LoraConfig, seed: int) -> None:
    """Freeze ``unet`` and add LoRA adapters (``student.lora``), initialised from ``seed``:
    A gaussian, B zero (peft's "gaussian", diffusers' LoRA scripts), so the student starts as
    the base. The same seed gives the same adapters on every rank and on resume."""
    from peft import LoraConfig as PeftLoraConfig

    config = PeftLoraConfig(
        r=section.rank,
        lora_alpha=section.alpha or section.rank,
        target_modules=list(section.target_modules),
        init_lora_weights="gaussian",
    )
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=ADAPTER)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(
                f"student.lora.target_modules: {list(section.target_modules)} - {e}"
            ) from e


def adapter_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' LoRA key layout (``...to_q.lora.down.weight``), fp32 on CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def adapter_metadata(unet: Any) -> dict[str, Any]:
    """The peft config diffusers stores beside the weights (rank, alpha, targets)."""
    return unet.peft_config[ADAPTER].to_dict()


def save_adapters(
    unet: torch.nn.Module,
    folder: Path,
    weight_name: str = LORA_FILE,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``folder/weight_name``: the adapters as ``StableDiffusionXLPipeline.save_lora_weights``
    writes them (``pipe.load_lora_weights(folder, weight_name=...)`` reads it back)."""
    from diffusers import StableDiffusionXLPipeline

    sd = state_dict if state_dict is not None else adapter_state_dict(unet)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=sd,
        weight_name=weight_name,
        unet_lora_adapter_metadata=adapter_metadata(unet),
    )
    return folder / weight_name


def load_adapters(unet: torch.nn.Module, folder: Path) -> None:
    """Adapters saved by ``save_adapters`` into ``unet``'s own (``add_adapters`` made them):
    diffusers' resume recipe (``lora_state_dict`` -> ``convert_unet_state_dict_to_peft`` ->
    ``set_peft_model_state_dict``). A file of other targets or ranks is an error naming it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    file = folder / LORA_FILE
    sd, _ = StableDiffusionXLPipeline.lora_state_dict(folder, weight_name=LORA_FILE)
    sd = convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
    )
    own = {n for n, _ in unet.named_parameters() if "lora_" in n}
    try:
        result = set_peft_model_state_dict(unet, sd, adapter_name=ADAPTER)
    except RuntimeError as e:  # a shape mismatch: another rank
        raise ValueError(f"{file}: adapters do not fit student.lora ({e})") from e
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    loaded = {k.replace(".weight", f".{ADAPTER}.weight") for k in sd}
    missing = sorted(own - loaded)
    if unexpected or missing:
        raise ValueError(
            f"{file}: adapters do not match student.lora (target_modules / rank): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})"
        )


def merged_unet(base: UNet2DConditionModel, folder: Path) -> UNet2DConditionModel:
    """``base`` with the LoRA file in ``folder`` loaded the way diffusers loads any LoRA
    (``load_lora_adapter``) and merged into its weights (``fuse_lora``, then the adapter layers
    removed): a plain UNet, the weights ``--merge`` exports and inference samples with."""
    base.load_lora_adapter(folder, prefix="unet", weight_name=LORA_FILE, adapter_name=ADAPTER)
    base.fuse_lora()
    base.unload_lora()
    return base


def base_student(cfg: Config) -> UNet2DConditionModel:
    """The frozen base a LoRA checkpoint was trained on, from its config's ``model`` section
    (what ``build_run`` starts G from, before adapters)."""
    from nitro_dist.models.builders import build_models  # not build.py: serving needs no
    from nitro_dist.tasks import load_task  # training code (tests/test_imports.py)

    task_dir = None
    if cfg.model.source == "task":
        task_dir = load_task(cfg.task, cfg.train.sample_prompts).model_dir()
    return build_models(cfg.model, cfg.seed, task_dir).student
