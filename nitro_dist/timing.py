"""Phase timers for one training iteration (``benchmarks/train_throughput.py``, ``gpu_sdxl.py``).

``loop.train_step(run, it, timer=...)`` and the step functions wrap each phase of the iteration
in ``with timer("phase"):``. The default ``NO_TIMER`` does nothing, so training reads and costs
the same; ``PhaseTimer`` records where the time (and the GPU memory) goes.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

Timer = Callable[[str], AbstractContextManager[None]]


def no_timer(name: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


NO_TIMER: Timer = no_timer


class PhaseTimer:
    """Exclusive wall time per phase: a nested phase's time is not counted in its parent, so the
    phases of an iteration add up to its wall time.

    ``sync_cuda``: synchronise at every phase boundary, so GPU work is charged to the phase that
    launched it (it also removes the CPU's run-ahead: time a run without the timer for the
    iteration rate). ``track_memory``: peak CUDA memory allocated (bytes) within each phase.
    """

    def __init__(self, *, sync_cuda: bool = False, track_memory: bool = False) -> None:
        self.sync_cuda, self.track_memory = sync_cuda, track_memory
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._since = 0.0

    def _charge(self) -> float:
        """Charge the time (and memory peak) since the last boundary to the running phase."""
        if self.sync_cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] += now - self._since
            if self.track_memory:
                peak = torch.cuda.max_memory_allocated()
                self.peak_bytes[name] = max(self.peak_bytes[name], peak)
        if self.track_memory:
            torch.cuda.reset_peak_memory_stats()
        return now

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._since = self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._since = self._charge()
            self._stack.pop()

    def total(self) -> float:
        return sum(self.seconds.values())
