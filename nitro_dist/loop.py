"""The training loop: build everything from the config, iterate, log, checkpoint.

``train`` runs on one process (``LocalSession``) or as a Ray Train worker
(``nitro_dist.distributed.ray_train.RaySession`` shards the pool and wraps G in DeepSpeed); this
module never imports ray or deepspeed, so the library runs without them (nor webdataset: the
shard loader is imported when ``data.source=shards``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from nitro_dist.evaluation import evaluate, generator_for_eval, save_sample_grids
from nitro_dist.models.builders import Models, build_models
from nitro_dist.models.text import Cond
from nitro_dist.optim import adamw
from nitro_dist.run_log import MetricsLogger, progress_line, say
from nitro_dist.sampling import StudentDenoiser, TeacherSampler, seeded_noise
from nitro_dist.timing import NO_TIMER, Timer

if TYPE_CHECKING:
    from nitro_dist.data.loader import ShardLoader

TRAIN_SEED_OFFSET = 1_000_000  # training pairs use noise seeds offset + i


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


class TorchUpdate:
    """G's update on one process: plain AdamW, clipping, optional gradient averaging over ranks
    (``grad_sync``). ``distributed.engine.DeepSpeedUpdate`` is the same interface under ZeRO."""

    def __init__(
        self,
        student: torch.nn.Module,
        cfg: Config,
        grad_sync: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        o = cfg.optim
        self.student, self.grad_clip, self.accum = student, o.grad_clip, cfg.train.grad_accum
        self.optimizer = adamw(student.parameters(), o)
        self.grad_sync = grad_sync

    @property
    def module(self) -> torch.nn.Module:
        return self.student

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> float:
        if self.grad_sync is not None:
            self.grad_sync(self.student)
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @contextlib.contextmanager
    def full_params(self) -> Iterator[list[torch.nn.Parameter]]:
        yield list(self.student.parameters())

    def full_module(self) -> torch.nn.Module:
        return self.student

    def save(self, folder: Path, write: bool) -> None:
        if write:
            ckpt.save_optimizer(self.optimizer, list(self.student.parameters()), folder)

    def load(self, folder: Path) -> None:
        ckpt.load_optimizer(self.optimizer, list(self.student.parameters()), folder)

    def engine_state(self) -> dict[str, Any]:
        return {}

    def load_engine_state(self, state: dict[str, Any]) -> None:
        pass


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
    g: TorchUpdate | None = None  # or a distributed.engine.DeepSpeedUpdate (same interface)
    rank: int = 0
    world_size: int = 1
    ema: torch.nn.Module | None = None
    loader: ShardLoader | None = None  # data.source=shards
    state: dict[str, Any] = field(default_factory=lambda: {"iteration": 0, "images_seen": 0})


def training_prompts(cfg: Config) -> PromptSet:
    n = cfg.teacher.offline_pairs
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return PromptSet(prompts, torch.arange(n, dtype=torch.long) + TRAIN_SEED_OFFSET + cfg.seed * n)


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
    ``models`` = prebuilt models (benchmarks), else built from ``cfg.model``."""
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
    train_set = training_prompts(cfg)
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
        )
    elif tcfg.mode == "offline":
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
            )
    run = Run(cfg, models, device, denoiser, teacher_sampler, layout, conds, train_set, x0)
    run.loader = loader
    run.rank, run.world_size = rank, world_size
    run.pool = HeadPool(layout, cfg.pool, cfg.seed, owned_heads).to(device)
    run.g = TorchUpdate(models.student, cfg)
    if cfg.optim.ema_decay > 0:
        run.ema = copy.deepcopy(models.student).requires_grad_(False).eval()
    if cfg.train.compile:  # in place: parameters and state_dict keys stay as they were
        t = cfg.train
        mode = t.compile_mode if t.compile_backend == "inductor" else None
        models.student.compile(backend=t.compile_backend, mode=mode)
    return run


