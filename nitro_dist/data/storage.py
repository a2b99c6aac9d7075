"""Where shards live: URLs on local disk or any fsspec filesystem (s3:// through s3fs), read
with retries (``nitro_dist.retry``: a read that breaks resumes at its offset), and the shard
list a dataset resolves to. No webdataset, no torch."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from nitro_dist import retry

T = TypeVar("T")


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


def open_with_retries(url: str) -> RetryingReader:
    """Open ``url`` for reading (transient storage errors retried, ``retry.call``); a read that
    breaks later resumes at its byte offset. Not found, or storage that stays unreachable: a
    ``DataError`` naming the URL."""
    return RetryingReader(url)


class RetryingReader(io.RawIOBase):
    """A binary file at ``url`` whose reads survive transient storage errors: a failed read
    drops the connection, waits (``retry.call``'s backoff), reopens the file and seeks back to
    the bytes already delivered, so the reader sees the same bytes as without the fault. When
    the storage keeps failing, ``read`` raises ``DataError`` naming the URL and ``error`` holds
    its message: a caller parsing the stream tells this apart from damaged data
    (``shards.raw_samples`` counts a corrupt shard only when the bytes themselves are bad)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.pos = 0  # bytes delivered
        self.error: str | None = None  # why reading failed for good (storage, not data)
        self._f: Any = None
        self._call(lambda: None)  # open now: a missing shard fails here

    def _file(self) -> Any:
        if self._f is None:
            f = fsspec.open(self.url, "rb").open()
            try:
                if self.pos:
                    f.seek(self.pos)
            except BaseException:
                f.close()
                raise
            self._f = f
        return self._f

    def _drop(self, _: BaseException | None = None) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def _call(self, op: Callable[[], T]) -> T:
        def attempt() -> T:
            self._file()
            return op()

        try:
            return retry.call(attempt, f"shard {self.url}", on_retry=self._drop)
        except FileNotFoundError as e:
            self._drop()
            raise DataError(f"shard {self.url}: not found ({e})") from e
        except Exception as e:
            self._drop()
            if isinstance(e, retry.StorageError):
                self.error = f"shard {self.url}: unreadable, {e}"
            else:
                self.error = f"shard {self.url}: storage error ({type(e).__name__}: {e})"
            raise DataError(self.error) from e

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        n = -1 if size is None else size
        data = self._call(lambda: self._f.read(n))
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self._call(lambda: self._f.seek(offset, whence))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self._drop()
        super().close()
