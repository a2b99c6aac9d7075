"""Where shards live: URLs on local disk or any fsspec filesystem (s3:// through s3fs), opened
with retries, and the shard list a dataset resolves to. No webdataset, no torch."""

from __future__ import annotations

import time
from dataclasses import dataclass

import fsspec

OPEN_ATTEMPTS = 3


class DataError(ValueError):
    """Storage trouble or an unusable dataset (as opposed to a bad sample, which is skipped)."""


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


@dataclass
class ShardList:
    urls: list[str]
    counts: list[int]  # samples per shard from the manifest or the index (-1: unknown)
    # index entries of a brace pattern (members per suffix, damage); None: from a manifest
    info: list[dict] | None = None

    @property
    def total(self) -> int:
        return sum(c for c in self.counts if c > 0)


def url_fs(url: str):
    return fsspec.core.url_to_fs(url)


def read_bytes(url: str) -> bytes:
    with open_with_retries(url) as f:
        return f.read()


def open_with_retries(url: str, attempts: int = OPEN_ATTEMPTS, backoff_s: float = 0.5):
    """Open ``url`` for reading; retried, then a ``DataError`` that names the URL."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fsspec.open(url, "rb").open()
        except FileNotFoundError as e:
            last = e
        except Exception as e:  # noqa: BLE001 - network/credential errors differ per backend
            last = e
        if i + 1 < attempts:
            time.sleep(backoff_s * 2**i)
    kind = "not found" if isinstance(last, FileNotFoundError) else "storage unreachable"
    raise DataError(f"shard {url}: {kind} after {attempts} attempts ({last})") from last
