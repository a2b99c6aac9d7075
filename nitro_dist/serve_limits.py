"""What the server refuses, and how it survives, without Ray: ``nitro_dist.serve`` applies these
to every request; the tests drive them through FastAPI on a real uvicorn as well.

- Pixel budgets. Per request: images x height x width (over it: 4xx naming ``num_images`` /
  ``n``). Per model call: Serve's batching joins up to ``max_batch_size`` requests, each up to 8
  images at up to twice the native side (256 native images' worth of pixels in one call); the
  generator replica cuts every (steps, size) group into calls of at most ``max_call_pixels``.
- HTTP. A body over ``max_body_bytes`` is refused (413) before it is parsed, a body still
  arriving after ``body_timeout_s`` is refused (408: a slow or stalled client does not hold the
  request), a request running past ``request_timeout_s`` is answered 504 and cancelled. With
  ``api_key_env=NAME`` every endpoint but ``/`` and ``/healthz`` needs ``Authorization: Bearer
  <key>`` (what the ``openai`` client sends); the key is read from the environment variable, never
  from an argument, and only its SHA-256 travels with the deployment. ``/docs``, ``/redoc`` and
  ``/openapi.json`` answer 404 unless ``docs=true``.
- Out of memory in a model call (``torch.OutOfMemoryError``, or the CPU allocator's
  RuntimeError): the batch is rerun request by request, halving the images per call down to one;
  a request whose single image still does not fit gets 503 with ``Retry-After``, its batch-mates
  get their images, and the replica keeps serving. ``fault_oom_pixels`` injects the error into
  every call over that many pixels (tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from nitro_dist.image_api import MAX_IMAGES, Job, Limits, Result, run_jobs
from nitro_dist.inference import Generator

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class LimitArgs(BaseModel):
    """The app arguments of this module (``nitro_dist.serve.AppArgs`` extends it)."""

    model_config = ConfigDict(extra="forbid")

    max_request_pixels: int = Field(
        default=0,
        ge=0,
        description="pixels one request may ask for (images x height x width); "
        f"0: {MAX_IMAGES} images at the native size",
    )
    max_call_pixels: int = Field(
        default=0,
        ge=0,
        description="pixels per model call: batched requests are generated in calls of at most "
        "this many; 0: twice max_request_pixels; at least one image at the largest size",
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="request body limit")
    body_timeout_s: float = Field(default=10.0, gt=0, description="time to receive the body")
    request_timeout_s: float = Field(default=120.0, gt=0, description="whole request, then 504")
    api_key_env: str = Field(
        default="",
        description="environment variable holding the API key clients send as 'Authorization: "
        "Bearer KEY'; empty: no key needed",
    )
    docs: bool = Field(default=False, description="serve /docs, /redoc and /openapi.json")
    fault_oom_pixels: int = Field(
        default=0, ge=0, description="fault injection: model calls over this many pixels OOM"
    )


# --- pixel budgets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelBudget:
    """Resolved budgets, in pixels, for one loaded generator."""

    max_request_pixels: int
    max_call_pixels: int
    fault_oom_pixels: int = 0

    @classmethod
    def resolve(cls, args: LimitArgs, limits: Limits) -> PixelBudget:
        """0 means auto (see ``LimitArgs``); a call budget below one image at the largest side
        would make some allowed requests impossible: refused, naming the argument."""
        request = args.max_request_pixels or MAX_IMAGES * limits.native**2
        call = args.max_call_pixels or 2 * request
        one_image = limits.max_side**2
        if call < one_image:
            raise ValueError(
                f"max_call_pixels: {call} is less than one image at the largest allowed size "
                f"({limits.max_side}x{limits.max_side} = {one_image} pixels)"
            )
        return cls(request, call, args.fault_oom_pixels)

    def check_request(self, num_images: int, height: int, width: int, param: str) -> None:
        """ValueError starting with ``param`` when the request asks for too many pixels."""
        pixels = num_images * height * width
        if pixels > self.max_request_pixels:
            fit = max(1, self.max_request_pixels // (height * width))
            raise ValueError(
                f"{param}: {num_images} image(s) of {width}x{height} are {pixels} pixels, over "
                f"this server's {self.max_request_pixels} per request; at this size ask for at "
                f"most {fit}"
            )


# --- out of memory ------------------------------------------------------------------------------


@dataclass
class OutOfMemory:
    """A request's answer when even its images one per call did not fit: 503 + Retry-After."""

    message: str
    retry_after: str = "5"


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    # the CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."
    text = str(e).lower()
    words = ("out of memory", "can't allocate memory", "not enough memory", "cpuallocator")
    return isinstance(e, RuntimeError) and any(w in text for w in words)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class CallGuard:
    """The generator call ``run_jobs`` makes, cut to the pixel budget (``chunked``) or, after an
    out-of-memory, halving the images per call down to one (``halving``). Remembers the images
    per call it used for each (steps, height, width)."""

    gen: Generator
    budget: PixelBudget
    per_call: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def _call(self, prompts: list[str], seeds: list[int], steps: int, hw: tuple[int, int]):
        pixels = len(prompts) * hw[0] * hw[1]
        if self.budget.fault_oom_pixels and pixels > self.budget.fault_oom_pixels:
            raise torch.OutOfMemoryError(
                f"injected: a call of {pixels} pixels (fault_oom_pixels="
                f"{self.budget.fault_oom_pixels})"
            )
        return self.gen(prompts, seeds, steps, hw)

    def _run(self, per: int, prompts: list[str], seeds: list[int], steps: int, hw) -> torch.Tensor:
        out = [
            self._call(prompts[i : i + per], seeds[i : i + per], steps, hw)
            for i in range(0, len(prompts), per)
        ]
        self.per_call[(steps, *hw)] = min(per, len(prompts))
        return torch.cat(out)

    def chunked(self, prompts: list[str], seeds: list[int], steps: int, hw: tuple[int, int]):
        per = max(1, self.budget.max_call_pixels // (hw[0] * hw[1]))
        return self._run(per, prompts, seeds, steps, hw)

    def halving(self, prompts: list[str], seeds: list[int], steps: int, hw: tuple[int, int]):
        per = min(len(prompts), max(1, self.budget.max_call_pixels // (hw[0] * hw[1])))
        while True:
            try:
                return self._run(per, prompts, seeds, steps, hw)
            except Exception as e:
                if not is_oom(e) or per == 1:
                    raise
                _free_memory()
                per = (per + 1) // 2


def run_jobs_guarded(gen: Generator, jobs: list[Job], budget: PixelBudget) -> list[Any]:
    """``run_jobs`` within the per-call budget, surviving out-of-memory: a Result per job, or
    OutOfMemory for the jobs whose images do not fit even one per call."""
    guard = CallGuard(gen, budget)
    try:
        results: list[Any] = run_jobs(gen, jobs, call=guard.chunked)
    except Exception as e:
        if not is_oom(e):
            raise
        log.warning("out of memory in a batch of %d request(s), rerunning one by one", len(jobs))
        _free_memory()
        results = []
        for job in jobs:
            try:
                results.append(run_jobs(gen, [job], call=guard.halving)[0])
            except Exception as e1:
                if not is_oom(e1):
                    raise
                _free_memory()
                pixels = job.num_images * job.height * job.width
                results.append(
                    OutOfMemory(
                        f"out of memory generating {job.num_images} image(s) of "
                        f"{job.width}x{job.height} ({pixels} pixels) even one per model call; "
                        "retry shortly or ask for smaller images"
                    )
                )
    for job, r in zip(jobs, results, strict=True):
        if isinstance(r, Result) and job.key() in guard.per_call:
            r.batch_images = min(r.batch_images, guard.per_call[job.key()])
    return results


# --- HTTP: body size, slow clients, timeouts, API key, docs ---------------------------------------


@dataclass(frozen=True)
class HTTPLimits:
    max_body_bytes: int = 64 * 1024
    body_timeout_s: float = 10.0
    request_timeout_s: float = 120.0
    api_key_sha256: str = ""  # empty: no key needed
    docs: bool = False

    @classmethod
    def of(cls, args: LimitArgs, environ: MutableMapping[str, str] | None = None) -> HTTPLimits:
        env = os.environ if environ is None else environ
        digest = ""
        if args.api_key_env:
            key = env.get(args.api_key_env, "")
            if not key:
                raise ValueError(
                    f"api_key_env: the environment variable {args.api_key_env} is not set or "
                    "is empty (it must hold the API key clients send)"
                )
            digest = _sha256(key)
        return cls(
            args.max_body_bytes,
            args.body_timeout_s,
            args.request_timeout_s,
            digest,
            args.docs,
        )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def key_problem(authorization: str, key_sha256: str) -> str | None:
    """None when no key is needed or the ``Authorization: Bearer KEY`` header carries it
    (compared in constant time); else "missing" or "invalid". HTTP (RequestGuard) and the
    WebSocket handshake (live.authorized) both check with this."""
    if not key_sha256:
        return None
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return "missing"
    return None if hmac.compare_digest(_sha256(key.strip()), key_sha256) else "invalid"


DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
PUBLIC_PATHS = ("/", "/healthz")  # the page and the health check need no key
_ACTIVE = HTTPLimits()


def install(limits: HTTPLimits) -> None:
    """The limits ``RequestGuard`` applies in this process (one ingress replica per Ray actor
    process; until installed, the defaults)."""
    global _ACTIVE
    _ACTIVE = limits


def active() -> HTTPLimits:
    return _ACTIVE


class _Refused(Exception):
    def __init__(self, status: int, message: str, field: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def _is_openai(path: str) -> bool:
    return path.startswith(("/v1/images/generations", "/v1/models"))


def _error_body(path: str, status: int, message: str, field: str) -> bytes:
    """The error shape of the endpoint: OpenAI's for the OpenAI-compatible ones."""
    if _is_openai(path):
        code = {401: "invalid_api_key", 413: "request_too_large", 408: "request_timeout"}
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body: dict = {
            "error": {"message": message, "type": kind, "param": None, "code": code.get(status)}
        }
    else:
        body = {"error": message, "field": field}
    return json.dumps(body).encode()


async def _answer(send: Send, path: str, e: _Refused) -> None:
    body = _error_body(path, e.status, e.message, e.field)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware applying ``limits()`` (a callable, so one app object can take the limits
    its replica installs at start): docs, API key, body size and read time, request timeout."""

    def __init__(self, app: Callable, limits: Callable[[], HTTPLimits] = active) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lim = self.limits()
        root = scope.get("root_path", "")
        path = scope["path"]
        path = path[len(root) :] if root and path.startswith(root) else path
        path = path or "/"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lim.request_timeout_s
        try:
            has_body = self._check_headers(lim, scope, path)
            body = await self._read_body(lim, scope, receive) if has_body else None
        except _Refused as e:
            await _answer(send, path, e)
            return
        replayed = body is None  # no body: the app reads the request as it comes

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, replay, tracked), deadline - loop.time())
        except TimeoutError:
            if started:  # too late for a status: the client sees the body cut short
                raise
            why = f"request: not answered within {lim.request_timeout_s:g} s (request_timeout_s)"
            await _answer(send, path, _Refused(504, why, "request", {}))

    @staticmethod
    def _check_headers(lim: HTTPLimits, scope: Scope, path: str) -> bool:
        """Refuses what the headers already show; True when the request has a body to read."""
        if path in DOCS_PATHS and not lim.docs:
            raise _Refused(404, f"{path}: not served (start the app with docs=true)", "path", {})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = key_problem(headers.get("authorization", ""), lim.api_key_sha256)
        if problem and path not in PUBLIC_PATHS:
            if problem == "missing":
                raise _Refused(
                    401,
                    "authorization: this server needs an API key: send 'Authorization: Bearer KEY'",
                    "authorization",
                    {"WWW-Authenticate": "Bearer"},
                )
            raise _Refused(
                401,
                "authorization: the API key is not valid",
                "authorization",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > lim.max_body_bytes:
            raise _Refused(413, _too_large(int(length), lim), "body", {})
        return (length is not None and length != "0") or "transfer-encoding" in headers

    @staticmethod
    async def _read_body(lim: HTTPLimits, scope: Scope, receive: Receive) -> bytes:
        """The whole body (at most ``max_body_bytes``), received within ``body_timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lim.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _Refused(
                    408,
                    f"body: not received within {lim.body_timeout_s:g} s (body_timeout_s); "
                    f"{size} bytes arrived",
                    "body",
                    {},
                ) from None
            if message["type"] == "http.disconnect":
                raise _Refused(400, "body: the client disconnected", "body", {})
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > lim.max_body_bytes:
                raise _Refused(413, _too_large(size, lim, sent=False), "body", {})
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, lim: HTTPLimits, sent: bool = True) -> str:
    what = f"{size} bytes" if sent else f"more than {lim.max_body_bytes} bytes"
    return f"body: {what} is over this server's limit of {lim.max_body_bytes} (max_body_bytes)"
