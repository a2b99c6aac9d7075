"""Export a trained generator in the forms other SDXL tools read.

  python -m nitro_dist.export --checkpoint RUN --format FORMAT --out PATH [--overwrite]

--checkpoint takes a checkpoint folder, a run's checkpoints/ folder, a run folder (its newest
complete checkpoint) or the same in object storage (s3://...). The weights are the EMA's when the
run kept one (--no-ema: the raw generator's). Formats:

  diffusers         a full StableDiffusionXLPipeline folder (--out DIR): the generator as unet/,
                    the teacher's text encoders, tokenizers and VAE, and NitroLCMScheduler (the
                    run's shift) as scheduler/; StableDiffusionXLPipeline.from_pretrained(DIR)
                    loads it offline (with nitro_dist installed: the scheduler is its class).
  unet-safetensors  a bare diffusers-layout UNet state dict (--out FILE.safetensors), as NitroFusion
                    publishes nitrosd-*_unet.safetensors, and FILE.scheduler.json beside it: the
                    settings of their TimestepShiftLCMScheduler (shifted_timestep = the run's
                    sampler.shift, original_inference_steps) and the UNet config.
  single-file       the original SDXL key layout (--out FILE.safetensors) that diffusers'
                    from_single_file, ComfyUI and A1111 read: the UNet, or with --full the UNet,
                    both text encoders and the VAE of the teacher.
  delta             zero-shot style transfer (NitroFusion section 4.6): custom + (generator - base)
                    for every UNet weight; --base is the UNet the distillation started from,
                    --custom a fine-tune of it (a diffusers UNet or pipeline folder, a single-file
                    SDXL checkpoint, or a bare UNet state dict); written as a diffusers UNet
                    folder, or with --delta-as single-file as an original-layout FILE.safetensors.
  lora              a LoRA student's adapters (student.lora.rank > 0) as diffusers' LoRA file
                    (--out FILE.safetensors, keys unet.*, the peft config as metadata):
                    pipe.load_lora_weights(DIR, weight_name=FILE) on the run's base model.

A LoRA checkpoint holds the adapters only; the base is its config's model section (the student
path, else the teacher). The full-weight formats above then need --merge: the adapters merged
into that base (diffusers' load_lora_adapter + fuse_lora).

An existing --out is replaced only with --overwrite; files are written under a temporary name and
moved into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nitro_dist import checkpoint_layout as ckpt
from nitro_dist import remote

FORMATS = ("diffusers", "unet-safetensors", "single-file", "delta", "lora")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m nitro_dist.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--checkpoint", required=True, help="checkpoint, checkpoints/ or run folder, or s3://..."
    )
    ap.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    ap.add_argument("--out", required=True, type=Path, help="folder or .safetensors file to write")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--no-ema", action="store_true", help="the raw generator, not its EMA")
    ap.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="fp32",
        help="weights' dtype (default fp32, as trained; NitroFusion's files are fp16)",
    )
    ap.add_argument(
        "--full", action="store_true", help="single-file: add the text encoders and the VAE"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA checkpoint in a full-weight format: the adapters merged into the base",
    )
    ap.add_argument("--base", help="delta: the UNet the distillation started from")
    ap.add_argument("--custom", help="delta: the user's fine-tune of --base")
    ap.add_argument(
        "--delta-as",
        choices=("diffusers", "single-file"),
        default="diffusers",
        help="delta: a diffusers UNet folder (default) or an original-layout .safetensors",
    )
    args = ap.parse_args(argv)
    delta = args.format == "delta"
    if delta and not (args.base and args.custom):
        ap.error("--format delta needs --base and --custom")
    if not delta and (args.base or args.custom):
        ap.error("--base/--custom are only read with --format delta")
    if args.merge and args.format == "lora":
        ap.error("--merge writes full weights: use it with diffusers|unet-safetensors|single-file|"
                 "delta, not --format lora")  # fmt: skip
    if args.full and args.format != "single-file":
        ap.error("--full is only read with --format single-file")
    if _writes_file(args) and args.out.suffix != ".safetensors":
        ap.error(f"--out: --format {args.format} writes one file; name it *.safetensors")
    return args


def _writes_file(args: argparse.Namespace) -> bool:
    return args.format in ("unet-safetensors", "single-file", "lora") or (
        args.format == "delta" and args.delta_as == "single-file"
    )


def sidecar_path(out: Path) -> Path:
    """Where ``unet-safetensors`` writes its scheduler settings: FILE.scheduler.json."""
    return out.with_name(out.stem + ".scheduler.json")


# ---------------------------------------------------------------------------------------------
# reading the checkpoint (inference's path: no training code)


def open_checkpoint(spec: str) -> Path:
    """A local checkpoint folder for ``spec`` (object storage: its inference parts, cached)."""
    path = remote.open_checkpoint(spec)
    if not ckpt.is_lora(path) and not (path / ckpt.GENERATOR / "config.json").exists():
        raise ValueError(f"--checkpoint: {path} has no {ckpt.GENERATOR}/ weights")
    if not (path / ckpt.SCHEDULER).is_dir():
        raise ValueError(f"--checkpoint: {path} has no {ckpt.SCHEDULER}/ folder")
    return path


def generator_unet(path: Path, use_ema: bool) -> Any:
    """G's full weights (a LoRA checkpoint: merged into its base)."""
    from nitro_dist.inference import checkpoint_unet

    return checkpoint_unet(path, use_ema)


