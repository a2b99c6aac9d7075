"""Keyed random streams: every draw comes from a generator keyed by explicit integers.

A key such as (seed, iteration, stream, rank) or (seed, iteration, stream, head_id) fixes the
draw regardless of how many ranks run, of restarts, and of what else was drawn before, so a
resumed run is exact and ranks get distinct noise.
"""

from __future__ import annotations

import hashlib
import struct

import torch

# Stream tags: one per purpose, so two purposes never share a draw.
BUCKET, ACTIVE, REFRESH, HEAD_INIT, NOISE, BATCH, CROP, TEACHER = range(1, 9)


def key_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (blake2b; stable across platforms and versions)."""
    data = struct.pack(f"<{len(keys)}q", *(int(k) for k in keys))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def keyed_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(key_seed(*keys))
