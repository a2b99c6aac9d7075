"""One NitroFusion iteration: its phases as plain functions, and ``train_step`` that runs them.

The phases leave optimisation to the caller (G's ``GUpdate``: plain AdamW or a DeepSpeed engine;
the heads' ``Pool``: local or sharded over ranks), so the same functions run on one process and
under Ray Train. ``train_step`` is the whole iteration on one rank:

    draws = draw_iteration_noise(...)
    g = generator_turn(...)        # heads frozen; backbone with grad into x0_fake
    g.loss.backward()
    d = discriminator_turn(...)    # backbone under no_grad; only the active heads learn
    d.loss.backward()
    all finite on every rank? step G, EMA, step heads, refresh heads : update nothing
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nitro_dist import losses, optim, rng
from nitro_dist.data.pairs import global_batch_indices, rank_slice, teacher_x0
from nitro_dist.diffusion import StudentDenoiser, add_noise, seeded_noise
from nitro_dist.discriminator.backbone import backbone_features
from nitro_dist.discriminator.heads import Head, crop, head_scores
from nitro_dist.discriminator.pool import Draw, PoolLayout, refresh_ids, sample_active
from nitro_dist.distributed.parallel import all_ranks_agree
from nitro_dist.models.text import Cond
from nitro_dist.timing import NO_TIMER, Timer

if TYPE_CHECKING:
    from nitro_dist.build import Run
    from nitro_dist.config import Config


@dataclass
class Batch:
    x_T: torch.Tensor  # B x C x H x W initial noise
    x0_real: torch.Tensor  # the teacher's x0 from the same x_T and prompt
    cond: Cond
    uncond: Cond  # empty-prompt conditioning, batch-sized (local_uncond heads)

    def slice(self, sl: slice) -> Batch:
        """A micro-batch (gradient accumulation)."""
        return Batch(self.x_T[sl], self.x0_real[sl], self.cond.index(sl), self.uncond.index(sl))


@dataclass
class IterationNoise:
    """Every rank-local random draw of one iteration, from the (seed, iteration, rank) stream."""

    k_B: torch.Tensor  # refinement step per sample, 1-based; on the CPU (branching needs no sync)
    renoise_KBCHW: torch.Tensor  # fresh noise for the backward simulation, one per earlier step
    eps_BCHW: torch.Tensor  # the same epsilon re-noises real and fake to t*
    crops: dict[int, tuple[int, int]] = field(default_factory=dict)  # head id -> (top, left)
    # t* bucket and t* of each sample (CPU; one value for all with pool.t_star_per=iteration),
    # and each bucket's loss weight (``Draw.bucket_weights``)
    bucket_B: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    t_B: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    bucket_weight: dict[int, float] = field(default_factory=dict)

    def slice(self, sl: slice) -> IterationNoise:
        """The draws of a micro-batch's samples (crops are per head, shared)."""
        return IterationNoise(
            self.k_B[sl],
            self.renoise_KBCHW[:, sl],
            self.eps_BCHW[sl],
            self.crops,
            self.bucket_B[sl],
            self.t_B[sl],
            self.bucket_weight,
        )


def enabled_steps(enable_at: list[int], iteration: int) -> list[int]:
    """Refinement steps k (1-based) sampled at ``iteration`` (bottom-up schedule)."""
    return [k + 1 for k, start in enumerate(enable_at) if iteration >= start]


