"""Frontier storage: the tensors alive between segments, for every calibration batch, in RAM up to a budget.

Beyond ``max_memory`` bytes new arrays go to ``.npy`` files in a private temporary folder and are read back
memory-mapped. The folder is removed by ``close()`` (the engine calls it on success, on error and on Ctrl-C), and by
a finalizer as a last resort if the store is garbage-collected unclosed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Hashable, Iterator

import numpy as np


SPILL_MARGIN_BYTES = 256 * 2**20  # keep this much free for everything else on the disk


def _check_room(folder: Path, nbytes: int) -> None:
    """A full disk mid-spill would leave a truncated .npy; refuse with the folder and the way out instead."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes + SPILL_MARGIN_BYTES:
        from ..errors import CalibrationError

        raise CalibrationError(f"no room to spill captured activations in {str(folder)!r} ({free / 1e6:.0f} MB free, "
                               f"{nbytes / 1e6:.0f} MB needed): raise --max-memory, use fewer --samples, or point "
                               f"TMPDIR at a larger disk")


def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class FrontierStore:
    """key -> array. ``borrow`` registers an array owned by someone else (never counted, never written)."""

    def __init__(self, max_memory: int, tmp_root: str | os.PathLike | None = None):
        self.max_memory = int(max_memory)
        self.tmp_root = tmp_root
        self.tmp_dir: Path | None = None  # created at the first spill
        self._arrays: dict[Hashable, np.ndarray] = {}
        self._files: dict[Hashable, Path] = {}
        self._ram: dict[Hashable, int] = {}
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.peak_ram_bytes = 0
        self.peak_disk_bytes = 0
        self.spilled = 0
        self._counter = 0
        self._serial: dict[Hashable, int] = {}  # owned arrays: a number never reused (checkpoints name files by it)
        self.next_serial = 0
        self._finalizer: weakref.finalize | None = None

    def __enter__(self) -> "FrontierStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._arrays

    def __len__(self) -> int:
        return len(self._arrays)

    def borrow(self, key: Hashable, arr: np.ndarray) -> None:
        self.drop(key)
        self._arrays[key] = arr

    def put(self, key: Hashable, arr: np.ndarray, *, serial: int | None = None) -> None:
        """Keep ``arr`` (which the store now owns) in RAM, or on disk if the RAM budget is spent.

        ``serial`` (restoring a checkpoint) keeps the array's number from the run that wrote it.
        """
        self.drop(key)
        arr = np.asarray(arr)
        if serial is None:
            serial = self.next_serial
        self._serial[key] = serial
        self.next_serial = max(self.next_serial, serial + 1)
        if self.ram_bytes + arr.nbytes <= self.max_memory:
            self._arrays[key] = arr
            self._ram[key] = arr.nbytes
            self.ram_bytes += arr.nbytes
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return
        path = self._new_path()
        _check_room(path.parent, arr.nbytes)
        np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
        self._arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        self._files[key] = path
        self.disk_bytes += arr.nbytes
        self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)
        self.spilled += 1

    def get(self, key: Hashable) -> np.ndarray:
        return self._arrays[key]

    def entries(self) -> Iterator[tuple[Hashable, np.ndarray, int | None, Path | None]]:
        """(key, array, serial, spill file) of every entry; serial None: borrowed (the store does not own it)."""
        for key, arr in self._arrays.items():
            yield key, arr, self._serial.get(key), self._files.get(key)

    def drop(self, key: Hashable) -> None:
        arr = self._arrays.pop(key, None)
        if arr is None:
            return
        self.ram_bytes -= self._ram.pop(key, 0)
        self._serial.pop(key, None)
        path = self._files.pop(key, None)
        if path is not None:
            self.disk_bytes -= arr.nbytes
            del arr  # drop the memory map before unlinking its file
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Forget every array and delete the temporary folder."""
        self._arrays.clear()
        self._files.clear()
        self._ram.clear()
        self._serial.clear()
        self.ram_bytes = self.disk_bytes = 0
        if self._finalizer is not None:
            self._finalizer()  # removes the folder once, and detaches
            self._finalizer = None

    def _new_path(self) -> Path:
        if self.tmp_dir is None:
            self.tmp_dir = Path(tempfile.mkdtemp(prefix="qronos-frontier-", dir=self.tmp_root))
            self._finalizer = weakref.finalize(self, _remove_dir, str(self.tmp_dir))
        self._counter += 1
        return self.tmp_dir / f"{self._counter:07d}.npy"
