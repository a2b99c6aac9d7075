"""Outputs of deterministic stages kept on disk: the teacher pairs and the one-step stage's G.

An entry is a safetensors file ``<kind>/<key>.safetensors`` whose key hashes everything that
changes the output (the config parts the stage reads, its input weights and data, and for the
one-step stage its code), so an entry is never stale: what changes it changes its name. Entries
live in the user's cache, ``$NITRO_CACHE`` (default ``~/.cache/nitro_dist``). A task's own model
folder may carry a read-only ``cache/`` of entries computed from its weights, looked up after
the user's cache: the digits task ships its default run's (seed 0, 2 workers on CPU), so a fresh
clone's first ``make train`` skips both stages and ends with the figures the stages would give.

Writes are atomic (a temporary file renamed into place, so concurrent ranks sharing a disk write
the same bytes safely); a torn entry in the user's cache is removed and made again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, safe_open, save_file

if TYPE_CHECKING:
    from nitro_dist.tasks import Task

SHIPPED_SUBDIR = "cache"  # in a task's model folder


def cache_dir() -> Path:
    return Path(os.environ.get("NITRO_CACHE", Path.home() / ".cache" / "nitro_dist"))


def shipped_folders(task: Task, model_source: str) -> list[Path]:
    """The task's shipped cache folder, when the run uses the task's own models."""
    folder = task.model_dir() if model_source == "task" else None
    return [] if folder is None else [folder / SHIPPED_SUBDIR]


def find(
    kind: str, key: str, shipped: Sequence[Path] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of entry ``kind/key``: the user's cache first, then each shipped
    folder; None when no readable entry exists."""
    mine = cache_dir() / kind / f"{key}.safetensors"
    for path in [mine, *(d / kind / f"{key}.safetensors" for d in shipped)]:
        if not path.exists():
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path)), metadata
        except Exception:  # a torn file (a write cut short before the rename cannot leave one)
            if path == mine:
                path.unlink(missing_ok=True)
    return None


def store(
    kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write entry ``kind/key`` into the user's cache; returns its path."""
    path = cache_dir() / kind / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    tmp.replace(path)
    return path


def hash_tensors(h: hashlib._Hash, tensors: Iterable[torch.Tensor]) -> None:
    """Every byte of each tensor (and its shape and dtype) into ``h``."""
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def hash_module(h: hashlib._Hash, module: torch.nn.Module) -> None:
    """A module's weights into ``h``: trainable parameters in full (they are few when frozen
    weights are many, as with LoRA), the frozen ones sampled (their names and shapes, and the
    first 4 KiB of every 16th): enough to tell two checkpoints apart without reading 10 GB."""
    named = list(module.named_parameters())
    for i, (name, p) in enumerate(named):
        h.update(f"{name} {tuple(p.shape)} {p.dtype} {p.requires_grad}".encode())
        if p.requires_grad:
            hash_tensors(h, [p])
        elif i % 16 == 0:
            h.update(p.detach().float().cpu().reshape(-1)[:1024].numpy().tobytes())
