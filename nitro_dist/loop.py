"""The single-process training loop: build everything from the config, iterate, checkpoint.

Ray Train workers (``nitro_dist.distributed``) reuse ``build_run`` and the step functions;
this module never imports ray or deepspeed, so the library runs without them.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nitro_dist import checkpoint as ckpt
from nitro_dist import step as S
from nitro_dist.config import Config, dump_yaml, to_dict
from nitro_dist.data.pairs import (
    PromptSet,
    global_batch_indices,
    precompute_pairs,
    rank_slice,
    teacher_x0,
)
from nitro_dist.digits.data import PROMPTS
from nitro_dist.discriminator.backbone import level_shapes
from nitro_dist.discriminator.pool import (
    HeadPool,
    PoolLayout,
    make_layout,
    refresh_ids,
    sample_active,
)
from nitro_dist.images import save_grid
from nitro_dist.models.builders import Models, build_models
from nitro_dist.models.text import Cond
from nitro_dist.sampling import NitroLCMScheduler, StudentDenoiser, TeacherSampler, seeded_noise

TRAIN_SEED_OFFSET = 1_000_000  # training pairs use noise seeds offset + i
EVAL_SEED_OFFSET = 10_000_000  # evaluation never reuses a training seed


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
        if missing:
            # fp32 on the way out: autocast narrows it where the step runs in bf16
            enc = self.models.text.encode(missing, self.image_hw).to(self.device, torch.float32)
            if len(self.table) + len(missing) > self.max_entries:
                self.table.clear()
            for i, p in enumerate(missing):
                self.table[p] = enc.index(slice(i, i + 1))
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
    train_set: PromptSet
    x0_offline: torch.Tensor | None  # N x C x H x W teacher x0 (offline mode)
    pool: HeadPool | None = None  # or a distributed.pool_sync.ShardedPool (same interface)
    g_opt: torch.optim.Optimizer | None = None
    # Averages G's gradients over ranks (a DDP stand-in; DeepSpeed does it for its engine).
    g_grad_sync: Callable[[torch.nn.Module], None] | None = None
    rank: int = 0
    world_size: int = 1
    ema: torch.nn.Module | None = None
    state: dict[str, Any] = field(default_factory=lambda: {"iteration": 0, "images_seen": 0})


def training_prompts(cfg: Config) -> PromptSet:
    n = cfg.teacher.offline_pairs
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return PromptSet(prompts, torch.arange(n, dtype=torch.long) + TRAIN_SEED_OFFSET + cfg.seed * n)


def build_run(
    cfg: Config,
    *,
    rank: int = 0,
    owned_heads: list[int] | None = None,
    progress: bool = True,
    models: Models | None = None,
) -> Run:
    """Everything one process needs. ``owned_heads`` = the pool shard (None: all heads);
    ``models`` = prebuilt models (benchmarks), else built from ``cfg.model``."""
    if cfg.data.source == "shards":
        raise ValueError(
            "data.source=shards: the WebDataset shard loader is not part of this version yet "
            "(tracked in the data-at-scale issue); use data.source=digits"
        )
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = pick_device(cfg.train.device)
    models = models if models is not None else build_models(cfg.model, cfg.seed)
    for m in (models.teacher, models.student, models.text):
        m.to(device)
    if cfg.train.precision == "bf16":
        models.teacher.to(torch.bfloat16)
        models.text.to(torch.bfloat16)
    if models.vae is not None:
        models.vae.to(device)
    denoiser = StudentDenoiser(
        models.schedule,
        shift=cfg.sampler.shift,
        original_steps=cfg.sampler.original_inference_steps,
    )
    tcfg = cfg.teacher
    teacher_sampler = TeacherSampler(
        models.schedule,
        scheduler=tcfg.scheduler,
        num_steps=tcfg.num_steps,
        guidance_scale=tcfg.guidance_scale,
        timesteps=tcfg.timesteps,
        overrides=tcfg.scheduler_overrides,
    )
    conds = CondCache(models, device)
    layout = make_layout(cfg.pool, level_shapes(models.teacher, models.sample_shape, conds([""])))
    train_set = training_prompts(cfg)
    x0 = None
    if tcfg.mode == "offline":
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
        )
    run = Run(cfg, models, device, denoiser, teacher_sampler, layout, conds, train_set, x0)
    run.pool = HeadPool(layout, cfg.pool, cfg.seed, owned_heads).to(device)
    o = cfg.optim
    run.g_opt = torch.optim.AdamW(
        run.models.student.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
    )
    if o.ema_decay > 0:
        run.ema = copy.deepcopy(models.student).requires_grad_(False).eval()
    return run


def make_batch(run: Run, iteration: int, rank: int = 0, world_size: int = 1) -> S.Batch:
    cfg = run.cfg
    idx = global_batch_indices(cfg.seed, iteration, len(run.train_set), cfg.train.batch_size)
    idx = rank_slice(idx, rank, world_size)
    prompts = [run.train_set.prompts[i] for i in idx]
    seeds = run.train_set.seeds[idx]
    x_T = seeded_noise(seeds.tolist(), run.models.sample_shape).to(run.device)
    if run.x0_offline is not None:
        x0 = run.x0_offline[idx].to(run.device)
    else:
        x0 = teacher_x0(
            run.models.teacher,
            run.models.text,
            run.teacher_sampler,
            prompts,
            seeds,
            run.models.sample_shape,
            run.device,
        )
    return S.Batch(x_T, x0, run.conds(prompts), run.conds([""] * len(prompts)))


def autocast(run: Run):
    bf16 = run.cfg.train.precision == "bf16"
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16)


def train_step(run: Run, iteration: int) -> dict[str, float]:
    """One iteration on this rank: G turn, G update, D turn, head update, refresh."""
    with autocast(run):
        return _train_step(run, iteration)


def _train_step(run: Run, iteration: int) -> dict[str, float]:
    cfg, pool, rank = run.cfg, run.pool, run.rank
    draw = sample_active(
        run.layout, cfg.seed, iteration, cfg.pool.heads_per_slot, cfg.pool.t_jitter
    )
    heads = pool.gather_active(draw.head_ids)
    batch = make_batch(run, iteration, rank, run.world_size)
    b = batch.x_T.shape[0]
    noise = S.draw_iteration_noise(
        cfg.seed,
        iteration,
        list(range(rank * b, (rank + 1) * b)),
        tuple(batch.x_T.shape[1:]),
        S.enabled_steps(cfg.refinement.enable_at, iteration),
        draw,
        run.layout,
        run.device,
    )
    # G turn: heads frozen, gradients flow through the frozen backbone into x0_fake.
    for h in heads.values():
        h.requires_grad_(False)
    g = S.generator_turn(
        run.models.student,
        run.models.teacher,
        run.denoiser,
        heads,
        run.layout,
        batch,
        noise,
        draw,
        loss_type=cfg.loss.type,
        activation_checkpointing=cfg.model.gradient_checkpointing,
    )
    run.g_opt.zero_grad(set_to_none=True)
    (cfg.loss.g_weight * g.loss).backward()
    if run.g_grad_sync is not None:
        run.g_grad_sync(run.models.student)
    gnorm = torch.nn.utils.clip_grad_norm_(run.models.student.parameters(), cfg.optim.grad_clip)
    run.g_opt.step()
    if run.ema is not None:
        with torch.no_grad():
            for pe, p in zip(run.ema.parameters(), run.models.student.parameters(), strict=True):
                pe.lerp_(p, 1 - cfg.optim.ema_decay)
    # D turn: backbone under no_grad (features reused from the G turn for fakes).
    for h in heads.values():
        h.requires_grad_(True)
    feats_real = S.real_features(
        run.models.teacher, run.denoiser, heads, run.layout, batch, noise, draw
    )
    for i in range(cfg.optim.d_steps_per_g_step):
        if i > 0:  # owners stepped: replicas of other ranks' heads must be fetched again
            heads = pool.gather_active(draw.head_ids)
            for h in heads.values():
                h.requires_grad_(True)
        d = S.discriminator_turn(
            heads, run.layout, feats_real, g.feats_fake, noise, loss_type=cfg.loss.type
        )
        d.loss.backward()
        pool.reduce_and_step(heads)
    refreshed = pool.refresh(
        refresh_ids(run.layout, cfg.seed, iteration, cfg.pool.refresh_rate), iteration
    )
    return {
        "g_loss": g.loss.item(),
        "d_loss": d.loss.item(),
        "d_acc_real": d.acc_real,
        "d_acc_fake": d.acc_fake,
        "g_grad_norm": float(gnorm),
        "t_star": draw.t_star,
        "active_heads": len(draw.head_ids),
        "refreshed_heads": len(refreshed),
        "mean_k": noise.k_B.float().mean().item(),
    }


# ---------------------------------------------------------------------------------------------
# sampling, evaluation, checkpoints


def generator_for_eval(run: Run) -> torch.nn.Module:
    return run.ema if run.ema is not None else run.models.student


@torch.no_grad()
def generate(
    run: Run,
    unet: torch.nn.Module,
    prompts: list[str],
    seeds: list[int],
    num_steps: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """Student images for (prompt, seed) pairs; same seed -> same image (per-sample noise)."""
    was_training = unet.training
    unet.eval()
    out = []
    for s in range(0, len(prompts), batch_size):
        sd = seeds[s : s + batch_size]
        x_T = seeded_noise(sd, run.models.sample_shape).to(run.device)
        cond = run.conds(prompts[s : s + batch_size])
        x0 = run.denoiser.sample(
            unet,
            x_T,
            cond,
            num_steps,
            noise_fn=lambda k, sd=sd: seeded_noise(sd, run.models.sample_shape, step=k),
        )
        out.append(decode(run, x0).cpu())
    unet.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def decode(run: Run, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (identity for pixel-space tasks)."""
    vae = run.models.vae
    if vae is None:
        return x0.float().clamp(-1, 1)
    return vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)


