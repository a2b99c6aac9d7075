"""One NitroFusion iteration as plain functions: draws, G turn, D turn.

The caller owns optimisation (a local AdamW or a DeepSpeed engine for G; the pool or its
distributed shard for the heads), so the same functions run on one process and under Ray Train:

    draws = draw_iteration_noise(...)
    g = generator_turn(...)        # heads frozen; backbone with grad into x0_fake
    g.loss.backward(); step G
    d = discriminator_turn(...)    # backbone under no_grad; only the active heads learn
    d.loss.backward(); step heads; refresh heads
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nitro_dist import losses, rng
from nitro_dist.discriminator.backbone import backbone_features
from nitro_dist.discriminator.heads import Head, crop, head_scores
from nitro_dist.discriminator.pool import Draw, PoolLayout
from nitro_dist.models.text import Cond
from nitro_dist.sampling import StudentDenoiser, add_noise
from nitro_dist.timing import NO_TIMER, Timer


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

    def slice(self, sl: slice) -> IterationNoise:
        """The draws of a micro-batch's samples (crops are per head, shared)."""
        return IterationNoise(
            self.k_B[sl], self.renoise_KBCHW[:, sl], self.eps_BCHW[sl], self.crops
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
) -> IterationNoise:
    """Every random draw of one iteration. Per-sample draws are keyed by (seed, iteration,
    position of the sample in the global batch): ranks get distinct noise, and a run on W ranks
    draws exactly what a run on one rank draws for the same global batch. Crops are keyed by
    (seed, iteration) alone: every rank uses the same crop for a head."""
    ks, renoise, eps = [], [], []
    for sid in sample_ids:
        g = rng.keyed_generator(seed, iteration, rng.NOISE, sid)
        ks.append(steps[int(torch.randint(len(steps), (1,), generator=g))])
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
    t_star: int,
    abar: torch.Tensor,
    cond: Cond,
    uncond: Cond | None,
    ckpt: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Backbone features of x0 noised to t* (with and without the prompt)."""
    t_B = torch.full((x0.shape[0],), t_star, dtype=torch.long, device=x0.device)
    x_t = add_noise(x0, eps, t_B, abar)
    fc = backbone_features(teacher, x_t, t_B, cond, activation_checkpointing=ckpt)
    fu = None
    if uncond is not None:
        fu = backbone_features(teacher, x_t, t_B, uncond, activation_checkpointing=ckpt)
    return fc, fu


def judge(
    heads: dict[int, Head],
    layout: PoolLayout,
    feats_c: list[torch.Tensor],
    feats_u: list[torch.Tensor] | None,
    crops: dict[int, tuple[int, int]],
) -> list[torch.Tensor]:
    """Scores of every active head (sorted by id) on one set of backbone features."""
    scores = []
    for hid in sorted(heads):
        spec = layout.spec(hid)
        feats = (feats_u if spec.kind == "local_uncond" else feats_c)[spec.level]
        if spec.kind != "global_cond":
            feats = crop(feats, spec.in_size, *crops[hid])
        scores.append(head_scores(heads[hid], feats, spec.kind))
    return scores


def _needs_uncond(heads: dict[int, Head], layout: PoolLayout) -> bool:
    return any(layout.spec(h).kind == "local_uncond" for h in heads)


@dataclass
class GTurn:
    loss: torch.Tensor
    x0_fake: torch.Tensor  # detached
    feats_fake: tuple[list[torch.Tensor], list[torch.Tensor] | None]  # detached, reused by D


def generator_turn(
    student: nn.Module,
    teacher: nn.Module,
    denoiser: StudentDenoiser,
    heads: dict[int, Head],
    layout: PoolLayout,
    batch: Batch,
    noise: IterationNoise,
    draw: Draw,
    *,
    loss_type: str = "hinge",
    activation_checkpointing: bool = False,
    timer: Timer = NO_TIMER,
) -> GTurn:
    """G turn: x0_fake = G(x_{t_k}); noised to t* with eps; backbone with grad; heads frozen
    (the caller sets requires_grad False on them). Returns the loss to backpropagate into G."""
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
            draw.t_star,
            denoiser.abar,
            batch.cond,
            uncond,
            activation_checkpointing,
        )
    with timer("heads"):
        scores = judge(heads, layout, fc, fu, noise.crops)
        loss = losses.g_loss(scores, loss_type)
    detached = ([f.detach() for f in fc], None if fu is None else [f.detach() for f in fu])
    return GTurn(loss, x0_fake.detach(), detached)


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
    draw: Draw,
    timer: Timer = NO_TIMER,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Backbone features of the teacher's x0 noised with the same eps (no grad)."""
    with torch.no_grad(), timer("backbone"):
        uncond = batch.uncond if _needs_uncond(heads, layout) else None
        return _features(
            teacher,
            batch.x0_real,
            noise.eps_BCHW.to(batch.x0_real),
            draw.t_star,
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
        real = judge(heads, layout, *feats_real, noise.crops)
        fake = judge(heads, layout, *feats_fake, noise.crops)
        acc_r, acc_f = losses.d_accuracy(real, fake)
        return DTurn(losses.d_loss(real, fake, loss_type), acc_r, acc_f)
