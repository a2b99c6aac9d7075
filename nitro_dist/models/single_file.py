"""SDXL weights as single files: the original (Stability / A1111 / ComfyUI) key layout and bare
diffusers-layout UNet state dicts, read and written offline, safetensors only.

Reading uses diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``)
with the diffusers configs of a local folder; before converting, the file's keys and shapes are
checked against the model the config builds, so a file of another architecture stops with the keys
that differ instead of loading half a model.

Writing (diffusers -> original) is not in the diffusers package. The mapping below follows the
layout diffusers' ``scripts/convert_diffusers_to_original_sdxl.py`` writes, computed from the UNet
config (block count, ``layers_per_block``, which blocks have attention) instead of SDXL's fixed
numbers, so the tiny SDXL stand-in converts too. ``single_file_state_dict`` checks that diffusers'
converters map the result back onto exactly the keys and shapes it came from.

Original layout (prefixes): UNet ``model.diffusion_model.``, VAE ``first_stage_model.``, CLIP-L
``conditioner.embedders.0.transformer.``, OpenCLIP bigG ``conditioner.embedders.1.model.``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# in original files but not in the diffusers models (buffers, CLIP's unused logit scale)
_IGNORED_SUFFIXES = ("position_ids", "logit_scale")
MAX_NAMED = 5  # keys named per kind of mismatch in an error

UnetForm = Literal["single_file", "original_unet", "diffusers_unet"]
Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# reading files


def read_safetensors(path: str | Path, key: str, prefixes: tuple[str, ...] = ()) -> Tensors:
    """The tensors of a ``.safetensors`` file (only those under ``prefixes`` when given). ``key``
    names the config key or flag the path came from, for errors."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{key}: {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{key}: {p} is not a file")
    if p.suffix != ".safetensors":
        raise ValueError(
            f"{key}: {p} is not a .safetensors file; only safetensors weights are read (no pickle)"
        )
    out: Tensors = {}
    try:
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not prefixes or name.startswith(prefixes):
                    out[name] = f.get_tensor(name)
    except Exception as e:  # truncated or not safetensors at all
        raise ValueError(f"{key}: cannot read {p} as safetensors: {e}") from e
    return out


def unet_form(sd: Mapping[str, Any]) -> UnetForm:
    """Which kind of UNet weights ``sd`` holds, from its keys: a full single-file checkpoint
    (``model.diffusion_model.*``), a bare UNet in the original layout (``input_blocks.*``), or a
    bare diffusers-layout UNet (``down_blocks.*``, as NitroFusion publishes its models)."""
    if any(k.startswith(UNET_PREFIX) for k in sd):
        return "single_file"
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in sd):
        return "original_unet"
    if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in sd):
        return "diffusers_unet"
    raise ValueError(f"holds no UNet weights that nitro_dist knows (keys like {_some(sd)})")


def _some(keys: Any) -> str:
    names = sorted(keys)
    more = f", ... ({len(names)} in all)" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more


def check_keys(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, torch.Tensor], where: str
) -> None:
    """Raise a ValueError naming ``where`` and (at most ``MAX_NAMED`` of) the missing, unexpected
    and mis-shaped keys, with their counts, unless ``got`` has exactly ``expected``'s keys and
    shapes."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:MAX_NAMED])})")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}


def meta_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    """The UNet ``config`` describes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def _hint(sd: Mapping[str, Any]) -> str:
    if any(k.startswith("cond_stage_model.") for k in sd):
        return " (it looks like a Stable Diffusion 1.x/2.x checkpoint, not SDXL)"
    return ""


def unet_state_dict(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str
) -> Tensors:
    """Diffusers-layout UNet weights from any of the three ``unet_form`` kinds, checked against
    the UNet ``config`` builds (keys and shapes) before diffusers' converter runs."""
    try:
        form = unet_form(sd)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    model_sd = meta_unet(config).state_dict()
    if form == "diffusers_unet":
        check_keys(_shapes(model_sd), sd, f"{where} does not match the UNet config")
        return dict(sd)
    if form == "original_unet":
        sd = {UNET_PREFIX + k: v for k, v in sd.items()}
    file_unet = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    expected = _shapes(unet_to_original(model_sd, config))
    check_keys(
        {UNET_PREFIX + k: s for k, s in expected.items()},
        file_unet,
        f"{where} does not match the UNet config{_hint(sd)}",
    )
    out = convert_ldm_unet_checkpoint(file_unet, dict(config))
    check_keys(_shapes(model_sd), out, f"{where}: diffusers' converter")  # safety net
    return out


