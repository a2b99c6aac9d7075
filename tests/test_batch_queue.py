"""``batch_queue.WhenFree``: batches formed when the model is free, in plain asyncio (no Ray)."""

import asyncio
import time

import pytest

from nitro_dist.batch_queue import WhenFree


class Model:
    """A model call of ``dt`` seconds that records (model, jobs) per call."""

    def __init__(self, dt: float = 0.05, fail_on: object = None) -> None:
        self.dt, self.fail_on, self.calls = dt, fail_on, []

    async def __call__(self, model: str, jobs: list) -> list:
        self.calls.append((model, list(jobs)))
        await asyncio.sleep(self.dt)
        if self.fail_on in jobs:
            raise RuntimeError(f"bad job {self.fail_on}")
        return [f"{model}:{j}" for j in jobs]


def test_a_lone_request_runs_at_once_and_a_busy_model_batches_what_arrived():
    async def run() -> None:
        model = Model()
        q = WhenFree(model, max_batch_size=4)
        t = time.perf_counter()
        assert await q.submit("a", 0) == "a:0"
        assert time.perf_counter() - t < 0.05 + 0.04  # no batch timer on an idle model
        # 1 starts a call; 2..10 arrive while it runs: the next calls take 4, 4, then 1
        first = asyncio.create_task(q.submit("a", 1))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(q.submit("a", j)) for j in range(2, 11)]
        out = await asyncio.gather(first, *rest)
        assert out == [f"a:{j}" for j in range(1, 11)]  # each caller gets its own answer
        assert [jobs for _, jobs in model.calls] == [[0], [1], [2, 3, 4, 5], [6, 7, 8, 9], [10]]
        assert q.calls == [1, 1, 4, 4, 1]

    asyncio.run(run())


def test_models_are_never_mixed_and_take_turns():
    async def run() -> None:
        model = Model(dt=0.02)
        q = WhenFree(model, max_batch_size=2)
        busy = asyncio.create_task(q.submit("a", 0))
        await asyncio.sleep(0.005)
        jobs = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]
        out = await asyncio.gather(busy, *(q.submit(m, j) for m, j in jobs))
        assert out == ["a:0", "a:1", "b:2", "a:3", "a:4", "b:5"]
        # after a's call: a (waiting longest) takes 2, then b, then a's rest
        assert model.calls == [("a", [0]), ("a", [1, 3]), ("b", [2, 5]), ("a", [4])]

    asyncio.run(run())


def test_a_failed_call_fails_its_jobs_only_and_cancelled_jobs_are_dropped():
    async def run() -> None:
        model = Model(dt=0.02, fail_on=2)
        q = WhenFree(model, max_batch_size=2)
        busy = asyncio.create_task(q.submit("a", 0))
        await asyncio.sleep(0.005)
        gone = asyncio.create_task(q.submit("a", 9))
        bad = [asyncio.create_task(q.submit("a", j)) for j in (1, 2)]
        await asyncio.sleep(0)
        gone.cancel()  # the client went away before its batch was taken
        later = asyncio.create_task(q.submit("a", 3))
        assert await busy == "a:0"
        for task in bad:
            with pytest.raises(RuntimeError, match="bad job 2"):
                await task
        assert await later == "a:3"  # the queue keeps working after a failed call
        assert all(9 not in jobs for _, jobs in model.calls)

    asyncio.run(run())
    with pytest.raises(ValueError, match="max_batch_size"):
        WhenFree(Model(), max_batch_size=0)