def grid_prompts(n_per_prompt: int = 8) -> tuple[list[str], list[int]]:
    prompts = [p for p in PROMPTS for _ in range(n_per_prompt)]
    return prompts, [EVAL_SEED_OFFSET + i for i in range(len(prompts))]


def save_sample_grids(run: Run, folder: Path, tag: str) -> list[Path]:
    per = run.cfg.train.grid_per_prompt
    prompts, seeds = grid_prompts(per)
    paths = []
    for n in (1, 2, 4):
        imgs = generate(run, generator_for_eval(run), prompts, seeds, n)
        scale = max(1, 64 // imgs.shape[-1])
        paths.append(save_grid(imgs, per, folder / f"{tag}_{n}step.png", scale=scale))
    return paths


def evaluate(run: Run, num_images: int) -> dict[str, float]:
    """FID-digits and alignment of the student at 1/2/4 steps (digits-shaped tasks only)."""
    if run.models.sample_shape != (1, 8, 8):
        return {}
    from nitro_dist.digits.metric import DigitsEvaluator

    ev = DigitsEvaluator()
    labels = torch.arange(num_images) % 10
    prompts = [PROMPTS[int(y)] for y in labels]
    seeds = [EVAL_SEED_OFFSET + i for i in range(num_images)]
    out = {}
    for n in (1, 2, 4):
        res = ev.evaluate(generate(run, generator_for_eval(run), prompts, seeds, n), labels)
        out[f"fid_digits_{n}step"] = res["fid_digits"]
        out[f"alignment_{n}step"] = res["alignment"]
    return out


def save_checkpoint(run: Run, root: Path) -> Path:
    it = run.state["iteration"]
    tmp = ckpt.begin(root, it)
    run.models.student.save_pretrained(tmp / "generator", safe_serialization=True)
    if run.ema is not None:
        run.ema.save_pretrained(tmp / "generator_ema", safe_serialization=True)
    scheduler_for(run).save_pretrained(tmp / "scheduler")
    ckpt.save_optimizer(run.g_opt, list(run.models.student.parameters()), tmp / "optimizer")
    ckpt.save_pool(run.pool.local, tmp / "pool")  # a sharded pool saves the heads it owns
    ckpt.write_pool_manifest(run.pool.local, tmp / "pool", it)
    ckpt.write_json(
        tmp / "trainer_state.json", {**run.state, "seed": run.cfg.seed, "data_cursor": it}
    )
    (tmp / "config.yaml").write_text(dump_yaml(run.cfg))
    return ckpt.commit(root, tmp, it, run.cfg.train.keep_checkpoints)


def scheduler_for(run: Run) -> NitroLCMScheduler:
    s = run.models.schedule
    return NitroLCMScheduler(
        num_train_timesteps=int(s.get("num_train_timesteps", 1000)),
        beta_start=float(s.get("beta_start", 0.00085)),
        beta_end=float(s.get("beta_end", 0.012)),
        beta_schedule=s.get("beta_schedule", "scaled_linear"),
        prediction_type=s.get("prediction_type", "epsilon"),
        shift=run.cfg.sampler.shift,
        original_inference_steps=run.cfg.sampler.original_inference_steps,
    )


def load_checkpoint(run: Run, path: Path) -> None:
    """Restore G, its optimizer, EMA, the (owned) pool heads and the trainer state."""
    from diffusers import UNet2DConditionModel

    state = json.loads((path / "trainer_state.json").read_text())
    loaded = UNet2DConditionModel.from_pretrained(path / "generator", use_safetensors=True)
    run.models.student.load_state_dict(loaded.state_dict())
    if run.ema is not None and (path / "generator_ema").exists():
        ema = UNet2DConditionModel.from_pretrained(path / "generator_ema", use_safetensors=True)
        run.ema.load_state_dict(ema.state_dict())
    ckpt.load_optimizer(run.g_opt, list(run.models.student.parameters()), path / "optimizer")
    ckpt.load_pool(run.pool.local, path / "pool")
    run.state = {"iteration": state["iteration"], "images_seen": state["images_seen"]}


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, run_dir: Path, resume: Path | None = None) -> dict[str, Any]:
    """Train on one process; returns the final metrics. Writes into ``run_dir``:
    config.yaml, metrics.jsonl, samples/*.png, checkpoints/ (with ``latest``), final_metrics.json.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    progress = cfg.logging.progress
    run = build_run(cfg, progress=progress)
    ck_root = run_dir / "checkpoints"
    resume = resume if resume is not None else ckpt.latest(ck_root)
    if resume is not None:
        load_checkpoint(run, resume)
        print(f"resumed from {resume} at iteration {run.state['iteration']}", flush=True)
    logger = MetricsLogger(run_dir, cfg)
    if run.state["iteration"] == 0:
        save_sample_grids(run, run_dir / "samples", "iter_000000")
    bar = tqdm(
        range(run.state["iteration"], cfg.train.iterations),
        desc="distill",
        unit="it",
        initial=run.state["iteration"],
        total=cfg.train.iterations,
        disable=not progress,
    )
    t_last, n_last = time.time(), run.state["images_seen"]
    for it in bar:
        metrics = train_step(run, it)
        run.state = {
            "iteration": it + 1,
            "images_seen": run.state["images_seen"] + cfg.train.batch_size,
        }
        done = it + 1
        if cfg.train.log_every and done % cfg.train.log_every == 0:
            now = time.time()
            metrics["images_per_s"] = (run.state["images_seen"] - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, run.state["images_seen"]
            logger.log(done, run.state["images_seen"], metrics)
            bar.set_postfix(
                g=f"{metrics['g_loss']:.3f}",
                d=f"{metrics['d_loss']:.3f}",
                acc=f"{metrics['d_acc_real']:.2f}/{metrics['d_acc_fake']:.2f}",
            )
        if cfg.train.sample_every and done % cfg.train.sample_every == 0:
            logger.images(done, save_sample_grids(run, run_dir / "samples", f"iter_{done:06d}"))
        if (
            cfg.train.eval_every
            and done % cfg.train.eval_every == 0
            and done < cfg.train.iterations
        ):
            logger.log(done, run.state["images_seen"], evaluate(run, cfg.train.eval_images))
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            save_checkpoint(run, ck_root)
    final_dir = save_checkpoint(run, ck_root)
    grids = save_sample_grids(run, run_dir / "samples", "final")
    logger.images(run.state["iteration"], grids)
    final = {"iteration": run.state["iteration"], "images_seen": run.state["images_seen"]}
    final.update(evaluate(run, cfg.train.eval_images))
    logger.log(run.state["iteration"], run.state["images_seen"], final)
    (run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    logger.close()
    final["checkpoint"] = str(final_dir)
    return final


class MetricsLogger:
    """metrics.jsonl always; wandb (offline by default) when ``logging.wandb`` is on."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.run_name,
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=to_dict(cfg),
                resume="allow",
            )

    def log(self, iteration: int, images_seen: int, metrics: dict[str, Any]) -> None:
        if not metrics:
            return
        row = {"iteration": iteration, "images_seen": images_seen, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=iteration)

    def images(self, iteration: int, paths: list[Path]) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log(
                {p.stem.split("_")[-1]: wandb.Image(str(p)) for p in paths}, step=iteration
            )

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
