"""The one-step starting stage: paired regression of G's one-step output onto the teacher's x0.

NitroFusion's GAN stage fine-tunes a model that is *already* a one-step generator (DMD2-1step,
Hyper-SDXL-1step: DESIGN.md §2 "Student"). A task whose only model is the multi-step teacher
(digits) has no such model, so a fresh run first makes one: ``init.iterations`` steps of

    L(θ) = E_k ‖ G_θ(x_{t_k}, t_k) − x0_teacher(x_T, c) ‖²,   k ~ U(init.steps)

where G_θ(x_{t_1}=x_T, t_1) is exactly the student's 1-step sample (the shifted-LCM step at
t = 999 that training and serving use) and x0_teacher is the teacher's sample from the *same* x_T
and prompt (the run's teacher pairs): knowledge distillation of the teacher's deterministic
noise -> image map (Luhman & Luhman 2021), the same paired regression DMD2 adds to its loss. For
k > 1 the input is built as the GAN stage builds it (``step.backward_simulation``: the student's
own earlier steps, re-noised to t_k), so the 2-4 step samples stay trained too. The GAN stage
then starts from that model; the EMA starts from it too.

Batches are the run's own (``step.make_batch``): each rank takes its slice of the global batch and
the ranks average their gradients (one flat all-reduce per step, the loss with them), so W ranks do
the stage about W times faster and end with the same weights as one process (up to the order of
float sums). AdamW (betas 0.9/0.999, no weight decay, the run's gradient clip) with a cosine
decay to zero; the optimizer is dropped afterwards: G's GAN optimizer starts fresh. A resumed
run skips the stage (its G comes from the checkpoint).

The stage is deterministic, so its result is kept (``init.cache``, ``stage_cache``: G's trained
weights and the stage's loss figures) under a key hashing everything that changes it: the config
parts it reads, the number of ranks, the device type and the intra-op threads (the order of float
sums), the student's weights before it, the text encoders, the training prompts, their seeds and
teacher pairs, and the source of the functions it runs. Another run that shares all of these (the
same seed with another pool or GAN setting: an ablation, a Tune trial, a rerun) loads it instead
of training it again, on every rank alike, and ends where the stage would have.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from nitro_dist import diffusion, lora, rng, stage_cache
from nitro_dist.config import to_dict
from nitro_dist.data import pairs
from nitro_dist.distributed.g_update import average_over_ranks
from nitro_dist.step import IterationNoise, autocast, backward_simulation, make_batch

if TYPE_CHECKING:
    from nitro_dist.build import Run

# the stage's batches come from a stream of its own: iteration i of the stage draws the batch
# the GAN stage would draw at iteration INIT_BATCH_OFFSET + i, never one of the GAN's own
INIT_BATCH_OFFSET = 1 << 40


def regression_loss(x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """Mean squared error over pixels and samples: E ‖x0_fake − x0_real‖² / (C·H·W)."""
    return torch.mean((x0_fake - x0_real.to(x0_fake)) ** 2)


def init_noise(
    seed: int,
    iteration: int,
    steps: list[int],
    x_T: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
) -> IterationNoise:
    """The stage's draws for this rank's slice ``x_T`` of the global batch: step k per sample
    from ``steps`` and the backward simulation's re-noising, drawn for the whole global batch
    from the (seed, iteration) stream (the same on every rank) and sliced as the batch is."""
    g = rng.keyed_generator(seed, iteration, rng.NOISE)
    n = x_T.shape[0]
    k_B = torch.tensor(steps)[torch.randint(len(steps), (n * world_size,), generator=g)]
    renoise = torch.randn((max(steps) - 1, n * world_size, *x_T.shape[1:]), generator=g)
    mine = slice(rank * n, (rank + 1) * n)  # data.pairs.rank_slice's contiguous share
    return IterationNoise(k_B[mine], renoise[:, mine].to(x_T), torch.zeros_like(x_T))


CACHE_KIND = "one_step_init"
FLOAT_KEYS = (
    "batch_size",
    "precision",
    "channels_last",
    "compile",
    "compile_backend",
    "compile_mode",
)


def stage_key(run: Run) -> str:
    """The cache key of ``run``'s one-step stage (module doc: what it hashes)."""
    cfg, data = run.cfg, run.train_set
    assert data is not None  # data.source=task (one_step_init checks)
    # what the stage runs: a change to any of them makes a new key (the cached G would be stale)
    code: list[Callable[..., object]] = [
        init_noise,
        _train,
        regression_loss,
        make_batch,
        backward_simulation,
        diffusion.StudentDenoiser,
        diffusion.seeded_noise,
        pairs.global_batch_indices,
        pairs.rank_slice,
        rng.keyed_generator,
        average_over_ranks,
        lora.trainable,
    ]
    parts = {
        "init": to_dict(cfg.init),
        "seed": cfg.seed,
        # what changes the float results: batch, precision, kernels, the intra-op thread count
        "train": {k: getattr(cfg.train, k) for k in FLOAT_KEYS},
        "threads": torch.get_num_threads(),
        "grad_clip": cfg.optim.grad_clip,
        "model": to_dict(cfg.model),
        "student": to_dict(cfg.student),
        "sampler": to_dict(cfg.sampler),
        "teacher": to_dict(cfg.teacher),
        "schedule": run.models.schedule,
        "sample_shape": run.models.sample_shape,
        "world_size": run.world_size,
        "device": run.device.type,
        "prompts": data.prompts,
        "code": {obj.__qualname__: inspect.getsource(obj) for obj in code},
    }
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    stage_cache.hash_tensors(h, [data.seeds])
    if run.x0_offline is not None:
        stage_cache.hash_tensors(h, [run.x0_offline])
    for module in (run.models.student, run.models.text, run.models.teacher):
        stage_cache.hash_module(h, module)
    return h.hexdigest()[:16]


