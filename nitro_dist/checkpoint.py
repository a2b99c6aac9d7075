"""Writing and reading a training run's checkpoint: a set of named parts (EDM2's CheckpointIO).

The folder layout, completeness and finding checkpoints live in ``checkpoint_layout`` (what
inference and serving use); this module writes and reads the training state: G's weights
(+ EMA), the exported scheduler, G's consolidated optimizer state, the heads by global id, the
trainer state and the resolved config. Every rank writes its own part (rank 0 the generator, each
rank the heads it owns) and last a ``ranks/rank_XXXXX.json`` listing its files with their sizes and
checksums (``checkpoint_layout.write_part``): a checkpoint counts once every part verifies. Weights
that are not finite are never written (``NonFiniteError``).
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from nitro_dist import lora, optim
from nitro_dist.checkpoint_layout import (
    GENERATOR,
    GENERATOR_EMA,
    GENERATOR_EMA_LORA,
    GENERATOR_LORA,
    SCHEDULER,
    TRAINER_STATE,
    newest_verified,
    verify,
    write_json,
    write_part,
)
from nitro_dist.diffusion import NitroLCMScheduler
from nitro_dist.discriminator.pool import HeadPool
from nitro_dist.distributed.g_update import GUpdate

if TYPE_CHECKING:
    from diffusers import ModelMixin


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf: weights that are not finite, or too many skipped steps."""


class DiskFullError(OSError):
    """A checkpoint did not fit on its disk (ENOSPC / EDQUOT): the run stops; the half-written
    checkpoint is removed and the previous one is left as it was."""


DEV_FULL = "/dev/full"  # writes fail with ENOSPC: the kernel's own full disk, for fault injection


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception chain (safetensors' Rust writer raises its
    own error type with the OS error in the message)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def inject_disk_full(folder: Path) -> None:
    """Fault injection (``distributed.disk_full_at_iteration``): the checkpoint's trainer state
    is written onto /dev/full, so writing it fails with the kernel's ENOSPC."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAINER_STATE).symlink_to(DEV_FULL)


def check_finite(what: str, tensors) -> None:
    """``NonFiniteError`` naming ``what`` when any tensor holds NaN or inf (one sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    if flags and not bool(torch.stack(flags).all()):
        raise NonFiniteError(f"{what}: NaN or inf in the weights; not writing this checkpoint")


# ---------------------------------------------------------------------------------------------
# pool


def save_pool(pool: HeadPool, folder: Path) -> None:
    """One file per owned head, named by global id, so any number of ranks can load it."""
    folder.mkdir(parents=True, exist_ok=True)
    for hid in pool.owned:
        head = pool.head(hid)
        params = list(head.parameters())
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in head.named_parameters()}
        tensors.update(optim.state_tensors(pool.optimizer, params, prefix="optim."))
        save_file(tensors, str(folder / f"head_{hid:06d}.safetensors"))


