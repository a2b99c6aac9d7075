"""Building a run from its config: models, samplers, pool, G's update rule, data.

``build_run`` makes everything one process needs; ``distributed.parallel.parallelize`` then
applies parallelism from outside (sharded pool, DeepSpeed). This module never imports ray or
deepspeed (nor webdataset: the shard loader is imported when ``data.source=shards``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nitro_dist import lora, retry, stage_cache
from nitro_dist.checkpoint import Parts
from nitro_dist.config import Config, dump_yaml, to_dict
from nitro_dist.data.pairs import PromptSet, precompute_pairs
from nitro_dist.diffusion import NitroLCMScheduler, StudentDenoiser, TeacherSampler
from nitro_dist.discriminator.backbone import level_shapes
from nitro_dist.discriminator.pool import HeadPool, Pool, PoolLayout, make_layout
from nitro_dist.distributed.g_update import GUpdate, TorchUpdate
from nitro_dist.inference import Generator
from nitro_dist.models.builders import Models, build_models
from nitro_dist.models.text import Cond
from nitro_dist.tasks import TRAIN_SEED_OFFSET, Task, task_of

if TYPE_CHECKING:
    from nitro_dist.data.loader import ShardLoader


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


class CondCache:
    """Prompt -> conditioning, encoded once (the text encoders are frozen)."""

    def __init__(self, models: Models, device: torch.device, max_entries: int = 4096) -> None:
        self.models, self.device, self.max_entries = models, device, max_entries
        self.table: dict[str, Cond] = {}
        c, h, w = models.sample_shape
        factor = 8 if models.vae is None else 2 ** (len(models.vae.config.block_out_channels) - 1)
        self.image_hw = (h * factor, w * factor)

    def __call__(self, prompts: list[str]) -> Cond:
        missing = sorted({p for p in prompts if p not in self.table})
        if len(self.table) + len(missing) > self.max_entries:
            self.table.clear()
        for p in missing:
            # One prompt per call: a batched encoder's output differs in the last bits with the
            # batch's other prompts (seen: 2e-7 in SDXL's pooled embedding), and a resumed run
            # meets its prompts in other company than the straight run did. fp32 on the way out:
            # autocast narrows it where the step runs in bf16.
            self.table[p] = self.models.text.encode([p], self.image_hw).to(
                self.device, torch.float32
            )
        return Cond.cat([self.table[p] for p in prompts])


@dataclass
class Run:
    cfg: Config
    models: Models
    device: torch.device
    denoiser: StudentDenoiser
    teacher_sampler: TeacherSampler
    layout: PoolLayout
    conds: CondCache
    train_set: PromptSet | None  # data.source=task
    x0_offline: torch.Tensor | None  # N x C x H x W teacher x0 (offline mode)
    pool: Pool  # HeadPool, or distributed.pool_sync.ShardedPool after parallelize()
    g: GUpdate  # TorchUpdate, or DeepSpeedUpdate after parallelize()
    task: Task
    rank: int = 0
    world_size: int = 1
    node: str = ""  # the Ray node this rank runs on (a Ray Train worker; "" elsewhere)
    ema: torch.nn.Module | None = None
    loader: ShardLoader | None = None  # data.source=shards
    state: dict[str, Any] = field(default_factory=lambda: {"iteration": 0, "images_seen": 0})

    @property
    def sampling_unet(self) -> torch.nn.Module:
        """The weights samples and evaluation use: the EMA when there is one. Every rank reads it
        (under ZeRO-3 G's weights are partitioned and gathering them is collective)."""
        if self.ema is not None:
            return self.ema
        unet = self.g.full_module()
        if unet is self.models.student:
            return unet
        return unet.to(self.device).requires_grad_(False).eval()

    def generator(self, unet: torch.nn.Module) -> Generator:
        """The one sampling path (inference.Generator) over this run's models and ``unet``."""
        return Generator(
            unet, self.models.text, self.scheduler, self.models.vae, self.device, cast=False
        )

    @property
    def scheduler(self) -> NitroLCMScheduler:
        s = self.cfg.sampler
        return NitroLCMScheduler.from_schedule(
            self.models.schedule, s.shift, s.original_inference_steps
        )

    def checkpoint_parts(self) -> Parts:
        it = self.state["iteration"]
        return Parts(
            g=self.g,
            ema=self.ema,
            scheduler=self.scheduler,
            pool=self.pool.local,
            trainer_state={
                **self.state,
                "seed": self.cfg.seed,
                "data_cursor": self.loader.state() if self.loader is not None else it,
                "world_size": self.world_size,
            },
            config_yaml=dump_yaml(self.cfg),
            rank=self.rank,
            world_size=self.world_size,
            node=self.node,
        )


def training_prompts(cfg: Config, task: Task) -> PromptSet:
    """``data.source=task``: the task's prompts with seeded noise (disjoint per seed)."""
    n = cfg.teacher.offline_pairs
    seeds = torch.arange(n, dtype=torch.long) + TRAIN_SEED_OFFSET + cfg.seed * n
    return PromptSet(task.train_prompts(n), seeds)


def models_of(cfg: Config, task: Task | None = None) -> Models:
    """The models ``cfg.model`` names (the task's own for ``model.source=task``)."""
    task = task if task is not None else task_of(cfg)
    task_dir = task.model_dir() if cfg.model.source == "task" else None
    return build_models(cfg.model, cfg.seed, task_dir)


def build_run(
    cfg: Config,
    *,
    rank: int = 0,
    world_size: int = 1,
    owned_heads: list[int] | None = None,
    progress: bool = True,
    models: Models | None = None,
) -> Run:
    """Everything one process needs. ``owned_heads`` = the pool shard (None: all heads);
    ``models`` = prebuilt models (benchmarks), else built from ``cfg.model``. G starts under
    plain torch (``TorchUpdate``) with the whole pool; ``distributed.parallel.parallelize`` shards
    the pool and wraps G in DeepSpeed from outside."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    retry.configure(retry.from_config(cfg.storage))  # every storage call of this process
    device = pick_device(cfg.train.device)
    task = task_of(cfg)
    models = models if models is not None else models_of(cfg, task)
    if cfg.student.lora.rank and not lora.has_adapters(models.student):
        lora.add_adapters(models.student, cfg.student.lora, cfg.seed)
    num_timesteps = int(models.schedule.get("num_train_timesteps", 1000))
    if max(cfg.pool.t_buckets) + cfg.pool.t_jitter >= num_timesteps:
        raise ValueError(
            f"pool.t_buckets: {max(cfg.pool.t_buckets)} (+ t_jitter {cfg.pool.t_jitter}) is "
            f"outside the model's {num_timesteps} training timesteps"
        )
    for m in (models.teacher, models.student, models.text):
        m.to(device)
    if cfg.train.precision == "bf16":
        models.teacher.to(torch.bfloat16)
        models.text.to(torch.bfloat16)
    if models.vae is not None:
        models.vae.to(device)
    if cfg.train.channels_last:
        for m in (models.teacher, models.student):
            m.to(memory_format=torch.channels_last)
    denoiser = StudentDenoiser(
        models.schedule,
        shift=cfg.sampler.shift,
        original_steps=cfg.sampler.original_inference_steps,
    )
    tcfg = cfg.teacher
    teacher_sampler = TeacherSampler.from_config(models.schedule, tcfg)
    conds = CondCache(models, device)
    layout = make_layout(cfg.pool, level_shapes(models.teacher, models.sample_shape, conds([""])))
    train_set = None
    x0 = None
    loader = None
    if cfg.data.source == "shards":
        from nitro_dist.data.loader import ShardLoader
        from nitro_dist.data.shards import list_shards

        d = cfg.data
        loader = ShardLoader(
            list_shards(d.shards),
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer,
            caption_key=d.caption_key,
        )
    else:
        train_set = training_prompts(cfg, task)
    if train_set is not None and tcfg.mode == "offline":
        bf16 = cfg.train.precision == "bf16"  # the teacher is bf16: run it as the step does
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x0 = precompute_pairs(
                models.teacher,
                models.text,
                teacher_sampler,
                train_set,
                models.sample_shape,
                batch_size=tcfg.batch_size,
                device=device,
                progress=progress and rank == 0,
                fingerprint_parts={"teacher": to_dict(tcfg), "schedule": models.schedule},
                rank=rank,
                world_size=world_size,
                shipped=stage_cache.shipped_folders(task, cfg.model.source),
            )
    ema = None
    if cfg.optim.ema_decay > 0:
        # frozen weights (a LoRA student's base) are shared, not copied: the EMA averages
        # what is trained
        shared = {id(p): p for p in models.student.parameters() if not p.requires_grad}
        ema = copy.deepcopy(models.student, shared).requires_grad_(False).eval()
    run = Run(
        cfg=cfg,
        models=models,
        device=device,
        denoiser=denoiser,
        teacher_sampler=teacher_sampler,
        layout=layout,
        conds=conds,
        train_set=train_set,
        x0_offline=x0,
        pool=HeadPool(layout, cfg.pool, cfg.seed, owned_heads).to(device),
        g=TorchUpdate(models.student, cfg),
        task=task,
        rank=rank,
        world_size=world_size,
        ema=ema,
        loader=loader,
    )
    if cfg.train.compile:  # in place: parameters and state_dict keys stay as they were
        t = cfg.train
        mode = t.compile_mode if t.compile_backend == "inductor" else None
        models.student.compile(backend=t.compile_backend, mode=mode)
    return run
