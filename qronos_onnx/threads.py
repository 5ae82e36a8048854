"""torch intra-op threads for passes that do not gain from them.

Elementwise passes over weights and activations (grids, round-to-nearest, dequantization, packing, im2col copies)
are memory-bound: a second thread barely helps them, and on a small shared CPU every parallel torch op waits for a
thread the scheduler gave away, spinning meanwhile (measured on the 2-core bench box under load: 6 ms per
0.9 M-element elementwise op on 2 threads, 0.1-0.4 ms on one). Their results do not depend on the thread count, so
running them on one thread changes no bit of the output.

GEMMs are left on the caller's threads: a skinny one (a few output columns, a long inner sum, as in a CNN's
statistics) gives other bits on one thread than on two (MKL splits the inner sum), and the output must not change.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the count it had afterwards."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
