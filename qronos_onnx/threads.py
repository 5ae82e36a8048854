"""torch intra-op threads: pinned for a whole run, and one thread for passes that do not gain from more.

Pinned: a GEMM's last bits depend on torch's thread count. A skinny one (a few output columns, a long inner sum, as
in a CNN's X̃ᵀX̃ over a tall im2col matrix, or a transformer's over a batch of 1024+ tokens) is split by MKL along
its inner sum differently on one thread than on two, and the solvers amplify those bits into other codes (on a
small CNN 10 % of Qronos's codes differed between OMP_NUM_THREADS=1 and 2, tests/test_determinism.py). So
``quantize()`` runs everything that feeds the output (statistics, solvers, grids, MagR, SmoothQuant, rotations,
sensitivity) on ``pinned_threads(capture.threads)`` torch threads, the count onnxruntime's capture uses (default 2),
whatever OMP_NUM_THREADS, the core count or the caller's ``torch.set_num_threads`` say, and restores the caller's
count afterwards. ``capture.threads: 0`` means every core this process may run on, for torch as for onnxruntime:
faster on a many-core machine, but the output then depends on the machine.

One thread: elementwise passes over weights and activations (grids, round-to-nearest, dequantization, packing, im2col
copies) are memory-bound: a second thread barely helps them, and on a small shared CPU every parallel torch op waits
for a thread the scheduler gave away, spinning meanwhile (measured on the 2-core bench box under load: 6 ms per
0.9 M-element elementwise op on 2 threads, 0.1-0.4 ms on one). Their results do not depend on the thread count, so
running them on one thread changes no bit of the output. CPU LAPACK calls (Cholesky, inverse) also run on one thread
(rounding/core.py::lapack_one_thread): MKL blocks them by thread count. So do Qronos' power iteration (matrix-vector
products: the same bits on one and two threads) and, by ``threads_for``, the products of small problems: a conv's
statistics with fewer than ``ONE_THREAD_FEATURES`` features per group (capture/stats.py, pieces of a few hundred
microseconds) and the solves and errors of layers with fewer columns (api.py). There a second thread only waits; the
choice is fixed by the shapes, so those results do not depend on ``capture.threads`` at all.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


ONE_THREAD_FEATURES = 256  # see threads_for


def threads_for(n_features: int) -> int:
    """torch threads for products over ``n_features`` columns: one below ``ONE_THREAD_FEATURES``, else the current.

    Small products (a depthwise conv's 9 or 25 columns, a narrow 1x1 conv's) take well under a millisecond; on a
    loaded 2-core box a second thread made them milliseconds, spinning. A function of the shape only, not of the
    machine, so the bits it gives are the same everywhere.
    """
    return 1 if n_features < ONE_THREAD_FEATURES else torch.get_num_threads()


def cores() -> int:
    """CPUs this process may run on (its affinity mask on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pinned_threads(threads: int) -> int:
    """torch's thread count for a run with ``capture.threads = threads`` (0: every core, machine-dependent)."""
    return threads or cores()


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
