"""Owner map: which rank keeps each head's weights and AdamW state.

A pure function of the layout and the world size (no process group needed, so it is tested with
world_size=8 on one process): heads go, largest first, to the rank with the fewest parameters so
far (ties to the lower rank). Parameter counts differ by level (320 vs 1280 channels on SDXL), so
balancing by count, not by number of heads, is what keeps per-rank memory even.
"""

from __future__ import annotations

import heapq

from nitro_dist.discriminator.pool import PoolLayout


def owner_map(layout: PoolLayout, world_size: int) -> list[int]:
    """owner[head_id] = rank. Deterministic; identical on every rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    sizes = [layout.head_numel(h) for h in range(layout.num_heads)]
    order = sorted(range(layout.num_heads), key=lambda h: (-sizes[h], h))
    loads = [(0, r) for r in range(world_size)]
    heapq.heapify(loads)
    owner = [0] * layout.num_heads
    for h in order:
        load, r = heapq.heappop(loads)
        owner[h] = r
        heapq.heappush(loads, (load + sizes[h], r))
    return owner


def owned_by(owner: list[int], rank: int) -> list[int]:
    return [h for h, r in enumerate(owner) if r == rank]
