"""FrontierStore: RAM up to the budget, memory-mapped files beyond it, nothing left behind."""
from __future__ import annotations

import numpy as np

from qronos_onnx.capture.frontier import FrontierStore


def test_spills_beyond_the_budget_and_cleans_up(tmp_path):
    a, b = np.arange(10, dtype=np.float32), np.arange(20, dtype=np.float32).reshape(4, 5)
    caller = np.ones(1000, np.float32)
    with FrontierStore(max_memory=60, tmp_root=tmp_path) as store:
        store.borrow("in", caller)  # the caller's array: not counted, not copied
        store.put("a", a)  # 40 bytes: RAM
        store.put("b", b)  # 80 more would exceed 60: disk
        assert store.get("in") is caller and store.get("a") is a
        assert isinstance(store.get("b"), np.memmap) and np.array_equal(store.get("b"), b)
        assert not store.get("b").flags.writeable
        assert store.ram_bytes == 40 and store.disk_bytes == 80 and store.spilled == 1
        folder = store.tmp_dir
        assert folder is not None and len(list(folder.iterdir())) == 1
        store.drop("b")
        assert store.disk_bytes == 0 and not any(folder.iterdir()) and "b" not in store
        store.put("b", b)
        store.drop("a")
        store.put("c", a)  # RAM freed by the drop is reused
        assert store.ram_bytes == 40 and store.peak_disk_bytes == 80
    assert not folder.exists() and len(store) == 0


def test_no_folder_without_spill():
    store = FrontierStore(max_memory=1 << 20)
    store.put("a", np.zeros(3))
    store.close()
    assert store.tmp_dir is None
