"""Run a block with torch's intra-op thread count set, restored after (it fixes the order of
float sums: two runs compare bit for bit only with the same count)."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
