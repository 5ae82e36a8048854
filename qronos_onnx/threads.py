"""torch intra-op threads for passes that do not gain from them.

Elementwise passes over weights (grids, round-to-nearest, dequantization, packing) are memory-bound: a second
thread barely helps them, and on a small shared CPU every parallel torch op waits for a thread the scheduler gave
away (measured on the 2-core bench box under load: 6 ms per 0.9 M-element op on 2 threads, 0.1-0.4 ms on one).
Their results do not depend on the thread count, so running them on one thread changes no bit of the output.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (CPU), restoring the caller's count afterwards."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