def write_pool_manifest(pool: HeadPool, folder: Path, iteration: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lay = pool.layout
    manifest = {
        "num_heads": lay.num_heads,
        "iteration": iteration,
        "kinds": list(lay.kinds),
        "t_buckets": list(lay.t_buckets),
        "levels": list(lay.levels),
        "candidates": lay.candidates,
        "width": lay.width,
        "width_ratio": lay.width_ratio,
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
        "width_ratio": lay.width_ratio,
        "depth": lay.depth,
    }
    older = {"width_ratio": 0.0}  # keys manifests written before them lack
    for key, want in expected.items():
        if manifest.get(key, older.get(key)) != want:
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
        optim.load_state_tensors(pool.optimizer, list(head.parameters()), tensors, prefix="optim.")


# ---------------------------------------------------------------------------------------------
# a training run's checkpoint


@dataclass
class Parts:
    """The named parts of a training checkpoint, as this rank holds them."""

    g: GUpdate  # G's weights (full_module) and its optimizer state
    ema: ModelMixin | None
    scheduler: NitroLCMScheduler  # the exported sampler (noise schedule + shift)
    pool: HeadPool  # the heads this rank owns
    trainer_state: dict[str, Any]  # iteration, images_seen, data_cursor, seed, world_size
    config_yaml: str
    rank: int = 0
    world_size: int = 1
    node: str = ""  # the Ray node id of this rank ("" outside Ray)


def write_checkpoint(parts: Parts, folder: Path) -> None:
    """This rank's part of a checkpoint into ``folder``. Every rank calls it: under ZeRO the
    generator's weights and optimizer state are gathered (collective); rank 0 writes them, each
    rank writes the heads it owns, then its part file (last: it marks the part complete)."""
    try:
        _write_checkpoint(parts, folder)
    except Exception as e:
        if not is_disk_full(e):
            raise
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        where = getattr(e, "filename", None) or folder
        raise DiskFullError(
            errno.ENOSPC,
            f"checkpoint {folder}: disk full while writing {where} ({free / 2**20:.1f} MiB free "
            f"there; {type(e).__name__}: {e}). Free space or point distributed.storage_path at a "
            "larger disk",
        ) from e


def _write_checkpoint(parts: Parts, folder: Path) -> None:
    lead = parts.rank == 0
    student = parts.g.full_module()  # fp32, full (gathered under ZeRO-3: collective)
    check_finite(f"checkpoint part of rank {parts.rank}: heads", parts.pool.heads.parameters())
    if lead:
        check_finite("checkpoint: generator", student.parameters())
        if parts.ema is not None:
            check_finite("checkpoint: generator EMA", parts.ema.parameters())
    parts.g.save(folder / "optimizer", write=lead)
    written = [f"pool/head_{hid:06d}.safetensors" for hid in parts.pool.owned]
    if lead and lora.has_adapters(student):  # the adapters only: the base is the config's model
        lora.save_adapters(student, folder / GENERATOR_LORA)
        if parts.ema is not None:
            lora.save_adapters(parts.ema, folder / GENERATOR_EMA_LORA)
    elif lead:
        student.save_pretrained(folder / GENERATOR, safe_serialization=True)
        if parts.ema is not None:
            parts.ema.save_pretrained(folder / GENERATOR_EMA, safe_serialization=True)
    if lead:
        parts.scheduler.save_pretrained(folder / SCHEDULER)
        write_pool_manifest(parts.pool, folder / "pool", parts.trainer_state["iteration"])
        engine = parts.g.engine_state()
        if engine:
            (folder / "deepspeed").mkdir(parents=True, exist_ok=True)
            write_json(folder / "deepspeed" / "engine.json", engine)
        write_json(folder / TRAINER_STATE, parts.trainer_state)
        (folder / "config.yaml").write_text(parts.config_yaml)
        written += [GENERATOR, GENERATOR_EMA, GENERATOR_LORA, GENERATOR_EMA_LORA, SCHEDULER]
        written += ["optimizer", "pool/manifest.json"]
        written += ["deepspeed", TRAINER_STATE, "config.yaml"]
    save_pool(parts.pool, folder / "pool")
    write_part(
        folder,
        parts.rank,
        parts.world_size,
        written,
        {
            "heads": list(parts.pool.owned),
            "pool_params": sum(p.numel() for p in parts.pool.heads.parameters()),
            "pool_numel": parts.pool.numel(),  # parameters + AdamW state this rank held
            "node": parts.node,
        },
    )


def failed_write(tmp: Path, root: Path | None, error: BaseException) -> None:
    """After a checkpoint write into ``tmp`` failed: remove the half-written folder (it frees
    the space it took) and, for a full disk, raise a ``DiskFullError`` that also names the
    previous checkpoint under ``root`` (untouched: it stays the one a resume takes)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if not isinstance(error, DiskFullError):
        return
    prev = newest_verified(str(root), hash_parts=()) if root is not None else None
    if root is None:
        kept = "the checkpoints reported before are untouched (a rerun resumes from the last)"
    elif prev is not None:
        kept = f"the previous checkpoint {prev} is intact (a rerun resumes from it)"
    else:
        kept = "there is no earlier checkpoint"
    raise DiskFullError(errno.ENOSPC, f"{error.strerror}; the run stops here; {kept}") from error


def resume_parts(owned_heads: Sequence[int]) -> list[str]:
    """What a rank owning ``owned_heads`` reads to resume (all it downloads from object storage;
    what ``load_weights`` verifies)."""
    fixed = [GENERATOR, GENERATOR_EMA, GENERATOR_LORA, GENERATOR_EMA_LORA, "optimizer"]
    fixed += ["deepspeed", TRAINER_STATE, "config.yaml"]
    return [*fixed, "pool/manifest.json", *(f"pool/head_{h:06d}.safetensors" for h in owned_heads)]


def load_weights(
    path: Path,
    student: torch.nn.Module,
    ema: torch.nn.Module | None,
    parts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """G and its EMA from ``path``, before G is wrapped (DeepSpeed partitions what it is given);
    returns the trainer state (iteration, images_seen, skipped_steps and, for shard data,
    data_cursor). ``parts``: what this rank reads (``resume_parts``; None: everything), verified
    first."""
    from diffusers import UNet2DConditionModel

    problems = verify(path, parts=parts)
    if problems:
        raise ValueError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
    state = json.loads((path / TRAINER_STATE).read_text())
    saved_lora = (path / GENERATOR_LORA).is_dir()
    if saved_lora != lora.has_adapters(student):
        has, wants = (
            ("LoRA adapters", "a full student") if saved_lora else ("a full student", "LoRA")
        )
        raise ValueError(
            f"checkpoint {path} holds {has} but this config trains {wants}: resume with the "
            "checkpoint's student.lora.rank"
        )
    if saved_lora:  # the base came from the config (build_run); the adapters from here
        lora.load_adapters(student, path / GENERATOR_LORA)
        if ema is not None and (path / GENERATOR_EMA_LORA).exists():
            lora.load_adapters(ema, path / GENERATOR_EMA_LORA)
    else:
        loaded = UNet2DConditionModel.from_pretrained(path / GENERATOR, use_safetensors=True)
        student.load_state_dict(loaded.state_dict())
        if ema is not None and (path / GENERATOR_EMA).exists():
            saved = UNet2DConditionModel.from_pretrained(path / GENERATOR_EMA, use_safetensors=True)
            ema.load_state_dict(saved.state_dict())
    out = {
        "iteration": state["iteration"],
        "images_seen": state["images_seen"],
        "skipped_steps": int(state.get("skipped_steps", 0)),
    }
    if isinstance(state.get("data_cursor"), dict):
        out["data_cursor"] = state["data_cursor"]
    return out


def load_states(path: Path, g: GUpdate, pool: HeadPool) -> None:
    """The heads this rank owns and G's optimizer state: after the pool is sharded and G wrapped."""
    load_pool(pool, path / "pool")
    g.load(path / "optimizer")
    engine = path / "deepspeed" / "engine.json"
    if engine.exists():
        g.load_engine_state(json.loads(engine.read_text()))