def _export_lora(folder: Path, dtype: torch.dtype, out: Path) -> None:
    """The checkpoint's LoRA file (diffusers' layout already), cast, its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from nitro_dist.lora import LORA_FILE

    src = folder / LORA_FILE
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    sd = _cast(load_file(str(src)), dtype)
    _write(out, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def _teacher_parts(path: Path, what: str, *, vae: bool) -> tuple[Any, Any]:
    from nitro_dist.inference import Generator, teacher_text_and_vae

    cfg = Generator.checkpoint_config(path)
    try:
        text, vae_model = teacher_text_and_vae(cfg, vae=vae)
    except ValueError as e:
        raise ValueError(f"{what} needs the teacher's text encoders and VAE: {e}") from e
    if not text.sdxl:
        raise ValueError(
            f"{what}: the run's model is not SDXL (one text encoder, e.g. the digits task); "
            f"use --format unet-safetensors or the checkpoint's {ckpt.GENERATOR}/ folder"
        )
    return text, vae_model


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# writers


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata={"format": "pt"})


def _write(out: Path, writer: Callable[[Path], object]) -> None:
    """``writer`` fills a temporary sibling of ``out``, which then replaces ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        writer(tmp)
        _remove(out)
        os.replace(tmp, out)
    finally:
        _remove(tmp)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else 0
    size = size or out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def scheduler_settings(scheduler: Any, unet_config: dict[str, Any]) -> dict[str, Any]:
    """NitroFusion's TimestepShiftLCMScheduler settings for the exported UNet: an LCMScheduler on
    the teacher's noise schedule whose UNet is told t' = floor(t * shifted_timestep / 1000) with
    shifted_timestep = the run's sampler.shift (the NitroLCMScheduler config's ``shift``)."""
    c = scheduler.config
    return {
        "scheduler": "TimestepShiftLCMScheduler",
        "base_scheduler": "LCMScheduler",
        "shifted_timestep": int(c.shift),
        "original_inference_steps": int(c.original_inference_steps),
        "num_inference_steps": list(range(1, int(c.original_inference_steps) + 1)),
        "guidance_scale": 0.0,
        "noise_schedule": {
            k: c[k]
            for k in (
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "prediction_type",
            )
        },
        "unet_config": {k: v for k, v in unet_config.items() if not k.startswith("_")},
    }


