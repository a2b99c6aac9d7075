"""Checkpoints: a set of named stateful parts, written to a temp dir and renamed into place.

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
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from nitro_dist.config import dump_yaml
from nitro_dist.discriminator.pool import HeadPool

if TYPE_CHECKING:
    from nitro_dist.loop import Run

LATEST = "latest"


# ---------------------------------------------------------------------------------------------
# optimizer state <-> safetensors + json


# param_group keys that choose an implementation, not the maths: a checkpoint does not set them
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


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
    # fused (and capturable) AdamW keep the step count next to the parameter, the others on CPU
    step_on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for i, p in enumerate(params):
        state = {}
        head = f"{prefix}{i}."
        for key, v in tensors.items():
            if key.startswith(head):
                name = key[len(head) :]
                if name == "step":
                    state[name] = v.to(p.device if step_on_device else "cpu", torch.float32)
                else:
                    state[name] = v.to(p.device)
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
            if k in IMPLEMENTATION_KEYS:  # how AdamW runs is the config's choice (optim.fused)
                continue
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


# ---------------------------------------------------------------------------------------------
# a training run's checkpoint (every rank writes its part)


def write_run_checkpoint(run: Run, folder: Path) -> None:
    """This rank's part of a checkpoint into ``folder``. Every rank calls it: under ZeRO the
    generator's weights and optimizer state are gathered (collective); rank 0 writes them, each
    rank writes the heads it owns."""
    from nitro_dist.evaluation import scheduler_for

    it, lead = run.state["iteration"], run.rank == 0
    student = run.g.full_module()  # fp32, full (gathered under ZeRO-3: collective)
    run.g.save(folder / "optimizer", write=lead)
    if lead:
        student.save_pretrained(folder / "generator", safe_serialization=True)
        if run.ema is not None:
            run.ema.save_pretrained(folder / "generator_ema", safe_serialization=True)
        scheduler_for(run).save_pretrained(folder / "scheduler")
        write_pool_manifest(run.pool.local, folder / "pool", it)
        engine = run.g.engine_state()
        if engine:
            (folder / "deepspeed").mkdir(parents=True, exist_ok=True)
            write_json(folder / "deepspeed" / "engine.json", engine)
        write_json(
            folder / "trainer_state.json",
            {
                **run.state,
                "seed": run.cfg.seed,
                "data_cursor": run.loader.state() if run.loader is not None else it,
                "world_size": run.world_size,
            },
        )
        (folder / "config.yaml").write_text(dump_yaml(run.cfg))
    save_pool(run.pool.local, folder / "pool")
    (folder / "ranks").mkdir(parents=True, exist_ok=True)
    write_json(
        folder / "ranks" / f"rank_{run.rank:05d}.json",
        {
            "rank": run.rank,
            "world_size": run.world_size,
            "heads": list(run.pool.local.owned),
            "pool_params": sum(p.numel() for p in run.pool.local.heads.parameters()),
            "pool_numel": run.pool.local.numel(),  # parameters + AdamW state this rank held
        },
    )


def load_run_weights(run: Run, path: Path) -> None:
    """G, EMA and trainer state: before G is wrapped (DeepSpeed partitions what it is given)."""
    from diffusers import UNet2DConditionModel

    missing = missing_parts(path)
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    state = json.loads((path / "trainer_state.json").read_text())
    loaded = UNet2DConditionModel.from_pretrained(path / "generator", use_safetensors=True)
    run.models.student.load_state_dict(loaded.state_dict())
    if run.ema is not None and (path / "generator_ema").exists():
        ema = UNet2DConditionModel.from_pretrained(path / "generator_ema", use_safetensors=True)
        run.ema.load_state_dict(ema.state_dict())
    run.state = {"iteration": state["iteration"], "images_seen": state["images_seen"]}
    if isinstance(state.get("data_cursor"), dict):
        run.state["data_cursor"] = state["data_cursor"]


def load_run_states(run: Run, path: Path) -> None:
    """The heads this rank owns and G's optimizer state: after the pool is sharded and G wrapped."""
    load_pool(run.pool.local, path / "pool")
    run.g.load(path / "optimizer")
    engine = path / "deepspeed" / "engine.json"
    if engine.exists():
        run.g.load_engine_state(json.loads(engine.read_text()))


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
