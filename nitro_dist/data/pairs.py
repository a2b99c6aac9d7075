"""Teacher pairs: (prompt, noise seed, teacher x0) and the per-iteration batch draw.

x_T is never stored: it is regenerated bit-exactly from the pair's seed (``seeded_noise``), so a
pair set is small and the same sample always starts from the same noise. In offline mode the
teacher runs once over the whole set (cached on disk, keyed by everything that changes its
output); in online mode it runs inside the training step on the drawn batch. With several ranks
each computes every W-th batch and the ranks exchange them: the set is the one a single process
makes (the same batches, per-sample noise), in 1/W of the time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from nitro_dist import rng, stage_cache
from nitro_dist.diffusion import TeacherSampler, seeded_noise
from nitro_dist.models.text import TextConditioner


@dataclass
class PromptSet:
    prompts: list[str]
    seeds: torch.Tensor  # int64, one noise seed per sample

    def __len__(self) -> int:
        return len(self.prompts)


def global_batch_indices(
    seed: int, iteration: int, num_samples: int, global_batch: int
) -> torch.Tensor:
    """Indices of the global batch of ``iteration``: a keyed permutation, so the batch does not
    depend on the number of ranks; rank r takes the r-th contiguous slice."""
    g = rng.keyed_generator(seed, iteration, rng.BATCH)
    if global_batch <= num_samples:
        return torch.randperm(num_samples, generator=g)[:global_batch]
    return torch.randint(num_samples, (global_batch,), generator=g)


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    if len(indices) % world_size:
        raise ValueError(
            f"train.batch_size {len(indices)} does not divide over {world_size} workers"
        )
    per = len(indices) // world_size
    return indices[rank * per : (rank + 1) * per]


def _fingerprint(teacher: torch.nn.Module, parts: dict) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for p in list(teacher.parameters())[:: max(1, len(list(teacher.parameters())) // 16)]:
            h.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


@torch.no_grad()
def teacher_x0(
    teacher: torch.nn.Module,
    text: TextConditioner,
    sampler: TeacherSampler,
    prompts: list[str],
    seeds: torch.Tensor,
    sample_shape: tuple[int, int, int],
    device: torch.device,
) -> torch.Tensor:
    """The teacher's x0 for each (prompt, seed); per-sample noise from the seed."""
    x_T = seeded_noise(seeds.tolist(), sample_shape).to(device)
    cond = text.encode(prompts).to(device)
    uncond = text.encode([""] * len(prompts)).to(device) if sampler.guidance_scale > 1 else None
    # Stochastic schedulers (LCM) draw their step noise per sample from the sample's own seed, so a
    # teacher x0 never depends on its batch-mates (diffusers' randn_tensor takes a generator list).
    gens = [rng.keyed_generator(int(s), rng.TEACHER) for s in seeds]
    return sampler.sample(teacher, x_T, cond, uncond, generator=gens)


def precompute_pairs(
    teacher: torch.nn.Module,
    text: TextConditioner,
    sampler: TeacherSampler,
    data: PromptSet,
    sample_shape: tuple[int, int, int],
    *,
    batch_size: int,
    device: torch.device,
    fingerprint_parts: dict,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    shipped: Sequence[Path] = (),
) -> torch.Tensor:
    """Teacher x0 for every sample of ``data`` (N x C x H x W, fp32 on CPU), cached on disk
    (``stage_cache``: the user's cache, then the ``shipped`` folders).

    With ``world_size`` > 1 (a process group is up) every rank calls it: unless every rank finds
    the cache, rank r computes batches r, r + W, ... and each batch is broadcast from its owner;
    every rank then holds the whole set, and each rank that lacked it caches it (its disk may be a
    node of its own)."""
    key = _fingerprint(
        teacher,
        {
            **fingerprint_parts,
            "n": len(data),
            "shape": sample_shape,
            "seeds": data.seeds[:8].tolist(),
            "prompts": data.prompts[:8],
        },
    )
    entry = stage_cache.find("teacher_pairs", key, shipped)
    cached = None if entry is None else entry[0]["x0"]
    if world_size > 1:  # compute together unless every rank has it
        have = torch.tensor([int(cached is not None)], device=device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if int(have.item()) and cached is not None:
            return cached
    elif cached is not None:
        return cached
    starts = list(range(0, len(data), batch_size))
    mine = starts[rank::world_size]
    out = {}
    for s in tqdm(mine, desc="teacher pairs", unit="batch", disable=not progress):
        batch = slice(s, s + batch_size)
        x0 = teacher_x0(
            teacher, text, sampler, data.prompts[batch], data.seeds[batch], sample_shape, device
        )
        out[s] = x0.float()
    if world_size > 1:
        for i, s in enumerate(starts):
            n = min(batch_size, len(data) - s)
            buf = out.get(s, torch.empty((n, *sample_shape), device=device))
            dist.broadcast(buf, src=i % world_size)
            out[s] = buf
    x0 = torch.cat([out[s].cpu() for s in starts])
    if cached is None:  # a rank that had the set computed its share for the others only
        stage_cache.store("teacher_pairs", key, {"x0": x0})
    return x0