def draw_iteration_noise(
    seed: int,
    iteration: int,
    sample_ids: list[int],
    sample_shape: tuple[int, ...],
    steps: list[int],
    draw: Draw,
    layout: PoolLayout,
    device: torch.device | str = "cpu",
    k_weights: list[float] | None = None,
) -> IterationNoise:
    """Every random draw of one iteration. Per-sample draws are keyed by (seed, iteration,
    position of the sample in the global batch): ranks get distinct noise, and a run on W ranks
    draws exactly what a run on one rank draws for the same global batch. Crops are keyed by
    (seed, iteration) alone: every rank uses the same crop for a head. Step k is drawn from
    ``steps`` uniformly, or in proportion to ``k_weights[k - 1]`` (refinement.k_weights). Each
    sample's t* (bucket) is the draw's, for its position in the global batch."""
    probs = None
    if k_weights and len({k_weights[k - 1] for k in steps}) > 1:
        probs = torch.tensor([float(k_weights[k - 1]) for k in steps], dtype=torch.float64)
    ks, renoise, eps = [], [], []
    for sid in sample_ids:
        g = rng.keyed_generator(seed, iteration, rng.NOISE, sid)
        if probs is None:  # uniform: one randint, as before the key existed
            ks.append(steps[int(torch.randint(len(steps), (1,), generator=g))])
        else:
            ks.append(steps[int(torch.multinomial(probs, 1, generator=g))])
        renoise.append(torch.randn((max(steps) - 1, *sample_shape), generator=g))
        eps.append(torch.randn(sample_shape, generator=g))
    g = rng.keyed_generator(seed, iteration, rng.CROP)
    crops = {}
    for hid in draw.head_ids:
        spec = layout.spec(hid)
        if spec.kind != "global_cond":
            h = layout.level_shapes[spec.level][1]
            top, left = torch.randint(h - spec.in_size + 1, (2,), generator=g).tolist()
            crops[hid] = (top, left)
    # drawn on the CPU (same numbers on any device), then moved next to the batch; k stays on
    # the CPU: the backward simulation branches on it, which on a GPU would wait for the device
    return IterationNoise(
        torch.tensor(ks),
        torch.stack(renoise, dim=1).to(device),
        torch.stack(eps).to(device),
        crops,
        draw.buckets_of(sample_ids),
        draw.t_of(sample_ids),
        draw.bucket_weights(),
    )


@torch.no_grad()
def backward_simulation(
    student: nn.Module,
    denoiser: StudentDenoiser,
    batch: Batch,
    noise: IterationNoise,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t_k} for every sample: the student runs (no grad) the earlier steps of the 4-step
    schedule from x_T and its x0_hat is re-noised to t_k. Returns (x_t, t_B)."""
    ts = torch.tensor(denoiser.timesteps(denoiser.original_steps), device=batch.x_T.device)
    k_B = noise.k_B.cpu()
    x = batch.x_T.clone()
    for j in range(1, int(k_B.max())):
        sel = torch.nonzero(k_B > j).flatten()
        t_sel = ts[j - 1].expand(len(sel))
        x0 = denoiser(student, x[sel], t_sel, batch.cond.index(sel))
        x[sel] = denoiser.renoise(x0, noise.renoise_KBCHW[j - 1, sel].to(x), ts[j].expand(len(sel)))
    return x, ts[k_B - 1]


def _features(
    teacher: nn.Module,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t_B: torch.Tensor,
    abar: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    ckpt: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Backbone features of x0 noised to each sample's t* (with and without the prompt)."""
    t_B = t_B.to(x0.device)
    x_t = add_noise(x0, eps, t_B, abar)
    fc = backbone_features(teacher, x_t, t_B, cond, activation_checkpointing=ckpt)
    fu = None
    if uncond is not None:
        fu = backbone_features(teacher, x_t, t_B, uncond, activation_checkpointing=ckpt)
    return fc, fu


@dataclass
class Scores:
    """The active heads' judgements of one set of backbone features."""

    per_head: list[torch.Tensor]  # heads that judged samples here, by id
    weights: list[float] | None  # their loss weights (None: all 1, every head judged)
    num_heads: int  # active heads

    def g_loss(self, kind: str) -> torch.Tensor:
        return losses.g_loss(self.per_head, kind, self.weights, self.num_heads)