def make_batch(
    run: Run, iteration: int, rank: int = 0, world_size: int = 1, timer: Timer = NO_TIMER
) -> S.Batch:
    cfg = run.cfg
    x0 = None
    if run.loader is not None:
        samples = run.loader.next_batch(cfg.train.batch_size // world_size)
        audit(run, iteration, samples)
        prompts = [s.prompt for s in samples]
        seeds = torch.tensor([s.noise_seed for s in samples], dtype=torch.long)
        if cfg.teacher.mode == "offline":
            missing = [s.key for s in samples if s.teacher is None]
            if missing:
                from nitro_dist.data.shards import DataError

                raise DataError(
                    f"teacher.mode=offline but sample {missing[0]} has no teacher.npy: make pair "
                    "shards with python -m nitro_dist.prepare, or set teacher.mode=online"
                )
            x0 = torch.stack([s.teacher for s in samples]).to(run.device, torch.float32)
    else:
        idx = global_batch_indices(cfg.seed, iteration, len(run.train_set), cfg.train.batch_size)
        idx = rank_slice(idx, rank, world_size)
        prompts = [run.train_set.prompts[i] for i in idx]
        seeds = run.train_set.seeds[idx]
        if run.x0_offline is not None:
            x0 = run.x0_offline[idx].to(run.device)
    x_T = seeded_noise(seeds.tolist(), run.models.sample_shape).to(run.device)
    if x0 is None:
        with timer("teacher"):
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


def audit(run: Run, iteration: int, samples: list) -> None:
    """data.audit_dir: which samples each rank trained on (checks for duplicates/loss)."""
    if not run.cfg.data.audit_dir:
        return
    folder = Path(run.cfg.data.audit_dir)
    folder.mkdir(parents=True, exist_ok=True)
    epoch = run.loader.cursor.epoch
    with (folder / f"rank_{run.rank}.txt").open("a") as f:
        f.writelines(f"{epoch} {iteration} {s.key}\n" for s in samples)


def autocast(run: Run):
    bf16 = run.cfg.train.precision == "bf16"
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16)


def train_step(run: Run, iteration: int, timer: Timer = NO_TIMER) -> dict[str, float]:
    """One iteration on this rank: G turn, G update, D turn, head update, refresh.

    ``timer`` names the phases (``timing.PhaseTimer`` measures them; the default does nothing)."""
    with autocast(run):
        return _train_step(run, iteration, timer)