def export(args: argparse.Namespace) -> None:
    from nitro_dist.diffusion import NitroLCMScheduler

    path = open_checkpoint(args.checkpoint)
    dtype = DTYPES[args.dtype]
    lora_ckpt = ckpt.is_lora(path)
    if args.format == "lora":
        if not lora_ckpt:
            raise ValueError(
                f"--format lora: {path} holds a full student (student.lora.rank=0), no adapters"
            )
        folder = ckpt.generator_dir(path, not args.no_ema)
        print(f"checkpoint {path} ({folder.name})")
        _export_lora(folder, dtype, args.out)
        return
    if lora_ckpt and not args.merge:
        raise ValueError(
            f"--checkpoint: {path} holds LoRA adapters only (student.lora.rank > 0): --format "
            f"lora writes them, --merge writes {args.format} with them merged into the base"
        )
    if args.merge and not lora_ckpt:
        raise ValueError(f"--merge: {path} holds a full student, not LoRA adapters")
    unet = generator_unet(path, not args.no_ema)
    scheduler = NitroLCMScheduler.from_pretrained(path / ckpt.SCHEDULER)
    print(f"checkpoint {path} ({ckpt.generator_dir(path, not args.no_ema).name})")
    if args.format == "diffusers":
        _export_pipeline(path, unet, scheduler, dtype, args.out)
    elif args.format == "unet-safetensors":
        sd = _cast(unet.state_dict(), dtype)
        settings = scheduler_settings(scheduler, dict(unet.config))
        _write(args.out, lambda tmp: _save_safetensors(sd, tmp))
        side = sidecar_path(args.out)
        _write(side, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))
        print(
            f"scheduler: TimestepShiftLCMScheduler shifted_timestep={settings['shifted_timestep']} "
            f"original_inference_steps={settings['original_inference_steps']} guidance_scale=0"
        )
    elif args.format == "single-file":
        _export_single_file(path, unet, args.full, dtype, args.out)
    else:
        _export_delta(unet, args.base, args.custom, args.delta_as, dtype, args.out)


def _export_pipeline(path: Path, unet: Any, scheduler: Any, dtype: torch.dtype, out: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    text, vae = _teacher_parts(path, "--format diffusers", vae=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text.encoders[0],
        text_encoder_2=text.encoders[1],
        tokenizer=text.tokenizers[0],
        tokenizer_2=text.tokenizers[1],
        unet=unet,
        scheduler=scheduler,
    )
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    _write(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def _export_single_file(path: Path, unet: Any, full: bool, dtype: torch.dtype, out: Path) -> None:
    from nitro_dist.models.single_file import single_file_state_dict

    text_sds, vae_sd, vae_cfg = None, None, None
    if full:
        text, vae = _teacher_parts(path, "--format single-file --full", vae=True)
        text_sds = (text.encoders[0].state_dict(), text.encoders[1].state_dict())
        vae_sd, vae_cfg = vae.state_dict(), dict(vae.config)
    sd = single_file_state_dict(unet.state_dict(), dict(unet.config), text_sds, vae_sd, vae_cfg)
    sd = _cast(sd, dtype)
    _write(out, lambda tmp: _save_safetensors(sd, tmp))


def delta_weights(
    student: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    custom: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """theta_custom + (theta_student - theta_base), per weight, in float32."""
    return {k: custom[k].float() + (s.float() - base[k].float()) for k, s in student.items()}


def _export_delta(
    unet: Any, base: str, custom: str, form: str, dtype: torch.dtype, out: Path
) -> None:
    from nitro_dist.models.builders import unet_weights
    from nitro_dist.models.single_file import single_file_state_dict, unet_from_state_dict

    config = dict(unet.config)
    base_sd = unet_weights(base, config, "--base")
    custom_sd = unet_weights(custom, config, "--custom")
    sd = delta_weights(unet.state_dict(), base_sd, custom_sd)
    if form == "single-file":
        sd = _cast(single_file_state_dict(sd, config), dtype)
        _write(out, lambda tmp: _save_safetensors(sd, tmp))
        return
    model = unet_from_state_dict(config, sd)
    if dtype != torch.float32:
        model.to(dtype=dtype)
    _write(out, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [args.out] + ([sidecar_path(args.out)] if args.format == "unet-safetensors" else [])
    for target in targets:
        if target.exists() and not args.overwrite:
            print(f"error: --out: {target} exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
    try:
        export(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