def one_step_init(run: Run) -> dict[str, float]:
    """Train ``run``'s student in place for ``init.iterations`` regression steps (see module
    doc), or load the result from the cache; the EMA, when there is one, is set to the result.
    Returns the stage's metrics: ``init_loss_start`` / ``init_loss_end`` (the mean of the first
    / last 10 steps' losses), ``init_seconds`` (this time) and ``init_cached`` (1: loaded)."""
    cfg = run.cfg
    n = cfg.init.iterations
    if n == 0:
        return {}
    if run.train_set is None:  # validate() refuses it; an internal invariant here
        raise ValueError("init.iterations needs data.source=task")
    t0 = time.time()
    key = stage_key(run) if cfg.init.cache else None
    entry = None
    if key is not None:
        shipped = stage_cache.shipped_folders(run.task, cfg.model.source)
        entry = stage_cache.find(CACHE_KIND, key, shipped)
    if key is not None and run.world_size > 1:  # load only if every rank can (else all train)
        import torch.distributed as dist

        have = torch.tensor([int(entry is not None)], device=run.device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not int(have.item()):
            entry = None
    student = run.models.student
    if entry is not None:
        weights, meta = entry
        params = dict(student.named_parameters())
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(w)
        student.train()  # as the stage leaves it
        metrics = {k: float(meta[k]) for k in ("init_loss_start", "init_loss_end")}
        metrics["init_cached"] = 1.0
    else:
        metrics = _train(run)
        metrics["init_cached"] = 0.0
        if key is not None:
            trained = {name: p for name, p in student.named_parameters() if p.requires_grad}
            meta = {k: repr(v) for k, v in metrics.items() if k.startswith("init_loss")}
            stage_cache.store(CACHE_KIND, key, trained, meta)
    if run.ema is not None:
        run.ema.load_state_dict(student.state_dict())
    metrics["init_seconds"] = time.time() - t0
    return metrics


def _train(run: Run) -> dict[str, float]:
    """The stage's ``init.iterations`` steps on ``run``'s student, in place."""
    cfg = run.cfg
    n = cfg.init.iterations
    student = run.models.student
    opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.init.lr, betas=(0.9, 0.999), weight_decay=0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / n)))
    trained = lora.trainable(student)
    rank, world = run.rank, run.world_size
    losses: list[float] = []
    student.train()
    for i in range(n):
        it = INIT_BATCH_OFFSET + i
        batch = make_batch(run, it, rank, world)  # this rank's slice of the global batch
        noise = init_noise(cfg.seed, it, cfg.init.steps, batch.x_T, rank, world)
        with autocast(run):
            x_t, t_B = backward_simulation(student, run.denoiser, batch, noise)
            x0_fake = run.denoiser(student, x_t, t_B, batch.cond)
            loss = regression_loss(x0_fake.float(), batch.x0_real)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = loss.detach().reshape(1).clone()
        if world > 1:  # this rank's share of the global batch: the ranks' mean is the global one
            average_over_ranks(
                [loss_value, *(p.grad for p in trained if p.grad is not None)], world
            )
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss_value.item())
    student.zero_grad(set_to_none=True)
    k = min(10, n)
    return {"init_loss_start": sum(losses[:k]) / k, "init_loss_end": sum(losses[-k:]) / k}