def judge(
    heads: dict[int, Head],
    layout: PoolLayout,
    feats_c: list[torch.Tensor],
    feats_u: list[torch.Tensor] | None,
    noise: IterationNoise,
) -> Scores:
    """Scores of every active head (sorted by id) on the samples of its t* bucket: all of them
    with one bucket per iteration. With a bucket per sample a head judges only its bucket's
    samples, with weight n / b x the bucket's weight (``Draw.bucket_weights``), and a head none
    of whose samples is in this (micro-)batch judges nothing (its gradient here is zero)."""
    scores: list[torch.Tensor] = []
    weights: list[float] = []
    b = len(noise.bucket_B)
    device = feats_c[0].device
    # the buckets with samples here, once per call: (mask on the features' device, count)
    chosen: dict[int, tuple[torch.Tensor, int]] = {}
    for bucket in noise.bucket_weight:
        mask = noise.bucket_B == bucket
        if n := int(mask.sum()):
            chosen[bucket] = (mask.to(device), n)
    for hid in sorted(heads):
        spec = layout.spec(hid)
        if spec.bucket not in chosen:  # its bucket has no sample in this (micro-)batch
            continue
        sel, n = chosen[spec.bucket]
        level_feats = feats_u if spec.kind == "local_uncond" else feats_c
        assert level_feats is not None, "local_uncond heads need the unconditional features"
        feats = level_feats[spec.level]
        if n < b:
            feats = feats[sel]
        if spec.kind != "global_cond":
            feats = crop(feats, spec.in_size, *noise.crops[hid])
        scores.append(head_scores(heads[hid], feats, spec.kind))
        weights.append(n / b * noise.bucket_weight[spec.bucket])
    uniform = len(scores) == len(heads) and all(w == 1.0 for w in weights)
    return Scores(scores, None if uniform else weights, len(heads))


def d_loss(real: Scores, fake: Scores, kind: str) -> torch.Tensor:
    return losses.d_loss(real.per_head, fake.per_head, kind, real.weights, real.num_heads)


def _needs_uncond(heads: dict[int, Head], layout: PoolLayout) -> bool:
    return any(layout.spec(h).kind == "local_uncond" for h in heads)


@dataclass
class GTurn:
    loss: torch.Tensor  # adversarial
    x0_fake: torch.Tensor  # detached
    feats_fake: tuple[list[torch.Tensor], list[torch.Tensor] | None]  # detached, reused by D
    regression: torch.Tensor  # paired_k1_loss of the (micro-)batch, with grad into G


def paired_k1_loss(x0_fake: torch.Tensor, x0_real: torch.Tensor, k_B: torch.Tensor) -> torch.Tensor:
    """Paired regression on the 1-step samples: sum over samples with k = 1 of
    ‖x0_fake − x0_teacher‖² / (C·H·W), divided by the batch size (all samples), so micro-batches
    and ranks add up to the global batch's figure. For k = 1, x0_fake is the student's 1-step
    sample from the same x_T as the teacher's x0; for k > 1 the teacher's x0 is no longer
    determined by the re-noised input (init_stage.py), so those samples are left out."""
    one = (k_B == 1).to(device=x0_fake.device, dtype=torch.float32)
    per = ((x0_fake.float() - x0_real.to(x0_fake).float()) ** 2).flatten(1).mean(1)
    return (per * one).sum() / len(per)


def generator_turn(
    student: nn.Module,
    teacher: nn.Module,
    denoiser: StudentDenoiser,
    heads: dict[int, Head],
    layout: PoolLayout,
    batch: Batch,
    noise: IterationNoise,
    *,
    loss_type: str = "hinge",
    activation_checkpointing: bool = False,
    timer: Timer = NO_TIMER,
) -> GTurn:
    """G turn: x0_fake = G(x_{t_k}); noised to t* with eps; backbone with grad; heads frozen
    (the caller sets requires_grad False on them). Returns G's adversarial loss and its paired
    regression on the 1-step samples (``paired_k1_loss``); the caller weights them
    (loss.g_weight, loss.regression_weight) and backpropagates."""
    with timer("g_backsim"):
        x_t, t_B = backward_simulation(student, denoiser, batch, noise)
    with timer("g_forward"):
        x0_fake = denoiser(student, x_t, t_B, batch.cond)
    uncond = batch.uncond if _needs_uncond(heads, layout) else None
    with timer("backbone"):
        fc, fu = _features(
            teacher,
            x0_fake,
            noise.eps_BCHW.to(x0_fake),
            noise.t_B,
            denoiser.abar,
            batch.cond,
            uncond,
            activation_checkpointing,
        )
    with timer("heads"):
        loss = judge(heads, layout, fc, fu, noise).g_loss(loss_type)
    reg = paired_k1_loss(x0_fake, batch.x0_real, noise.k_B)
    detached = ([f.detach() for f in fc], None if fu is None else [f.detach() for f in fu])
    return GTurn(loss, x0_fake.detach(), detached, reg)