def _train_step(run: Run, iteration: int, timer: Timer) -> dict[str, float]:
    cfg, pool, rank = run.cfg, run.pool, run.rank
    draw = sample_active(
        run.layout, cfg.seed, iteration, cfg.pool.heads_per_slot, cfg.pool.t_jitter
    )
    with timer("pool_gather"):
        pending = pool.start_gather(draw.head_ids)  # the transfer overlaps making the batch
    with timer("data"):
        batch = make_batch(run, iteration, rank, run.world_size, timer)
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
    micro = micro_slices(b, cfg.train.grad_accum)
    with timer("pool_gather"):
        heads = pending.wait()
    # G turn: heads frozen, gradients flow through the frozen backbone into x0_fake.
    for h in heads.values():
        h.requires_grad_(False)
    g_loss, feats_fake = 0.0, []
    for sl in micro:
        g = S.generator_turn(
            run.g.module,
            run.models.teacher,
            run.denoiser,
            heads,
            run.layout,
            batch.slice(sl),
            noise.slice(sl),
            draw,
            loss_type=cfg.loss.type,
            activation_checkpointing=cfg.model.gradient_checkpointing,
            timer=timer,
        )
        with timer("g_backward"):
            run.g.backward(cfg.loss.g_weight * g.loss)
            g_loss += g.loss.item() / len(micro)
        feats_fake.append(g.feats_fake)
    with timer("g_optimizer"):
        gnorm = run.g.step()
        if run.ema is not None:
            with torch.no_grad(), run.g.full_params() as params:
                for pe, p in zip(run.ema.parameters(), params, strict=True):
                    pe.lerp_(p.to(pe.dtype), 1 - cfg.optim.ema_decay)
    # D turn: backbone under no_grad (features reused from the G turn for fakes).
    for h in heads.values():
        h.requires_grad_(True)
    feats_real = [
        S.real_features(
            run.models.teacher,
            run.denoiser,
            heads,
            run.layout,
            batch.slice(sl),
            noise.slice(sl),
            draw,
            timer=timer,
        )
        for sl in micro
    ]
    for i in range(cfg.optim.d_steps_per_g_step):
        if i > 0:  # owners stepped: replicas of other ranks' heads must be fetched again
            with timer("pool_gather"):
                heads = pool.gather_active(draw.head_ids)
            for h in heads.values():
                h.requires_grad_(True)
        d_loss = acc_real = acc_fake = 0.0
        for j, (sl, fr, ff) in enumerate(zip(micro, feats_real, feats_fake, strict=True)):
            d = S.discriminator_turn(
                heads, run.layout, fr, ff, noise.slice(sl), loss_type=cfg.loss.type, timer=timer
            )
            if j == len(micro) - 1:  # gradients leave in buckets as this backward makes them
                pool.watch_grads(heads)
            with timer("d_backward"):
                (d.loss / len(micro)).backward()
                d_loss += d.loss.item() / len(micro)
            acc_real += d.acc_real / len(micro)
            acc_fake += d.acc_fake / len(micro)
        pool.reduce_and_step(heads, timer)
    with timer("refresh"):
        refreshed = pool.refresh(
            refresh_ids(run.layout, cfg.seed, iteration, cfg.pool.refresh_rate), iteration
        )
    return {
        "g_loss": g_loss,
        "d_loss": d_loss,
        "d_acc_real": acc_real,
        "d_acc_fake": acc_fake,
        "g_grad_norm": gnorm,
        "t_star": draw.t_star,
        "active_heads": len(draw.head_ids),
        "refreshed_heads": len(refreshed),
        "mean_k": noise.k_B.float().mean().item(),
    }


