"""Several processes on one quantization (``torchrun ... -m qronos_onnx quantize --distributed``).

Why it is laid out this way: the output must be byte-identical to a one-process run with the same seed, and a float
sum depends on its order. So the calibration chunks (``capture.batch_size`` samples per onnxruntime call, the same
chunks a single process makes) are split into contiguous blocks, one per rank; every chunk's partial sums of
X~ᵀX~, X~ᵀX and XᵀX are computed alone (``StatsAccumulator``) and added in global chunk order, on one process as on
many: rank 0 folds its chunks and sends the running sum to rank 1, which folds its own, and so on; the last rank
broadcasts the total. The solver batches of a wave (the problems one process would solve in one call) are spread
over the ranks by cost, solved whole, and their results broadcast, so every rank feeds its quantized stream the same
weights. Only rank 0 writes files.

Every wait polls, with the process group's timeout, for a failure a peer posted in the rendezvous store, so an error
on one rank stops the others within a fraction of a second with one line naming the rank, instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import pickle
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, QronosError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = 1800.0  # seconds one rank waits for another (a large layer's solve runs while peers wait)
_FAILED = "qronos/failed/"


class DistributedError(QronosError):
    """A peer failed, or did not answer within the timeout."""


def torchrun_world() -> int:
    """WORLD_SIZE when launched by torchrun (1 otherwise)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass
class Distributed:
    """This process's place in the group, and the few collectives quantize() needs."""

    rank: int
    world: int
    backend: str  # gloo (CPU) or nccl (CUDA)
    device: torch.device  # where the tensors of the collectives live
    timeout: float
    store: Any = field(repr=False, default=None)  # the rendezvous store: failures are posted there
    seconds: float = 0.0  # spent in communication (waits for peers included)
    bytes_sent: int = 0  # payload bytes this rank sent

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- work split
    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``n`` chunks (blocks differ in size by at most one)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def owners(self, costs: Sequence[float]) -> list[int]:
        """Rank that solves each item: largest first onto the least-loaded rank (ties: lowest rank)."""
        load = [0.0] * self.world
        out = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            out[i] = r
            load[r] += costs[i]
        return out

    # -- collectives
    def ordered_sum(self, held: list[list[torch.Tensor]], running: list[torch.Tensor], count: int
                    ) -> tuple[list[torch.Tensor], int]:
        """Sums over every rank's chunks, added in chunk order; every rank gets the same bits.

        ``running``: this rank's sums so far (rank 0: its whole block, folded as it came; other ranks: unused);
        ``held``: the partials of this rank's chunks in chunk order (ranks > 0), each a list parallel to
        ``running``; ``count``: this rank's tokens. Returns the totals and the total token count.
        """
        tic = time.perf_counter()
        n = torch.tensor([count], dtype=torch.int64, device=self.device)
        if self.rank > 0:
            running = [torch.empty_like(t) for t in running]
            before = torch.empty_like(n)
            for t in [*running, before]:
                self._wait(torch.distributed.irecv(t, src=self.rank - 1), f"the statistics of rank {self.rank - 1}")
            for part in held:
                for t, p in zip(running, part):
                    t += p
            n += before
        if self.rank < self.world - 1:
            for t in [*running, n]:
                self._wait(torch.distributed.isend(t, dst=self.rank + 1), f"rank {self.rank + 1} to take statistics")
                self.bytes_sent += t.numel() * t.element_size()
        for t in [*running, n]:
            self._broadcast(t, self.world - 1)
        self.seconds += time.perf_counter() - tic
        return running, int(n.item())

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` from rank ``src`` (pickled; tensors in it come back on the CPU)."""
        tic = time.perf_counter()
        if self.rank == src:
            data = torch.frombuffer(bytearray(pickle.dumps(_to_cpu(obj), protocol=5)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        size = size.to(self.device)
        self._broadcast(size, src)
        payload = data.to(self.device) if self.rank == src else torch.empty(int(size.item()), dtype=torch.uint8,
                                                                             device=self.device)
        self._broadcast(payload, src)
        self.seconds += time.perf_counter() - tic
        return obj if self.rank == src else pickle.loads(payload.cpu().numpy().tobytes())

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        if self.rank == src:
            self.bytes_sent += t.numel() * t.element_size() * (self.world - 1)
        self._wait(torch.distributed.broadcast(t, src=src, async_op=True), f"rank {src}'s broadcast")

    def _wait(self, work, what: str) -> None:
        """Wait for ``work``; raise DistributedError when a peer has posted a failure or the timeout passes.

        The backend's wait runs on a helper thread (gloo's point-to-point work reports completion only through it);
        this thread polls the store meanwhile. A helper left blocked by a failure dies with the process.
        """
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                work.wait()
            except BaseException as err:  # noqa: BLE001 - re-raised on the calling thread
                errors.append(err)

        helper = threading.Thread(target=wait, daemon=True, name="qronos-dist-wait")
        helper.start()
        start = time.monotonic()
        helper.join(0.05)
        while helper.is_alive():
            self.check_peers()
            if time.monotonic() - start > self.timeout:
                raise DistributedError(f"rank {self.rank}: no answer after {self.timeout:g} s waiting for {what} "
                                       "(a peer is stuck or gone; raise --dist-timeout for very large layers)")
            helper.join(0.05)
        if errors:
            self.check_peers()  # a peer's own message says more than the broken connection it left
            raise DistributedError(f"rank {self.rank}: {what} failed: {str(errors[0]).splitlines()[0]}")

    # -- failures
    def check_peers(self) -> None:
        if self.store is None:
            return
        for r in range(self.world):
            key = f"{_FAILED}{r}"
            if r != self.rank and self.store.check([key]):
                raise DistributedError(f"rank {r} failed: {self.store.get(key).decode(errors='replace')}; "
                                       f"rank {self.rank} stops too")

    def post_failure(self, err: BaseException) -> None:
        """Tell the peers why this rank stops (best effort: the store may be gone)."""
        if self.store is None or isinstance(err, DistributedError):
            return
        try:
            self.store.set(f"{_FAILED}{self.rank}", (str(err).splitlines() or [type(err).__name__])[0]
                           if isinstance(err, QronosError) else f"{type(err).__name__}: {err}"[:500])
        except Exception:  # noqa: BLE001 - the store went away with the failing rank's agent: nothing to tell
            pass

    @contextmanager
    def failure_guard(self) -> Iterator[None]:
        try:
            yield
        except BaseException as err:
            self.post_failure(err)
            raise

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def init_distributed(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT) -> Distributed:
    """Join the group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo on CPU, NCCL on CUDA."""
    missing = [k for k in ENV if k not in os.environ and k != "LOCAL_RANK"]
    if missing:
        raise ConfigError(f"--distributed needs the torchrun environment ({', '.join(missing)} not set); launch "
                          "with: torchrun --nproc-per-node N -m qronos_onnx quantize ... --distributed")
    if not timeout > 0:
        raise ConfigError(f"--dist-timeout must be a positive number of seconds, got {timeout!r}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    delta = datetime.timedelta(seconds=timeout)
    store, rank, world = next(torch.distributed.rendezvous("env://", rank, world, timeout=delta))
    torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore("qronos_pg", store),
                                         rank=rank, world_size=world, timeout=delta)
    return Distributed(rank=rank, world=world, backend=backend,
                       device=torch.device("cuda", local) if cuda else torch.device("cpu"), timeout=timeout,
                       store=torch.distributed.PrefixStore("qronos", store))