@dataclass
class DTurn:
    loss: torch.Tensor
    acc_real: float
    acc_fake: float


def real_features(
    teacher: nn.Module,
    denoiser: StudentDenoiser,
    heads: dict[int, Head],
    layout: PoolLayout,
    batch: Batch,
    noise: IterationNoise,
    timer: Timer = NO_TIMER,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Backbone features of the teacher's x0 noised with the same eps (no grad)."""
    with torch.no_grad(), timer("backbone"):
        uncond = batch.uncond if _needs_uncond(heads, layout) else None
        return _features(
            teacher,
            batch.x0_real,
            noise.eps_BCHW.to(batch.x0_real),
            noise.t_B,
            denoiser.abar,
            batch.cond,
            uncond,
            False,
        )


def discriminator_turn(
    heads: dict[int, Head],
    layout: PoolLayout,
    feats_real: tuple[list[torch.Tensor], list[torch.Tensor] | None],
    feats_fake: tuple[list[torch.Tensor], list[torch.Tensor] | None],
    noise: IterationNoise,
    *,
    loss_type: str = "hinge",
    timer: Timer = NO_TIMER,
) -> DTurn:
    """D turn on precomputed (no-grad) backbone features: only the heads get gradients."""
    with timer("heads"):
        real = judge(heads, layout, *feats_real, noise)
        fake = judge(heads, layout, *feats_fake, noise)
        acc_r, acc_f = losses.d_accuracy(real.per_head, fake.per_head)
        return DTurn(d_loss(real, fake, loss_type), acc_r, acc_f)


def replay_phases(
    student: nn.Module, teacher: nn.Module, denoiser: StudentDenoiser,
    heads: dict[int, Head], layout: PoolLayout, batch: Batch, noise: IterationNoise,
    *, loss_type: str, d_steps: int, activation_checkpointing: bool,
    grad_accum: int = 1,
) -> None:  # fmt: skip
    """One micro-batch's G turn + backward, real features and D turns with their backwards, in
    ``_train_step``'s order and without optimizer steps: what the FLOP count (perf.py) and the
    memory plan (memory_plan.py) run, on meta/fake or real models."""
    for h in heads.values():
        h.requires_grad_(False)
    g = generator_turn(
        student, teacher, denoiser, heads, layout, batch, noise,
        loss_type=loss_type, activation_checkpointing=activation_checkpointing,
    )  # fmt: skip
    (g.loss / grad_accum if grad_accum > 1 else g.loss).backward()
    for h in heads.values():
        h.requires_grad_(True)
    real = real_features(teacher, denoiser, heads, layout, batch, noise)
    for _ in range(d_steps):
        r = judge(heads, layout, *real, noise)
        f = judge(heads, layout, *g.feats_fake, noise)
        d_loss(r, f, loss_type).backward()


# ---------------------------------------------------------------------------------------------
# the iteration


def make_batch(
    run: Run, iteration: int, rank: int = 0, world_size: int = 1, timer: Timer = NO_TIMER
) -> Batch:
    cfg = run.cfg
    x0 = None
    if run.loader is not None:
        samples = run.loader.next_batch(cfg.train.batch_size // world_size)
        audit(run, iteration, run.loader.cursor.epoch, [s.key for s in samples])
        prompts = [s.prompt for s in samples]
        seeds = torch.tensor([s.noise_seed for s in samples], dtype=torch.long)
        if cfg.teacher.mode == "offline":
            missing = [s.key for s in samples if s.teacher is None]
            if missing:
                from nitro_dist.data.shards import DataError  # webdataset: only with shards

                raise DataError(
                    f"teacher.mode=offline but sample {missing[0]} has no teacher.npy: make pair "
                    "shards with python -m nitro_dist.prepare, or set teacher.mode=online"
                )
            teacher = [s.teacher for s in samples if s.teacher is not None]  # all (checked above)
            x0 = torch.stack(teacher).to(run.device, torch.float32)
    else:
        assert run.train_set is not None  # data.source=task
        idx = global_batch_indices(cfg.seed, iteration, len(run.train_set), cfg.train.batch_size)
        idx = rank_slice(idx, rank, world_size)
        audit(run, iteration, 0, [f"task-{i}" for i in idx.tolist()])
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
    return Batch(x_T, x0, run.conds(prompts), run.conds([""] * len(prompts)))


def audit(run: Run, iteration: int, epoch: int, keys: list[str]) -> None:
    """data.audit_dir: which samples each rank trained on (checks for duplicates/loss): shard
    samples by key, the task's training prompts (data.source=task) as ``task-<index>``."""
    if not run.cfg.data.audit_dir:
        return
    folder = Path(run.cfg.data.audit_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"rank_{run.rank}.txt").open("a") as f:
        f.writelines(f"{epoch} {iteration} {k}\n" for k in keys)


def autocast(run: Run):
    bf16 = run.cfg.train.precision == "bf16"
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16)


def train_step(run: Run, iteration: int, timer: Timer = NO_TIMER) -> dict[str, float]:
    """One iteration on this rank: G turn, D turn, G update, head update, refresh.

    Numeric faults: before anything is updated, G's loss, the D loss and the heads' gradients
    are checked for NaN/inf on every rank and the verdict agreed over ranks (one all-reduce of
    a flag); G's update rule adds its gradient norm (global). A step that is not finite updates
    nothing: not G or its optimizer state, not the EMA, not the heads or their optimizer state,
    no refresh (metric ``skipped`` = 1); the iteration still counts, and every random draw is
    keyed by the iteration, so the run stays deterministic. With ``optim.d_steps_per_g_step`` > 1
    a later D step that is not finite drops the remaining D updates only (the earlier updates
    were finite). ``loop.train`` stops after ``train.max_nonfinite_steps`` in a row.

    ``timer`` names the phases (``timing.PhaseTimer`` measures them; the default does nothing)."""
    with autocast(run):
        return _train_step(run, iteration, timer)


def _train_step(run: Run, iteration: int, timer: Timer) -> dict[str, float]:
    cfg, pool, rank = run.cfg, run.pool, run.rank
    g_lr = optim.scheduled_lr(cfg.optim, cfg.train.iterations, iteration)
    if g_lr is not None:  # optim.lr_schedule / optim.warmup_iterations
        run.g.set_lr(g_lr)
    draw = draw_heads(cfg, run.layout, iteration)
    with timer("pool_gather"):
        pending = pool.start_gather(draw.head_ids)  # the transfer overlaps making the batch
    with timer("data"):
        batch = make_batch(run, iteration, rank, run.world_size, timer)
        b = batch.x_T.shape[0]
        noise = draw_iteration_noise(
            cfg.seed,
            iteration,
            list(range(rank * b, (rank + 1) * b)),
            tuple(batch.x_T.shape[1:]),
            enabled_steps(cfg.refinement.enable_at, iteration),
            draw,
            run.layout,
            run.device,
            cfg.refinement.k_weights,
        )
    micro = micro_slices(b, cfg.train.grad_accum)
    with timer("pool_gather"):
        heads = pending.wait()
    # G turn: heads frozen, gradients flow through the frozen backbone into x0_fake.
    for h in heads.values():
        h.requires_grad_(False)
    poison = iteration in cfg.distributed.nan_at_iterations and rank == cfg.distributed.fail_rank
    g_loss, g_regression, feats_fake = 0.0, 0.0, []
    for sl in micro:
        g = generator_turn(
            run.g.module,
            run.models.teacher,
            run.denoiser,
            heads,
            run.layout,
            batch.slice(sl),
            noise.slice(sl),
            loss_type=cfg.loss.type,
            activation_checkpointing=cfg.model.gradient_checkpointing,
            timer=timer,
        )
        g_regression += g.regression.item() / len(micro)
        loss = g.loss * float("nan") if poison else g.loss  # fault injection (tests, drills)
        total = cfg.loss.g_weight * loss
        if cfg.loss.regression_weight > 0:
            total = total + cfg.loss.regression_weight * g.regression
        with timer("g_backward"):
            run.g.backward(total)
            g_loss += loss.item() / len(micro)
        feats_fake.append(g.feats_fake)
    # D turn: backbone under no_grad (features reused from the G turn for fakes). It does not
    # depend on G's update, so G steps after it: one agreed finite check guards both updates.
    for h in heads.values():
        h.requires_grad_(True)
    feats_real = [
        real_features(
            run.models.teacher,
            run.denoiser,
            heads,
            run.layout,
            batch.slice(sl),
            noise.slice(sl),
            timer=timer,
        )
        for sl in micro
    ]
    gnorm, applied, clean = float("nan"), False, False
    for i in range(cfg.optim.d_steps_per_g_step):
        if i > 0:  # owners stepped: replicas of other ranks' heads must be fetched again
            with timer("pool_gather"):
                heads = pool.gather_active(draw.head_ids)
            for h in heads.values():
                h.requires_grad_(True)
        d_loss = acc_real = acc_fake = 0.0
        for j, (sl, fr, ff) in enumerate(zip(micro, feats_real, feats_fake, strict=True)):
            d = discriminator_turn(
                heads, run.layout, fr, ff, noise.slice(sl), loss_type=cfg.loss.type, timer=timer
            )
            if j == len(micro) - 1:  # gradients leave in buckets as this backward makes them
                pool.watch_grads(heads)
            with timer("d_backward"):
                (d.loss / len(micro)).backward()
                d_loss += d.loss.item() / len(micro)
            acc_real += d.acc_real / len(micro)
            acc_fake += d.acc_fake / len(micro)
        finite = math.isfinite(d_loss) and grads_finite(heads.values())
        if i == 0:
            # G's loss here, G's gradient norm inside g.step (global: the same on every rank)
            ok = all_ranks_agree(finite and math.isfinite(g_loss), run.world_size, run.device)
            with timer("g_optimizer"):
                gnorm, applied = run.g.step(apply=ok)
                if applied and run.ema is not None:
                    decay = optim.ema_decay_at(cfg.optim, iteration)
                    with torch.no_grad(), run.g.full_params() as params:
                        for pe, p in zip(run.ema.parameters(), params, strict=True):
                            if p.requires_grad:  # a LoRA student's frozen base is shared
                                pe.lerp_(p.to(pe.dtype), 1 - decay)
            pool.reduce_and_step(heads, timer, apply=applied)
            clean = applied
        else:  # a later D step that is not finite: it and the rest are dropped, G's step stands
            ok = all_ranks_agree(finite, run.world_size, run.device)
            pool.reduce_and_step(heads, timer, apply=ok)
            clean = ok
        if not ok:
            break
    refreshed: list[int] = []
    if applied:  # a skipped step changes nothing: no refresh either
        with timer("refresh"):
            among = draw.head_ids if cfg.pool.refresh_by == "use" else None
            ids = refresh_ids(run.layout, cfg.seed, iteration, cfg.pool.refresh_rate, among)
            refreshed = pool.refresh(ids, iteration)
    scheduled = {} if g_lr is None else {"g_lr": g_lr}
    return {
        **scheduled,
        "g_loss": g_loss,
        "g_regression_k1": g_regression,
        "d_loss": d_loss,
        "d_acc_real": acc_real,
        "d_acc_fake": acc_fake,
        "g_grad_norm": gnorm,
        "t_star": draw.mean_t,  # the batch's mean with a bucket per sample
        "active_heads": len(draw.head_ids),
        "refreshed_heads": len(refreshed),
        "mean_k": noise.k_B.float().mean().item(),
        "skipped": float(not clean),  # 1: NaN/inf somewhere, updates skipped (see train_step)
    }


def grads_finite(heads: Iterable[nn.Module]) -> bool:
    """Every gradient of ``heads`` is finite (one device sync)."""
    flags = [
        torch.isfinite(p.grad).all() for h in heads for p in h.parameters() if p.grad is not None
    ]
    return bool(torch.stack(flags).all()) if flags else True


def draw_heads(cfg: Config, layout: PoolLayout, iteration: int) -> Draw:
    """The iteration's t* (one, or per sample with pool.t_star_per=sample) and active heads."""
    p = cfg.pool
    per_sample = cfg.train.batch_size if p.t_star_per == "sample" else 0
    return sample_active(layout, cfg.seed, iteration, p.heads_per_slot, p.t_jitter, per_sample)


def micro_slices(batch: int, n: int) -> list[slice]:
    """``n`` equal micro-batches (config validation guarantees divisibility)."""
    assert batch % n == 0, (batch, n)
    m = batch // n
    return [slice(i * m, (i + 1) * m) for i in range(n)]
