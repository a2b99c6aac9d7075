"""Draw as you type: one WebSocket per page, each message a prompt, an image back for the newest.

The newest prompt of a client always wins. A ``LatestSlot`` per connection holds at most one
waiting request: a message that arrives while the model works on that client's previous one
replaces the waiting one, which is dropped (counted) before it reaches the model. So a client
never waits behind its own stale prompts, and the last prompt typed is always the last image
made. Protocol (JSON text frames):

  client -> {"id": int, "prompt": str, "seed": int, "steps": 1-4, "model": str (optional)}
  server -> {"id", "prompt", "seed", "steps", "image": base64 PNG, "dropped": int, "ms": float}
            or {"id", "error": str} for a request that cannot be served
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.websockets import WebSocket, WebSocketDisconnect

from nitro_dist.image_api import MAX_PROMPT_CHARS, SEED_MAX, StrictInt, b64, not_blank

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """A one-item mailbox where the newest item wins: ``put`` replaces an item nobody took yet
    (``dropped`` counts those), ``take`` waits for the next item (None once closed)."""

    def __init__(self) -> None:
        self._item: T | None = None
        self._full = False
        self._closed = False
        self._ready = asyncio.Event()
        self.taken = 0
        self.dropped = 0

    def put(self, item: T) -> None:
        if self._closed:
            raise RuntimeError("put on a closed LatestSlot")
        if self._full:
            self.dropped += 1
        self._item, self._full = item, True
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def take(self) -> T | None:
        while not self._full:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        item, self._item, self._full = self._item, None, False
        self.taken += 1
        return item


class LiveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictInt = 0
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: StrictInt = Field(default=0, ge=0, le=SEED_MAX)
    steps: StrictInt = Field(default=1, ge=1, le=4)
    model: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return not_blank(v)


@dataclass
class LiveStats:
    """Counts over all sessions of one ingress: requests received, dropped as stale before they
    reached the model, and images made."""

    sessions: int = 0
    requests: int = 0
    dropped: int = 0
    images: int = 0


def authorized(headers: Mapping[str, str], key_sha256: str) -> bool:
    """The WebSocket handshake carries the API key as HTTP requests do (``Authorization: Bearer
    KEY``); the HTTP guard (serve_limits.RequestGuard) sees only HTTP, so the socket checks."""
    from nitro_dist.serve_limits import key_problem  # here: it imports the model code

    return key_problem(headers.get("authorization", ""), key_sha256) is None


# (prompt, seed, steps, model) -> PNG bytes; ValueError: a message for the client
MakeImage = Callable[[str, int, int, str | None], Awaitable[bytes]]


async def live_session(ws: WebSocket, make_image: MakeImage, stats: LiveStats) -> None:
    """Serve one WebSocket until the client goes: a reader puts every request into the
    connection's ``LatestSlot``, a worker makes the newest one."""
    await ws.accept()
    stats.sessions += 1
    slot: LatestSlot[LiveRequest] = LatestSlot()
    send_lock = asyncio.Lock()  # the reader (errors) and the worker (images) both send

    async def send(msg: dict) -> None:
        async with send_lock:
            await ws.send_json(msg)

    async def work() -> None:
        while (req := await slot.take()) is not None:
            t0 = time.perf_counter()
            try:
                png = await make_image(req.prompt, req.seed, req.steps, req.model)
            except ValueError as e:
                await send({"id": req.id, "error": str(e)})
                continue
            stats.images += 1
            await send(
                {
                    "id": req.id,
                    "prompt": req.prompt,
                    "seed": req.seed,
                    "steps": req.steps,
                    "image": b64(png),
                    "dropped": slot.dropped,
                    "ms": round(1000 * (time.perf_counter() - t0), 1),
                }
            )

    worker = asyncio.create_task(work())
    try:
        while True:
            raw = await ws.receive_text()
            try:
                req = LiveRequest.model_validate_json(raw)
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(p) for p in err.get("loc", ())) or "body"
                await send({"error": f"{field}: {err.get('msg')}", "field": field})
                continue
            stats.requests += 1
            before = slot.dropped
            slot.put(req)
            stats.dropped += slot.dropped - before
    except WebSocketDisconnect:
        pass
    finally:
        slot.close()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
