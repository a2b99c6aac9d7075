"""The checkpoint layout: names, completeness, finding the newest one (no training code).

Inference, serving, eval and export read checkpoints through this module alone; the training
side (``checkpoint``) writes the parts.

Layout (DESIGN.md §3)::

    iter_000500/             (Ray Train runs report their checkpoints under this name too)
      generator/           diffusers save_pretrained (safetensors): loads with
                           UNet2DConditionModel.from_pretrained
      generator_ema/       the same for the EMA weights, when EMA is on
      scheduler/           NitroLCMScheduler config (with the shift)
      optimizer/           G's optimizer state (safetensors + json)
      pool/                manifest.json + head_000123.safetensors (weights + AdamW state)
      deepspeed/engine.json  DeepSpeed engine counters and ZeRO stage (when G ran under DeepSpeed)
      ranks/rank_00000.json  one per rank that wrote its part (heads it owned): completeness
      trainer_state.json   iteration, images seen, data cursor, seed, world size
      config.yaml          the resolved config
    latest                 name of the newest complete checkpoint (single-process runs; Ray runs
                           are found by scanning for complete ``iter_*`` folders)

G's optimizer state is consolidated (full tensors per parameter) and heads are stored by global id,
so a checkpoint resumes under any ZeRO stage and on any number of ranks. Only safetensors and
JSON/YAML are read back: no pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

LATEST = "latest"
GENERATOR, GENERATOR_EMA, SCHEDULER = "generator", "generator_ema", "scheduler"


def is_remote(url: str) -> bool:
    """An object-storage URL (s3://...), as opposed to a local path."""
    return "://" in url and not url.startswith("file://")


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
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/`` or a Ray Train
    run folder), if any."""
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if path.is_dir():
            return path
    done = [p for p in root.glob("iter_*") if p.is_dir() and not missing_parts(p)]
    return max(done, key=lambda p: p.name) if done else None


def missing_parts(path: Path | str, fs: Any = None) -> list[str]:
    """What a checkpoint folder lacks to be complete (empty list: complete). ``fs``: the fsspec
    filesystem holding ``path`` (default: local), so object-storage checkpoints check the same."""
    if fs is None:
        import fsspec

        fs = fsspec.filesystem("file")
    state_file = f"{path}/trainer_state.json"
    if not fs.exists(state_file):
        return ["trainer_state.json"]
    world = int(json.loads(fs.cat_file(state_file)).get("world_size", 1))
    if not fs.exists(f"{path}/ranks"):
        return []
    missing = [f"ranks/rank_{r:05d}.json" for r in range(world)]
    return [m for m in missing if not fs.exists(f"{path}/{m}")]


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


def generator_dir(path: Path, use_ema: bool = True) -> Path:
    """The weights to sample with: the EMA when there is one and ``use_ema``."""
    ema = path / GENERATOR_EMA
    return ema if use_ema and ema.exists() else path / GENERATOR