def unet_from_state_dict(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> Any:
    """A UNet with exactly these (diffusers-layout, checked) weights, held in float32 like
    ``from_pretrained`` gives; built on the meta device, so no time goes into random init."""
    unet = meta_unet(config)
    dtypes = {k: v.dtype for k, v in unet.state_dict().items()}
    unet.load_state_dict({k: v.to(dtypes[k]) for k, v in sd.items()}, strict=True, assign=True)
    return unet


# ---------------------------------------------------------------------------------------------
# text encoders and VAE of a single file (configs from a local diffusers folder)


def _text_config(config_dir: Path, name: str) -> CLIPTextConfig:
    return CLIPTextConfig.from_pretrained(config_dir / name, local_files_only=True)


def text_encoders_from_single_file(
    sd: Mapping[str, torch.Tensor], config_dir: Path, where: str
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's two text encoders (CLIP ViT-L, OpenCLIP bigG with projection) from the original
    layout. The encoders are told apart by prefix, not by width as diffusers' pipeline loader
    does, so equal-width encoders (the tiny stand-in) load right too."""
    enc1 = CLIPTextModel(_text_config(config_dir, "text_encoder"))
    enc2 = CLIPTextModelWithProjection(_text_config(config_dir, "text_encoder_2"))
    for enc, prefix, to_original, name in (
        (enc1, CLIP_PREFIX, clip_to_original, "text_encoder"),
        (enc2, OPEN_CLIP_PREFIX, open_clip_to_original, "text_encoder_2"),
    ):
        meta = {k: torch.empty(v.shape, device="meta") for k, v in enc.state_dict().items()}
        expected = {prefix + k: s for k, s in _shapes(to_original(meta)).items()}
        got = {k: v for k, v in sd.items() if k.startswith(prefix)}
        got = {k: v for k, v in got.items() if not k.endswith(_IGNORED_SUFFIXES)}
        problem = f"{where}: {name} ({prefix}*) does not match its config{_hint(sd)}"
        check_keys(expected, got, problem)
        if enc is enc1:
            converted = convert_ldm_clip_checkpoint(got)
            if not hasattr(enc, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
                converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        else:
            converted = convert_open_clip_checkpoint(enc, got, prefix=prefix)
        missing, unexpected = enc.load_state_dict(converted, strict=False)
        left = [k for k in missing if not k.endswith(_IGNORED_SUFFIXES)] + list(unexpected)
        if left:  # the key check above makes this unreachable unless the converters change
            raise ValueError(f"{where}: {name}: converted keys do not fit: {_some(left)}")
    return enc1, enc2


def vae_from_single_file(
    sd: Mapping[str, torch.Tensor], config_dir: Path, where: str
) -> AutoencoderKL:
    config = AutoencoderKL.load_config(config_dir / "vae", local_files_only=True)
    vae = AutoencoderKL.from_config(config)
    expected = {VAE_PREFIX + k: s for k, s in _shapes(vae_to_original(vae.state_dict())).items()}
    got = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    check_keys(expected, got, f"{where}: VAE ({VAE_PREFIX}*) does not match vae/config.json")
    vae.load_state_dict(convert_ldm_vae_checkpoint(got, dict(config)), strict=True)
    return vae


# ---------------------------------------------------------------------------------------------
# diffusers -> original layout

_RESNET = {  # diffusers ResnetBlock2D part -> original ResBlock part
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_to_original(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """Diffusers UNet keys -> the original layout (without ``model.diffusion_model.``). Input
    block n = 1 + (L+1)·b + j holds down block b's resnet j (``.0``) and attention j (``.1``),
    input block (L+1)·(b+1) its downsampler; output block (L+1)·b + j holds up block b's layer j
    and, at j = L, its upsampler after the attention (``.2``) or the resnet (``.1``)."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError(f"UNet config: layers_per_block {per!r} per block is not supported")
    step = per + 1
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: Tensors = {}
    for key, value in sd.items():
        name, _, param = key.rpartition(".")
        if name in _UNET_TOP:
            out[f"{_UNET_TOP[name]}.{param}"] = value
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            kind, b, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "down":
                block = f"input_blocks.{step * b + j + 1}"
            else:
                block = f"output_blocks.{step * b + j}"
            rest = _resnet(rest) if part == "resnets" else rest
            out[f"{block}.{0 if part == 'resnets' else 1}.{rest}"] = value
            continue
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
        if m:
            out[f"input_blocks.{step * (int(m[1]) + 1)}.0.op.{m[2]}"] = value
            continue
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
        if m:
            b = int(m[1])
            out[f"output_blocks.{step * b + per}.{2 if up_attn[b] else 1}.conv.{m[2]}"] = value
            continue
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            if m[1] == "resnets":
                out[f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"] = value
            else:
                out[f"middle_block.{2 * int(m[2]) + 1}.{m[3]}"] = value
            continue
        raise ValueError(f"UNet key {key!r} has no place in the original SDXL layout")
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(sd: Mapping[str, torch.Tensor]) -> Tensors:
    """Diffusers AutoencoderKL keys -> the original layout (without ``first_stage_model.``);
    decoder up blocks are numbered in reverse, the mid attention's linear weights become 1x1
    convolutions."""
    num_up = 1 + max(int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out: Tensors = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: (
                f"decoder.up.{num_up - 1 - int(m[1])}."
                + ("block." if m[2] == "resnets" else "upsample.")
            ),
            new,
        )
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new)
        if m:
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def clip_to_original(sd: Mapping[str, torch.Tensor]) -> Tensors:
    """CLIP ViT-L (``CLIPTextModel``) keys -> the original layout (transformers' own names under
    ``text_model.``, which recent transformers no longer put in the state dict)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}


_OPEN_CLIP_TOP = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_to_original(sd: Mapping[str, torch.Tensor]) -> Tensors:
    """OpenCLIP bigG (``CLIPTextModelWithProjection``) keys -> OpenCLIP's layout: q/k/v
    projections concatenated into ``attn.in_proj_*``, ``text_projection`` stored transposed
    (width x projection, a matrix not a Linear)."""
    out: Tensors = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            if key.endswith(_IGNORED_SUFFIXES):
                continue
            raise ValueError(f"text encoder 2 key {key!r} has no place in the OpenCLIP layout")
        layer, part, param = f"transformer.resblocks.{m[1]}", m[2], m[3]
        q = re.fullmatch(r"self_attn\.([qkv])_proj", part)
        if q:
            qkv.setdefault(f"{layer}.attn.in_proj_{param}", {})[q[1]] = value
        else:
            out[f"{layer}.{_OPEN_CLIP_LAYER[part]}.{param}"] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def single_file_state_dict(
    unet_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    text_sds: tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    vae_sd: Mapping[str, torch.Tensor] | None = None,
    vae_config: Mapping[str, Any] | None = None,
) -> Tensors:
    """A single-file SDXL checkpoint (original layout): the UNet, and the text encoders and VAE
    when given. Checked against diffusers' converters: each part must map back onto exactly the
    keys and shapes it came from (a UNet whose architecture has no original layout that diffusers
    reads back stops with a ValueError)."""
    unet = unet_to_original(unet_sd, unet_config)
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    back = convert_ldm_unet_checkpoint(out, dict(unet_config))
    check_keys(_shapes(unet_sd), back, "single-file export: diffusers reads the UNet back as")
    if text_sds is not None:
        out |= {CLIP_PREFIX + k: v for k, v in clip_to_original(text_sds[0]).items()}
        out |= {OPEN_CLIP_PREFIX + k: v for k, v in open_clip_to_original(text_sds[1]).items()}
    if vae_sd is not None:
        assert vae_config is not None, "the VAE needs its config"
        vae = {VAE_PREFIX + k: v for k, v in vae_to_original(vae_sd).items()}
        back = convert_ldm_vae_checkpoint(vae, dict(vae_config))
        check_keys(_shapes(vae_sd), back, "single-file export: diffusers reads the VAE back as")
        out |= vae
    return {k: v.contiguous() for k, v in out.items()}
