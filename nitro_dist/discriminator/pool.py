"""The head pool: slot layout, deterministic per-iteration sampling and refresh, and storage.

Slots are (kind, t* bucket, level); each holds ``candidates`` heads with global ids
``slot_index * candidates + candidate``. Sampling and refresh are pure functions of
(seed, iteration[, head id]), identical on every rank with no communication and independent of
the number of ranks or restarts. ``HeadPool`` stores the heads a process owns (all of them on one
process; a shard under distributed training) with one AdamW state per head.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from nitro_dist import rng
from nitro_dist.discriminator.heads import Head, crop_size
from nitro_dist.optim import adamw
from nitro_dist.timing import NO_TIMER, Timer

INITIAL_ITERATION = -1  # key of the weights a head gets when the pool is built


@dataclass(frozen=True)
class HeadSpec:
    kind: str
    bucket: int  # index into t_buckets
    level: int  # backbone level
    in_channels: int
    in_size: int  # spatial side of the map the head sees (the crop for local heads)
    width: int  # channels of the head's hidden layers


@dataclass(frozen=True)
class PoolLayout:
    kinds: tuple[str, ...]
    t_buckets: tuple[int, ...]
    levels: tuple[int, ...]
    candidates: int
    level_shapes: tuple[tuple[int, int, int], ...]  # (C, H, W) per backbone level
    width: int
    depth: int
    crop_frac: float
    width_ratio: float = 0.0  # > 0: width per level = ratio x its channels (``head_width``)

    @property
    def num_slots(self) -> int:
        return len(self.kinds) * len(self.t_buckets) * len(self.levels)

    @property
    def num_heads(self) -> int:
        return self.num_slots * self.candidates

    def slot(self, index: int) -> tuple[str, int, int]:
        """Slot index -> (kind, bucket index, level). Slots are ordered kind-major."""
        n_b, n_l = len(self.t_buckets), len(self.levels)
        kind, rest = divmod(index, n_b * n_l)
        bucket, lvl = divmod(rest, n_l)
        return self.kinds[kind], bucket, self.levels[lvl]

    def slots_of_bucket(self, bucket: int) -> list[int]:
        return [s for s in range(self.num_slots) if self.slot(s)[1] == bucket]

    def spec(self, head_id: int) -> HeadSpec:
        kind, bucket, level = self.slot(head_id // self.candidates)
        c, h, _ = self.level_shapes[level]
        size = h if kind == "global_cond" else crop_size(h, self.crop_frac)
        return HeadSpec(kind, bucket, level, c, size, head_width(c, self.width, self.width_ratio))

    def build_head(self, head_id: int) -> Head:
        s = self.spec(head_id)
        return Head(s.in_channels, s.in_size, s.width, self.depth)

    def head_numel(self, head_id: int) -> int:
        s = self.spec(head_id)
        return _head_numel(s.in_channels, s.in_size, s.width, self.depth)

    def numel(self) -> int:
        """Parameters of the whole pool (every head of every slot)."""
        return sum(self.head_numel(h) for h in range(self.num_heads))


def head_width(in_channels: int, width: int, width_ratio: float) -> int:
    """A head's hidden width: ``width``, or with ``width_ratio`` > 0 that fraction of the
    level's channels rounded to a multiple of 8 (tensor-core friendly; GroupNorm groups of 8)
    and at least ``width``."""
    if width_ratio <= 0:
        return width
    return max(width, 8 * round(width_ratio * in_channels / 8))


def _head_numel(c: int, size: int, width: int, depth: int) -> int:
    n, ch = 0, c
    for _ in range(depth):
        k = 16 if size >= 2 else 9
        size = size // 2 if size >= 2 else size
        n += ch * width * k + width + 2 * width  # conv + bias + GroupNorm affine
        ch = width
    return n + ch + 1


def make_layout(pool_cfg, level_shapes: list[tuple[int, int, int]]) -> PoolLayout:
    """``pool_cfg`` is a ``config.PoolConfig``; ``level_shapes`` from ``backbone.level_shapes``."""
    levels = tuple(pool_cfg.levels) or tuple(range(len(level_shapes)))
    for lvl in levels:
        if not 0 <= lvl < len(level_shapes):
            raise ValueError(
                f"pool.levels: level {lvl} does not exist (backbone has {len(level_shapes)})"
            )
    return PoolLayout(
        kinds=tuple(pool_cfg.kinds),
        t_buckets=tuple(pool_cfg.t_buckets),
        levels=levels,
        candidates=pool_cfg.candidates,
        level_shapes=tuple((c, h, w) for c, h, w in level_shapes),
        width=pool_cfg.width,
        depth=pool_cfg.depth,
        crop_frac=pool_cfg.crop_frac,
        width_ratio=pool_cfg.width_ratio,
    )


# ---------------------------------------------------------------------------------------------
# The schedule: pure functions of (seed, iteration)


@dataclass(frozen=True)
class Draw:
    bucket: int  # the iteration's t* bucket; -1 with a bucket per sample
    t_star: int  # the iteration's t*; -1 with a bucket per sample
    head_ids: tuple[int, ...]  # sorted global ids of the active heads
    # pool.t_star_per=sample: bucket and t* of every sample of the global batch (by position)
    sample_buckets: tuple[int, ...] = ()
    sample_t: tuple[int, ...] = ()

    def buckets_of(self, positions: Sequence[int]) -> torch.Tensor:
        """Bucket of each sample at these global-batch positions (CPU, long)."""
        return _at(positions, self.sample_buckets, self.bucket)

    def t_of(self, positions: Sequence[int]) -> torch.Tensor:
        """t* of each sample at these global-batch positions (CPU, long)."""
        return _at(positions, self.sample_t, self.t_star)

    def bucket_weights(self) -> dict[int, float]:
        """Global batch size / samples of each bucket in it: a head's loss on a (micro-)batch of
        b samples, n of them in its bucket, is weighted n / b x this, so ranks and micro-batches
        add up to the head's mean over its bucket's samples of the global batch (1 for the one
        bucket of an iteration)."""
        if not self.sample_buckets:
            return {self.bucket: 1.0}
        counts = Counter(self.sample_buckets)
        return {b: len(self.sample_buckets) / n for b, n in counts.items()}

    @property
    def mean_t(self) -> float:
        """The iteration's t*, or with a bucket per sample the global batch's mean t*."""
        return sum(self.sample_t) / len(self.sample_t) if self.sample_t else self.t_star


def _at(positions: Sequence[int], per_sample: tuple[int, ...], one: int) -> torch.Tensor:
    """``per_sample`` at ``positions``, or ``one`` for every position when there is none."""
    values = [per_sample[p] for p in positions] if per_sample else [one] * len(positions)
    return torch.tensor(values, dtype=torch.long)


def sample_active(
    layout: PoolLayout,
    seed: int,
    iteration: int,
    heads_per_slot: int,
    t_jitter: int = 0,
    per_sample: int = 0,
) -> Draw:
    """The t* bucket and, in every slot of that bucket, ``heads_per_slot`` of its candidates.

    ``per_sample`` = the global batch size (pool.t_star_per=sample): each sample of the global
    batch draws its own bucket (and jitter), keyed by (seed, iteration, position), and every
    slot of each bucket some sample drew gets its heads."""
    if per_sample:
        buckets, ts = [], []
        for pos in range(per_sample):
            g = rng.keyed_generator(seed, iteration, rng.BUCKET, pos)
            b, t = _draw_t(layout, g, t_jitter)
            buckets.append(b)
            ts.append(t)
        present = sorted(set(buckets))
        bucket, t_star = -1, -1
    else:
        g = rng.keyed_generator(seed, iteration, rng.BUCKET)
        bucket, t_star = _draw_t(layout, g, t_jitter)
        present, buckets, ts = [bucket], [], []
    g = rng.keyed_generator(seed, iteration, rng.ACTIVE)
    ids: list[int] = []
    for b in present:
        for s in layout.slots_of_bucket(b):
            picks = torch.randperm(layout.candidates, generator=g)[:heads_per_slot]
            ids.extend(s * layout.candidates + int(c) for c in picks)
    return Draw(bucket, t_star, tuple(sorted(ids)), tuple(buckets), tuple(ts))


def _draw_t(layout: PoolLayout, g: torch.Generator, t_jitter: int) -> tuple[int, int]:
    bucket = int(torch.randint(len(layout.t_buckets), (1,), generator=g))
    t_star = layout.t_buckets[bucket]
    if t_jitter:
        t_star += int(torch.randint(-t_jitter, t_jitter + 1, (1,), generator=g))
        t_star = min(max(t_star, 0), 999)
    return bucket, t_star


def refresh_ids(
    layout: PoolLayout,
    seed: int,
    iteration: int,
    rate: float,
    among: Sequence[int] | None = None,
) -> list[int]:
    """Heads re-initialised after ``iteration``: each with probability ``rate``, keyed draw;
    with ``among`` (``pool.refresh_by: use``: the iteration's active heads) only those can be, so
    a head's life is counted in its own updates and none is replaced before it was used."""
    if rate <= 0:
        return []
    u = torch.rand(layout.num_heads, generator=rng.keyed_generator(seed, iteration, rng.REFRESH))
    ids = torch.nonzero(u < rate).flatten().tolist()
    if among is None:
        return ids
    eligible = set(among)
    return [i for i in ids if i in eligible]


def init_head_(head: Head, seed: int, iteration: int, head_id: int) -> None:
    """Weights keyed by (seed, iteration, head id): same on any rank, after any restart."""
    head.reset_parameters(rng.keyed_generator(seed, iteration, rng.HEAD_INIT, head_id))


# ---------------------------------------------------------------------------------------------
# Storage


class PendingHeads:
    """Active heads on their way (``start_gather``): ``wait()`` finishes the transfer, if there is
    one, and returns them; compute between the start and the wait overlaps it."""

    def __init__(self, finish: Callable[[], dict[int, Head]], work: Any = None) -> None:
        self._finish, self._work = finish, work
        self._heads: dict[int, Head] | None = None

    def wait(self) -> dict[int, Head]:
        if self._heads is None:
            if self._work is not None:
                self._work.wait()
            self._heads = self._finish()
        return self._heads


class Pool(Protocol):
    """What the iteration asks of the head pool: ``HeadPool`` on one process, and
    ``distributed.pool_sync.ShardedPool`` (heads sharded over ranks) with the same maths."""

    @property
    def local(self) -> HeadPool:
        """The heads this process owns (their weights and AdamW state: checkpoints)."""
        ...

    def start_gather(self, head_ids: tuple[int, ...] | list[int]) -> PendingHeads:
        """Replicas of the active heads, on their way (overlaps the compute until ``wait``)."""
        ...

    def gather_active(self, head_ids: tuple[int, ...] | list[int]) -> dict[int, Head]: ...

    def watch_grads(self, heads: dict[int, Head]) -> None:
        """Send the heads' gradients as the D backward makes them (no-op on one process)."""
        ...

    def reduce_and_step(
        self, heads: dict[int, Head], timer: Timer = NO_TIMER, apply: bool = True
    ) -> None:
        """Average the active heads' gradients over ranks; owners step AdamW (``apply`` False:
        the gradients are dropped, weights and AdamW state stay as they are)."""
        ...

    def refresh(self, head_ids: list[int], iteration: int) -> list[int]:
        """Re-initialise the owned heads among ``head_ids``; returns those done here."""
        ...


class HeadPool(torch.nn.Module):
    """The heads one process owns, each with its own AdamW state.

    One AdamW instance covers all owned heads; AdamW skips parameters without gradients, so only
    the heads that were active step, and per-parameter state makes it one AdamW per head.
    """

    def __init__(
        self, layout: PoolLayout, pool_cfg, seed: int, owned: list[int] | None = None
    ) -> None:
        super().__init__()
        self.layout = layout
        self.seed = seed
        self.owned = sorted(range(layout.num_heads) if owned is None else owned)
        self.heads = torch.nn.ModuleDict()
        for hid in self.owned:
            head = layout.build_head(hid)
            init_head_(head, seed, INITIAL_ITERATION, hid)
            self.heads[str(hid)] = head
        self.optimizer = adamw(
            self.heads.parameters() if self.owned else [torch.nn.Parameter(torch.zeros(1))],
            pool_cfg,
        )

    def head(self, head_id: int) -> Head:
        return cast(Head, self.heads[str(head_id)])  # the ModuleDict holds only heads

    def active(self, head_ids: tuple[int, ...] | list[int]) -> dict[int, Head]:
        return {h: self.head(h) for h in head_ids if str(h) in self.heads}

    @property
    def local(self) -> HeadPool:
        """The heads this process owns (all of them here; a shard in ``ShardedPool``)."""
        return self

    def gather_active(self, head_ids: tuple[int, ...] | list[int]) -> dict[int, Head]:
        """Same interface as the sharded pool: on one process the active heads are local."""
        return self.active(head_ids)

    def start_gather(self, head_ids: tuple[int, ...] | list[int]) -> PendingHeads:
        return PendingHeads(lambda: self.active(head_ids))

    def watch_grads(self, heads: dict[int, Head]) -> None:
        """Same interface as the sharded pool: one process has no gradients to send."""

    def reduce_and_step(
        self, heads: dict[int, Head], timer: Timer = NO_TIMER, apply: bool = True
    ) -> None:
        with timer("heads_optimizer"):
            self.step(apply)

    def step(self, apply: bool = True) -> None:
        """AdamW step on heads that have gradients (unless not ``apply``), then clear them."""
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def refresh(self, head_ids: list[int], iteration: int) -> list[int]:
        """Re-initialise owned heads among ``head_ids`` and reset their optimizer state."""
        done = []
        for hid in head_ids:
            if str(hid) not in self.heads:
                continue
            head = self.head(hid)
            init_head_(head, self.seed, iteration, hid)
            for p in head.parameters():
                self.optimizer.state.pop(p, None)
            done.append(hid)
        return done

    def numel(self) -> int:
        """Parameters + optimizer-state elements held by this process (memory accounting)."""
        n = sum(p.numel() for p in self.heads.parameters())
        for state in self.optimizer.state.values():
            n += sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
        return n
