"""Retrying storage calls: exponential backoff with jitter, bounded in attempts and in time.

Object storage fails in passing (a dropped connection, a read that stalls past its timeout, HTTP
5xx, 429 / SlowDown throttling); those calls are retried (``storage.retries`` times, within
``storage.retry_max_s`` seconds of waiting and trying) before anything is called unreadable.
Permanent answers (not found, access denied, a bad checksum, a full disk) are raised at once: a
retry cannot change them. s3fs and botocore retry a little themselves; this layer sits above
them, so an outage longer than their few attempts still ends in the same bytes, not in a shard
counted as corrupt.

The policy is per process (``configure``, from ``build_run`` and the Ray driver); readers and
writers call ``call(fn, what)``, ``what`` naming the URL for the error and the log.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("nitro_dist.storage")
T = TypeVar("T")

BASE_S = 0.1  # first backoff; doubles per retry
CAP_S = 10.0  # longest single wait

# errnos a retry can cure (connection trouble, a busy or failing server: s3fs maps 5xx/SlowDown
# to EBUSY / EREMOTEIO) and those it cannot (a full disk stays full)
TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EIO,
    getattr(errno, "EREMOTEIO", 121),
}
PERMANENT_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", 122), errno.EROFS, errno.EACCES}
# client exception classes (by name: no hard import of aiohttp/botocore/urllib3) that mean the
# connection or the response broke, not that the request was wrong
TRANSIENT_NAMES = {
    "ClientPayloadError",
    "ContentLengthError",
    "ServerDisconnectedError",
    "ClientConnectionError",
    "ClientOSError",
    "ServerTimeoutError",
    "HTTPClientError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "IncompleteRead",
    "RemoteDisconnected",
    "ProtocolError",
    "FSTimeoutError",
    "ResponseParserError",
}
THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestThrottled",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
}


class StorageError(OSError):
    """Storage kept failing with transient errors after every retry the policy allows."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # storage.retries: tries after the first
    max_s: float = 120.0  # storage.retry_max_s: no retry starts after this long (waits included)

    def delay(self, i: int, rand: random.Random) -> float:
        """The wait before retry ``i`` (0-based): exponential, jittered to 50-100% (clients
        retrying together after an outage do not come back in step)."""
        return min(CAP_S, BASE_S * 2**i) * rand.uniform(0.5, 1.0)


_POLICY = RetryPolicy()


def configure(policy: RetryPolicy) -> None:
    """This process's policy (loader workers forked after it inherit it)."""
    global _POLICY
    _POLICY = policy


def current() -> RetryPolicy:
    return _POLICY


def from_config(storage: Any) -> RetryPolicy:
    """The policy of a ``StorageConfig`` (``storage.retries``, ``storage.retry_max_s``)."""
    return RetryPolicy(retries=storage.retries, max_s=storage.retry_max_s)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in out and len(out) < 10:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def _http(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, error code) of a botocore ``ClientError`` (None, "" for anything else)."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return None, ""
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(resp.get("Error", {}).get("Code", ""))
    try:
        return (int(status) if status is not None else None), code
    except (TypeError, ValueError):
        return None, code


def is_transient(exc: BaseException) -> bool:
    """A storage error a retry may cure: connection reset/refused/timeout, a broken response
    body, HTTP 5xx, 429 or a throttling code. Not found, access denied, other 4xx, a bad
    checksum or a full disk are permanent."""
    chain = _chain(exc)
    if isinstance(exc, StorageError):  # retried already, by an inner call
        return False
    for e in chain:  # a broken connection, even under another name (fsspec's http filesystem
        # reports a refused connection as FileNotFoundError, the aiohttp error as its context)
        if any(c.__name__ in TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
    for e in chain:  # then what the server said
        status, code = _http(e)
        if code in THROTTLE_CODES or status == 429 or (status is not None and status >= 500):
            return True
        if status is not None and 400 <= status < 500:
            return False
    for e in chain:
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | ValueError):
            return False
        if isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS:
            return False
    for e in chain:
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
    return False


def call(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy | None = None,
    *,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """``fn()``, retried on transient errors (``is_transient``) with backoff under ``policy``
    (default: this process's). Permanent errors propagate as they are; transient ones that
    outlast the policy end in a ``StorageError`` naming ``what``. ``on_retry``: called with the
    error before each retry (e.g. to drop a broken connection)."""
    p = policy if policy is not None else _POLICY
    rand = random.Random()
    start = time.monotonic()
    i = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - start
            wait = p.delay(i, rand)
            if i >= p.retries or elapsed + wait > p.max_s:
                raise StorageError(
                    errno.EIO,
                    f"{what}: storage still failing after {i + 1} attempts in {elapsed:.1f} s "
                    f"({type(e).__name__}: {e}); raise storage.retries / storage.retry_max_s "
                    "if the storage is slow to recover",
                ) from e
            log.warning(
                "storage: %s: %s: %s; retry %d/%d in %.2f s",
                what,
                type(e).__name__,
                e,
                i + 1,
                p.retries,
                wait,
            )
            if on_retry is not None:
                on_retry(e)
            time.sleep(wait)
            i += 1
