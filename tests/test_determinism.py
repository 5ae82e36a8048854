"""Same model, data, config and seed -> byte-identical output files, whatever the thread count.

Each run is a fresh process (``_determinism_run.py``) so that OMP_NUM_THREADS / MKL_NUM_THREADS set torch's threads
before torch loads; one run also has the caller change torch.set_num_threads itself. The single-thread run is also
pinned to one CPU, which changes what onnxruntime would pick by default (the core count): capture.threads must make
that irrelevant, for onnxruntime's threads and torch's alike (quantize() pins torch to capture.threads, threads.py).
Before LAPACK ran on one thread and the capture threads were fixed, 14-23 % of the tiny transformer's codes
differed here; before torch's threads were pinned, Qronos's codes did on the CNN with tall im2col matrices (978 of
11424 at 1 vs 2 threads) and on the transformer with 1024-token chunks (6555 of 85120). GPTQ's did not in these
cases (it reads only X̃ᵀX̃, whose last-bit differences it did not turn into other codes); it is checked all the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_determinism_run.py")
CONFIGS = ["transformer:qronos-w4", "transformer:gptq-w4a8-g32", "transformer-long:qronos-w4-b8", "cnn:qronos-w4",
           "cnn:gptq-w4"]


def _run(out_dir: Path, threads: int, one_cpu: bool = False, set_threads: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    preexec = None
    if one_cpu and hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        preexec = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
    extra = ["--set-threads", str(set_threads)] if set_threads else []
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out_dir), *extra, *CONFIGS], env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=preexec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["torch_threads"] == (set_threads or threads)  # the helper also checks quantize() restores it
    return info


RUNS = {"t1": (1, True, None), "t2": (2, False, None), "t2-again": (2, False, None), "set3": (1, False, 3)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    return {name: (root / name, _run(root / name, *how)) for name, how in RUNS.items()}


def _file(run, config) -> Path:
    return run[0] / f"{config.replace(':', '-')}.onnx"


def _differing_codes(a: Path, b: Path) -> str:
    """'n / total codes' that differ between two outputs (what a failure reports)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def codes(path):
        return {i.name: np.asarray(numpy_helper.to_array(i)).astype(np.int16) for i in onnx.load(path).graph.initializer
                if i.name.endswith("_quantized")}

    ca, cb = codes(a), codes(b)
    n = sum(int((ca[k] != cb[k]).sum()) for k in ca)
    total = sum(v.size for v in ca.values())
    return f"{n} / {total} codes ({100 * n / max(total, 1):.1f} %)"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("other", ["t1", "set3"])
def test_thread_counts_write_the_same_bytes(runs, config, other):
    """OMP_NUM_THREADS=1 on one CPU, and a caller's torch.set_num_threads(3), against OMP_NUM_THREADS=2."""
    a, b = _file(runs[other], config), _file(runs["t2"], config)
    assert a.read_bytes() == b.read_bytes(), f"{config}: {_differing_codes(a, b)} differ, {other} vs t2"


@pytest.mark.parametrize("config", CONFIGS)
def test_two_runs_in_a_row_write_the_same_bytes(runs, config):
    assert _file(runs["t2"], config).read_bytes() == _file(runs["t2-again"], config).read_bytes()


def test_the_runs_did_quantize(runs):
    """Guard against a vacuous pass: the files hold real 4-bit codes, not copies of one another's inputs."""
    info = runs["t2"][1]
    for config in CONFIGS:
        assert info["n_codes"][config] > 10_000


def test_quantize_pins_torch_threads_and_restores_them(tmp_path, monkeypatch):
    """Inside quantize() torch runs on capture.threads (0: every core), whatever the caller set; the caller's count
    comes back afterwards, also when quantize() fails."""
    import onnx
    import torch

    from qronos_onnx.api import quantize
    from qronos_onnx.capture import stats
    from qronos_onnx.config import load_recipe
    from qronos_onnx.errors import QronosError
    from qronos_onnx.threads import cores
    from tests import tiny_models as tm

    onnx.save(tm.cnn(), tmp_path / "cnn.onnx")
    seen: list[int] = []
    add = stats.StatsAccumulator.add
    monkeypatch.setattr(stats.StatsAccumulator, "add",
                        lambda self, *a, **k: (seen.append(torch.get_num_threads()), add(self, *a, **k))[1])
    before = torch.get_num_threads()
    try:
        for caller, threads, want in ((3, 2, 2), (1, 1, 1), (1, 0, cores())):
            torch.set_num_threads(caller)
            seen.clear()
            quantize(tmp_path / "cnn.onnx", tm.cnn_inputs(n=2), tmp_path / f"q{threads}.onnx",
                     load_recipe("w4").override({"capture.threads": threads}), quiet=True)
            assert set(seen) == {want} and torch.get_num_threads() == caller
        torch.set_num_threads(3)
        with pytest.raises(QronosError):  # refused after the threads were pinned: the output exists
            quantize(tmp_path / "cnn.onnx", tm.cnn_inputs(n=2), tmp_path / "q2.onnx", load_recipe("w4"), quiet=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
