"""Checkpoints: a set of named stateful parts, written to a temp dir and renamed into place.

Layout (DESIGN.md §3)::

    iter_000500/
      generator/           diffusers save_pretrained (safetensors): loads with
                           UNet2DConditionModel.from_pretrained
      generator_ema/       the same for the EMA weights, when EMA is on
      scheduler/           NitroLCMScheduler config (with the shift)
      optimizer/           G's optimizer state (safetensors + json)
      pool/                manifest.json + head_000123.safetensors (weights + AdamW state)
      trainer_state.json   iteration, images seen, data cursor, seed
      config.yaml          the resolved config
    latest                 name of the newest complete checkpoint

Only safetensors and JSON/YAML are read back: no pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nitro_dist.discriminator.pool import HeadPool

LATEST = "latest"


# ---------------------------------------------------------------------------------------------
# optimizer state <-> safetensors + json


def optimizer_tensors(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """State of ``params`` (in that order) as flat tensors: ``{prefix}{i}.{name}``."""
    out = {}
    for i, p in enumerate(params):
        for name, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                out[f"{prefix}{i}.{name}"] = v.detach().cpu().contiguous()
            else:
                out[f"{prefix}{i}.{name}"] = torch.tensor(v)
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    tensors: dict[str, torch.Tensor],
    prefix: str = "",
) -> None:
    for i, p in enumerate(params):
        state = {}
        head = f"{prefix}{i}."
        for key, v in tensors.items():
            if key.startswith(head):
                name = key[len(head) :]
                state[name] = v.to(p.device) if name != "step" else v.to(torch.float32)
        if state:
            opt.state[p] = state
        else:
            opt.state.pop(p, None)


def save_optimizer(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], folder: Path
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(optimizer_tensors(opt, params), str(folder / "state.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    (folder / "param_groups.json").write_text(json.dumps(groups, default=list))


def load_optimizer(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], folder: Path
) -> None:
    load_optimizer_tensors(opt, params, load_file(str(folder / "state.safetensors")))
    groups = json.loads((folder / "param_groups.json").read_text())
    for g, saved in zip(opt.param_groups, groups, strict=True):
        for k, v in saved.items():
            g[k] = tuple(v) if isinstance(g.get(k), tuple) else v


# ---------------------------------------------------------------------------------------------
# pool


def save_pool(pool: HeadPool, folder: Path) -> None:
    """One file per owned head, named by global id, so any number of ranks can load it."""
    folder.mkdir(parents=True, exist_ok=True)
    for hid in pool.owned:
        head = pool.head(hid)
        params = list(head.parameters())
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in head.named_parameters()}
        tensors.update(optimizer_tensors(pool.optimizer, params, prefix="optim."))
        save_file(tensors, str(folder / f"head_{hid:06d}.safetensors"))


def write_pool_manifest(pool: HeadPool, folder: Path, iteration: int) -> None:
    lay = pool.layout
    manifest = {
        "num_heads": lay.num_heads,
        "iteration": iteration,
        "kinds": list(lay.kinds),
        "t_buckets": list(lay.t_buckets),
        "levels": list(lay.levels),
        "candidates": lay.candidates,
        "width": lay.width,
        "depth": lay.depth,
        "crop_frac": lay.crop_frac,
        "level_shapes": [list(s) for s in lay.level_shapes],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def load_pool(pool: HeadPool, folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    lay = pool.layout
    expected = {
        "num_heads": lay.num_heads,
        "kinds": list(lay.kinds),
        "candidates": lay.candidates,
        "t_buckets": list(lay.t_buckets),
        "levels": list(lay.levels),
        "width": lay.width,
        "depth": lay.depth,
    }
    for key, want in expected.items():
        if manifest.get(key) != want:
            raise ValueError(
                f"checkpoint pool {folder}: pool.{key} is {manifest.get(key)!r} there but "
                f"{want!r} in this config; resume with the pool settings of the checkpoint"
            )
    for hid in pool.owned:
        tensors = load_file(str(folder / f"head_{hid:06d}.safetensors"))
        head = pool.head(hid)
        with torch.no_grad():
            for n, p in head.named_parameters():
                p.copy_(tensors[f"param.{n}"])
        load_optimizer_tensors(pool.optimizer, list(head.parameters()), tensors, prefix="optim.")


# ---------------------------------------------------------------------------------------------
# whole checkpoints


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def begin(root: Path, iteration: int) -> Path:
    """A fresh temp folder to fill; ``commit`` renames it into place."""
    tmp = root / f".tmp-{checkpoint_name(iteration)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, tmp: Path, iteration: int, keep: int) -> Path:
    final = root / checkpoint_name(iteration)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/``), if any."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def resolve(path: str | Path) -> Path:
    """A checkpoint dir, a run's ``checkpoints/`` dir, or a run dir -> the checkpoint dir."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        found = latest(candidate)
        if found is not None:
            return found
    if (p / "trainer_state.json").exists() or (p / "generator" / "config.json").exists():
        return p
    raise ValueError(f"--checkpoint/--resume: no checkpoint found at {p}")