def micro_slices(batch: int, n: int) -> list[slice]:
    """``n`` equal micro-batches (config validation guarantees divisibility)."""
    assert batch % n == 0, (batch, n)
    m = batch // n
    return [slice(i * m, (i + 1) * m) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# the loop


class LocalSession:
    """One process: checkpoints committed into ``run_dir/checkpoints`` with a ``latest`` pointer.

    ``distributed.ray_train.RaySession`` is the same interface for Ray Train workers: it shards
    the pool, wraps G in DeepSpeed and reports checkpoints to Ray Train.
    """

    rank, world_size = 0, 1

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir, self.root, self.keep = run_dir, run_dir / "checkpoints", keep

    @contextlib.contextmanager
    def restore(self, resume: Path | None) -> Iterator[Path | None]:
        yield resume if resume is not None else ckpt.latest(self.root)

    def parallelize(self, run: Run) -> None:
        pass  # the pool and G as build_run made them

    def check_fault(self, iteration: int) -> None:
        pass

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def report(self, metrics: dict[str, Any]) -> None:
        pass

    def save(self, run: Run, metrics: dict[str, Any]) -> Path:
        it = run.state["iteration"]
        tmp = ckpt.begin(self.root, it)
        ckpt.write_run_checkpoint(run, tmp)
        return ckpt.commit(self.root, tmp, it, self.keep)

    def has_checkpoint(self, iteration: int) -> bool:
        found = ckpt.latest(self.root)
        return found is not None and found.name == ckpt.checkpoint_name(iteration)

    def sync(self) -> None:
        pass  # run files are written in place


def train(
    cfg: Config, run_dir: Path, resume: Path | None = None, session: Any = None
) -> dict[str, Any]:
    """Train; returns the final metrics. Rank 0 writes into ``run_dir``: config.yaml,
    metrics.jsonl, samples/*.png, final_metrics.json (and, single-process, checkpoints/).
    ``session`` = how this process takes part (default: ``LocalSession``, one process)."""
    session = session if session is not None else LocalSession(run_dir, cfg.train.keep_checkpoints)
    rank, world = session.rank, session.world_size
    lead = rank == 0
    progress = cfg.logging.progress and lead
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    run = build_run(
        cfg,
        rank=rank,
        world_size=world,
        owned_heads=None if world == 1 else [],
        progress=progress,
    )
    with session.restore(resume) as path:
        if path is not None:
            ckpt.load_run_weights(run, path)  # before DeepSpeed partitions G
            if run.loader is not None:
                run.loader.seek(run.state.get("data_cursor"))
        session.parallelize(run)
        if path is not None:
            ckpt.load_run_states(run, path)
            if lead:
                say(f"resumed from {path} at iteration {run.state['iteration']}")
    logger = MetricsLogger(run_dir, cfg) if lead else None
    tr = cfg.train
    if run.state["iteration"] == 0 and tr.sample_every:
        unet = generator_for_eval(run)
        if lead:
            save_sample_grids(run, run_dir / "samples", "iter_000000", unet)
    bar = tqdm(
        range(run.state["iteration"], tr.iterations),
        desc="distill",
        unit="it",
        initial=run.state["iteration"],
        total=tr.iterations,
        disable=not (progress and sys.stderr.isatty()),
    )
    t_last, n_last = time.time(), run.state["images_seen"]
    for it in bar:
        session.check_fault(it)
        metrics = train_step(run, it)
        run.state = {"iteration": it + 1, "images_seen": run.state["images_seen"] + tr.batch_size}
        done, seen = it + 1, run.state["images_seen"]
        report: dict[str, Any] = {}
        if tr.log_every and done % tr.log_every == 0:
            if run.loader is not None:
                metrics.update(run.loader.metrics())
            metrics = session.reduce(metrics)
            now = time.time()
            metrics["images_per_s"] = (seen - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, seen
            report.update(metrics)
            if lead:
                logger.log(done, seen, metrics)
                bar.set_postfix(
                    g=f"{metrics['g_loss']:.3f}",
                    d=f"{metrics['d_loss']:.3f}",
                    acc=f"{metrics['d_acc_real']:.2f}/{metrics['d_acc_fake']:.2f}",
                )
                if progress and bar.disable:  # job logs: one line per log interval
                    say(progress_line(done, tr.iterations, metrics))
        if tr.sample_every and done % tr.sample_every == 0:
            unet = generator_for_eval(run)
            if lead:
                logger.images(
                    done, save_sample_grids(run, run_dir / "samples", f"iter_{done:06d}", unet)
                )
        if tr.eval_every and done % tr.eval_every == 0 and done < tr.iterations:
            unet = generator_for_eval(run)
            if lead:
                ev = evaluate(run, tr.eval_images, unet)
                logger.log(done, seen, ev)
                report.update(ev)
        if tr.checkpoint_every and done % tr.checkpoint_every == 0 and done < tr.iterations:
            session.save(run, {"iteration": done, "images_seen": seen, **report})
            session.sync()
        elif report:
            session.report({"iteration": done, "images_seen": seen, **report})
    unet = generator_for_eval(run)
    final: dict[str, Any] = {
        "iteration": run.state["iteration"],
        "images_seen": run.state["images_seen"],
    }
    if lead:
        logger.images(
            run.state["iteration"], save_sample_grids(run, run_dir / "samples", "final", unet)
        )
        final.update(evaluate(run, tr.eval_images, unet))
        logger.log(run.state["iteration"], run.state["images_seen"], final)
        (run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        logger.close()
    if not session.has_checkpoint(run.state["iteration"]):  # a rerun of a finished run: no
        final_dir = session.save(run, final)
    else:
        final_dir = None
        session.report(final)
    session.sync()
    if final_dir is not None:
        final["checkpoint"] = str(final_dir)
    return final
