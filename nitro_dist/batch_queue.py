"""Dynamic batching that forms a batch when the model is free, not on a timer.

Serve's ``@serve.batch`` (Ray 2.60) waits ``batch_wait_timeout_s`` after every first request,
even a lone one, and forms the next batch while the previous model call still runs (the batch
then waits on the ``max_concurrent_batches`` semaphore), so requests that arrive during a call
do not join the call after it. ``WhenFree`` runs one model call at a time and takes, as soon as
the previous call returns, every request waiting for the same model (up to
``max_batch_size``): a lone request on an idle model runs at once, and under load each call
takes what arrived during the last one. ``wait_s`` (0 by default) lets a batch that is not full
wait for company when the model is idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

J = TypeVar("J")

RunBatch = Callable[[str, list[J]], Awaitable[list[Any]]]


class WhenFree(Generic[J]):
    """``await submit(model, job)``: ``run(model, jobs)``'s answer for ``job``, batched with the
    other jobs of ``model`` waiting when the model is free. Models take turns (oldest waiting
    first); an exception of a call is raised to every job of that call."""

    def __init__(self, run: RunBatch, max_batch_size: int, wait_s: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.waiting: dict[str, list[tuple[J, asyncio.Future]]] = {}  # by model, oldest first
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.calls: list[int] = []  # jobs per model call, for tests and stats (last 1,000)

    async def submit(self, model: str, job: J) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(model, []).append((job, fut))
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await fut

    def _take(self) -> tuple[str, list[tuple[J, asyncio.Future]]]:
        model = next(iter(self.waiting))  # the model waiting longest
        queue = [(j, f) for j, f in self.waiting.pop(model) if not f.done()]  # drop cancelled
        batch, rest = queue[: self.max_batch_size], queue[self.max_batch_size :]
        if rest:
            self.waiting[model] = rest  # to the back: the other models' turn first
        return model, batch

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.waiting:
                if self.wait_s > 0 and self._short():
                    await asyncio.sleep(self.wait_s)
                model, batch = self._take()
                if not batch:
                    continue
                self.calls = [*self.calls[-999:], len(batch)]
                try:
                    results = await self.run(model, [j for j, _ in batch])
                except Exception as e:
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), r in zip(batch, results, strict=True):
                    if not f.done():
                        f.set_result(r)

    def _short(self) -> bool:
        first = next(iter(self.waiting.values()))
        return len(first) < self.max_batch_size
