"""The sharded head pool protocol (DESIGN.md §3).

Only a head's owner keeps its weights and AdamW state. Each iteration:
1. every rank computes the same active set from (seed, iteration) (``sample_active``);
2. ``gather_active``: owners write their active heads into one flat buffer, one all-reduce gives
   every rank a replica of all active heads;
3. G turn with the replicas (frozen), then D turn on the local batch;
4. ``reduce_and_step``: active heads' gradients are averaged in one packed all-reduce and the
   owners step AdamW;
5. owners re-initialise their heads drawn for refresh (keyed, so no communication).

Traffic per iteration = 2 x (active parameters), independent of the pool size.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from nitro_dist.discriminator.heads import Head
from nitro_dist.discriminator.pool import HeadPool, PoolLayout
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
        self._spare: dict[tuple[int, int], list[Head]] = defaultdict(list)
        self._replicas: dict[int, Head] = {}
        self.bytes_moved = 0  # by the last iteration's collectives

    # -- step 2 ---------------------------------------------------------------------------

    def gather_active(self, head_ids: tuple[int, ...] | list[int]) -> dict[int, Head]:
        """Every active head on every rank: owned modules, plus replicas of the others."""
        ids = sorted(head_ids)
        self._release_replicas()
        sizes = [self.layout.head_numel(h) for h in ids]
        buf = torch.zeros(sum(sizes), device=self.device)
        off = 0
        for h, n in zip(ids, sizes, strict=True):
            if self.owner[h] == self.rank:
                buf[off : off + n] = _flat_params(self.local.head(h))
            off += n
        self._all_reduce(buf)
        heads, off = {}, 0
        for h, n in zip(ids, sizes, strict=True):
            if self.owner[h] == self.rank:
                heads[h] = self.local.head(h)
            else:
                heads[h] = self._replica(h)
                _load_flat(heads[h], buf[off : off + n])
            off += n
        self.bytes_moved = buf.numel() * buf.element_size()
        return heads

    # -- step 4 ---------------------------------------------------------------------------

    def reduce_and_step(self, heads: dict[int, Head], timer: Timer = NO_TIMER) -> None:
        """Average the active heads' gradients over ranks (one collective); owners step."""
        ids = sorted(heads)
        with timer("pool_comm"):
            grads = []
            for h in ids:
                for p in heads[h].parameters():
                    grads.append(
                        p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                    )
            buf = torch.cat(grads) if grads else torch.zeros(0, device=self.device)
            self._all_reduce(buf)
            buf /= self.world_size
            self.bytes_moved += buf.numel() * buf.element_size()
            off = 0
            for h in ids:
                for p in heads[h].parameters():
                    n = p.numel()
                    if self.owner[h] == self.rank:
                        p.grad = buf[off : off + n].view_as(p).clone()
                    else:
                        p.grad = None
                    off += n
        with timer("heads_optimizer"):
            self.local.step()

    # -- step 5 ---------------------------------------------------------------------------

    def refresh(self, head_ids: list[int], iteration: int) -> list[int]:
        """Owners re-initialise their heads among ``head_ids``; returns all refreshed ids."""
        self.local.refresh(head_ids, iteration)
        return list(head_ids)

    # -- helpers --------------------------------------------------------------------------

    def _all_reduce(self, buf: torch.Tensor) -> None:
        if self.world_size > 1 and buf.numel():
            dist.all_reduce(buf)

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


def _flat_params(head: Head) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in head.parameters()])


@torch.no_grad()
def _load_flat(head: Head, flat: torch.Tensor) -> None:
    off = 0
    for p in head.parameters():
        p.copy_(flat[off : off + p.numel()].view_as(p))
        off += p.numel()
