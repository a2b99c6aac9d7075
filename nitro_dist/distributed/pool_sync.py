"""The sharded head pool protocol (DESIGN.md §3).

Only a head's owner keeps its weights and AdamW state. Each iteration:
1. every rank computes the same active set from (seed, iteration) (``sample_active``);
2. ``start_gather``: owners write their active heads into one flat buffer, one all-reduce gives
   every rank a replica of all active heads; it runs while the batch is made (teacher, data) and
   ``wait()`` on it comes just before the G turn (``gather_active`` = start + wait);
3. G turn with the replicas (frozen), then D turn on the local batch;
4. ``watch_grads`` before the D turn's last backward: the active heads' gradients go in buckets
   of ~``pool.bucket_mb`` (reverse id order, the order backward finishes them) and each bucket's
   all-reduce starts as soon as backward has produced all of its gradients, buckets in the same
   order on every rank; ``reduce_and_step`` waits, averages and the owners step AdamW;
5. owners re-initialise their heads drawn for refresh (keyed, so no communication).
With ``pool.overlap_comm=false`` each collective blocks, after the compute it could overlap.

Traffic per iteration = 2 x (active parameters), independent of the pool size.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from nitro_dist.discriminator.heads import Head
from nitro_dist.discriminator.pool import HeadPool, PendingHeads, PoolLayout
from nitro_dist.distributed.owners import owned_by, owner_map
from nitro_dist.timing import NO_TIMER, Timer


class ShardedPool:
    def __init__(
        self,
        layout: PoolLayout,
        pool_cfg,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layout = layout
        self.rank, self.world_size = rank, world_size
        self.owner = owner_map(layout, world_size)
        self.local = HeadPool(layout, pool_cfg, seed, owned_by(self.owner, rank)).to(device)
        self.device = torch.device(device)
        self.overlap = pool_cfg.overlap_comm
        self.bucket_bytes = int(pool_cfg.bucket_mb * 2**20)
        self._buckets: list[_Bucket] = []
        self.early_buckets = 0  # of the last reduce: buckets sent while backward still ran
        self._spare: dict[tuple[int, int], list[Head]] = defaultdict(list)
        self._replicas: dict[int, Head] = {}
        self.bytes_moved = 0  # by the last iteration's collectives

    # -- step 2 ---------------------------------------------------------------------------

    def start_gather(self, head_ids: tuple[int, ...] | list[int]) -> PendingHeads:
        """Every active head on every rank, owned modules plus replicas of the others, once
        ``wait()`` is called on the result; the all-reduce runs in between."""
        ids = sorted(head_ids)
        self._release_replicas()
        sizes = [self.layout.head_numel(h) for h in ids]
        buf = torch.zeros(sum(sizes), device=self.device)
        off = 0
        for h, n in zip(ids, sizes, strict=True):
            if self.owner[h] == self.rank:
                buf[off : off + n] = parameters_to_vector(self.local.head(h).parameters()).detach()
            off += n
        work = self._all_reduce(buf, async_op=self.overlap)
        self.bytes_moved = buf.numel() * buf.element_size()
        return PendingHeads(lambda: self._unpack(ids, sizes, buf), work)

    def gather_active(self, head_ids: tuple[int, ...] | list[int]) -> dict[int, Head]:
        return self.start_gather(head_ids).wait()

    def _unpack(self, ids: list[int], sizes: list[int], buf: torch.Tensor) -> dict[int, Head]:
        heads, off = {}, 0
        for h, n in zip(ids, sizes, strict=True):
            if self.owner[h] == self.rank:
                heads[h] = self.local.head(h)
            else:
                heads[h] = self._replica(h)
                # the replica's parameters become views of the received buffer (no copy)
                vector_to_parameters(buf[off : off + n], heads[h].parameters())
            off += n
        return heads

    # -- step 4 ---------------------------------------------------------------------------

    def watch_grads(self, heads: dict[int, Head]) -> None:
        """Call before the D turn's last backward: each bucket's all-reduce starts from a
        gradient hook as soon as backward has accumulated all of its gradients."""
        self._buckets = self._make_buckets(heads)
        if self.overlap and self.world_size > 1:
            for b in self._buckets:
                b.watch(self._launch_ready)

    def reduce_and_step(
        self, heads: dict[int, Head], timer: Timer = NO_TIMER, apply: bool = True
    ) -> None:
        """Average the active heads' gradients over ranks; owners step (``apply`` False, agreed
        by every rank: the collectives finish, the gradients are dropped)."""
        with timer("pool_comm"):
            if not self._buckets:  # nobody called watch_grads: all buckets now
                self._buckets = self._make_buckets(heads)
            self.early_buckets = sum(b.launched for b in self._buckets)
            for b in self._buckets:
                b.ready = True  # a parameter backward never reached sends zeros
            self._launch_ready()
            for b in self._buckets:
                b.finish(self.world_size)
                self.bytes_moved += b.buf.numel() * b.buf.element_size()
            self._buckets = []
        with timer("heads_optimizer"):
            self.local.step(apply)

    def _make_buckets(self, heads: dict[int, Head]) -> list[_Bucket]:
        """Parameters in buckets of ~bucket_mb; one bucket (one collective) without overlap."""
        limit = self.bucket_bytes if self.overlap else float("inf")
        buckets, cur, size = [], [], 0
        for h in sorted(heads, reverse=True):  # backward finishes the last-judged heads first
            for p in heads[h].parameters():
                cur.append((p, self.owner[h] == self.rank))
                size += p.numel() * p.element_size()
            if size >= limit:
                buckets.append(_Bucket(cur))
                cur, size = [], 0
        if cur:
            buckets.append(_Bucket(cur))
        return buckets

    def _launch_ready(self) -> None:
        """Start the collectives of ready buckets, in bucket order (the same on every rank)."""
        for b in self._buckets:
            if not b.launched:
                if not b.ready:
                    return
                b.launch(self._all_reduce)

    # -- step 5 ---------------------------------------------------------------------------

    def refresh(self, head_ids: list[int], iteration: int) -> list[int]:
        """Owners re-initialise their heads among ``head_ids``; returns all refreshed ids."""
        self.local.refresh(head_ids, iteration)
        return list(head_ids)

    # -- helpers --------------------------------------------------------------------------

    def _all_reduce(self, buf: torch.Tensor, async_op: bool = False) -> dist.Work | None:
        if self.world_size > 1 and buf.numel():
            return dist.all_reduce(buf, async_op=async_op)
        return None

    def _replica(self, head_id: int) -> Head:
        spec = self.layout.spec(head_id)
        key = (spec.in_channels, spec.in_size)
        head = self._spare[key].pop() if self._spare[key] else None
        if head is None:  # its weights come from the gathered buffer
            head = self.layout.build_head(head_id).to(self.device)
        self._replicas[head_id] = head
        return head

    def _release_replicas(self) -> None:
        for hid, head in self._replicas.items():
            spec = self.layout.spec(hid)
            head.zero_grad(set_to_none=True)
            self._spare[(spec.in_channels, spec.in_size)].append(head)
        self._replicas = {}

    def numel(self) -> int:
        """Pool parameters + optimizer state this rank holds (owned heads only)."""
        return self.local.numel()


class _Bucket:
    """Gradients of some active heads' parameters, all-reduced as one flat buffer."""

    def __init__(self, params: list[tuple[torch.nn.Parameter, bool]]) -> None:
        self.params = params  # (parameter, owned by this rank)
        self.pending = len(params)  # gradients backward has still to accumulate
        self.ready = False
        self.launched = False
        self.work: dist.Work | None = None
        self.buf = torch.zeros(0)
        self._hooks: list = []

    def watch(self, on_ready: Callable[[], None]) -> None:
        def hook(_: torch.Tensor) -> None:
            self.pending -= 1
            if self.pending == 0:
                self.ready = True
                on_ready()

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p, _ in self.params]

    def launch(self, all_reduce: Callable[..., dist.Work | None]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p, _ in self.params]
        self.buf = torch.cat([g.flatten() for g in grads])
        self.work = all_reduce(self.buf, async_op=True)
        self.launched = True

    def finish(self, world_size: int) -> None:
        """Wait, average; owners get the mean gradient, replicas none."""
        for h in self._hooks:
            h.remove()
        if self.work is not None:
            self.work.wait()
        self.buf /= world_size
        off = 0
        for p, owned in self.params:
            n = p.numel()
            p.grad = self.buf[off : off + n].view_as(p).clone() if owned else None
            off += n
