"""Quantized codes kept on disk between their wave and the export, so that a run's memory does not grow with the
model: at one byte per weight an 8 B-parameter model's codes alone are 8 GB.

``SpilledWeights`` is the run's ``name -> QuantizedWeight`` dict: each weight stored in it has its codes written to
``<folder>/<n>.npy`` and dropped from memory; reading ``qw.codes`` afterwards loads them again (``np.load``,
``allow_pickle=False``), the last weight read cached so that the several reads of one export step cost one load.
Grids (scales, zero points) stay in memory: they are a few bytes per row or group.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from .quantized_weight import QuantizedWeight

SPILL_MIN_BYTES = 256 << 20  # runs whose target weights hold fewer codes than this keep them in memory

_last: list = [None, None]  # (file, codes): the one weight whose codes are held


def load_codes(path: str) -> torch.Tensor:
    """The codes saved at ``path`` (the last file read is cached; callers never modify codes in place)."""
    if _last[0] != path:
        _last[:] = [None, None]  # drop the previous weight before reading the next
        _last[:] = [path, torch.from_numpy(np.load(path, allow_pickle=False))]
    return _last[1]


def _forget(folder: str) -> None:
    if _last[0] is not None and str(_last[0]).startswith(folder):
        _last[:] = [None, None]
    shutil.rmtree(folder, ignore_errors=True)


class SpilledWeights(dict):
    """A ``dict[str, QuantizedWeight]`` whose values' codes live in a private temporary folder (removed by
    ``close()``, or when the dict is collected). ``root``: where the folder goes (default: the system's temp dir)."""

    def __init__(self, root: str | Path | None = None):
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="qronos-codes-", dir=root))
        self._n = itertools.count()
        self._cleanup = weakref.finalize(self, _forget, str(self.folder))

    def __setitem__(self, name: str, qw: QuantizedWeight) -> None:
        if "codes" in qw.__dict__:  # not yet spilled (a weight stored twice keeps its first file)
            path = self.folder / f"{next(self._n):06d}.npy"
            np.save(path, qw.codes.detach().cpu().numpy(), allow_pickle=False)
            del qw.__dict__["codes"]
            qw.__dict__["_codes_file"] = str(path)
        super().__setitem__(name, qw)

    def update(self, other=(), **kw) -> None:
        for k, v in dict(other, **kw).items():
            self[k] = v

    def close(self) -> None:
        self._cleanup()
