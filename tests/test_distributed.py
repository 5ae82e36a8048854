"""torchrun with 2 gloo ranks writes the same bytes as one process (tiny transformer and CNN, Qronos and GPTQ).

The statistics are ordered sums of per-chunk partials on one process as on several (dist.py), and each solver batch
is solved whole on one rank, so equality is exact. A skinny GEMM's bits depend on torch's thread count: the ranks
start on one thread (OMP_NUM_THREADS=1), the reference on two, and quantize() pins both to capture.threads. One
torchrun launch runs every case (its start-up is most of the cost).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from tests import tiny_models as tm
from tests._dist_run import CASES, run_case

SCRIPT = Path(__file__).with_name("_dist_run.py")


def _torchrun(root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SCRIPT), str(root), *extra], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    onnx.save(tm.transformer(n_blocks=2, d=32, ffn=64), root / "transformer.onnx")
    onnx.save(tm.cnn(), root / "cnn.onnx")
    (root / "dist").mkdir()
    proc = _torchrun(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    single = root / "single"
    single.mkdir()
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the ranks' count: the pinning must make it irrelevant
    try:
        results = {name: run_case(name, root, single / f"{name}.onnx") for name in CASES}
    finally:
        torch.set_num_threads(before)
    return root, {x["rank"]: x["wrote"] for x in lines}, results


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_write_the_bytes_of_one_process(runs, case):
    root, _, _ = runs
    a, b = root / "single" / f"{case}.onnx", root / "dist" / f"{case}.onnx"
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_report_errors_equal(runs, case):
    root, _, results = runs
    report = json.loads((root / "dist" / f"{case}.onnx.report.json").read_text())
    got = [(r["weight"], r["rel_error"], r["rtn_rel_error"], r["n_tokens"]) for r in report["layers"]]
    want = [(r.weight, r.rel_error, r.rtn_rel_error, r.n_tokens) for r in results[case].layers]
    assert got == want and all(e is not None for _, e, _, _ in got)


def test_only_rank_0_writes(runs):
    _, wrote, _ = runs
    assert wrote[1] == []
    written = {w.split()[-1] for w in wrote[0]}
    for case in CASES:  # staged beside the output, then moved into place
        assert {f"dist/{case}.onnx{s}" for s in ("", ".config.yaml", ".report.json")} <= written


def test_a_failing_rank_stops_the_other(tmp_path):
    onnx.save(tm.transformer(n_blocks=2, d=32, ffn=64), tmp_path / "transformer.onnx")
    onnx.save(tm.cnn(), tmp_path / "cnn.onnx")
    (tmp_path / "dist").mkdir()
    proc = _torchrun(tmp_path, "fail")
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert not list((tmp_path / "dist").glob("*.onnx"))


@pytest.mark.parametrize("env, argv, fragment", [
    ({"WORLD_SIZE": "2"}, [], "add --distributed"),
    ({"WORLD_SIZE": None, "MASTER_ADDR": None, "RANK": None}, ["--distributed"], "torchrun environment"),
    ({"WORLD_SIZE": None}, ["--dist-timeout", "5"], "--dist-timeout applies only with --distributed"),
])
def test_launch_mistakes_are_one_line(tmp_path, monkeypatch, capsys, env, argv, fragment):
    from qronos_onnx import cli

    for k, v in env.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    onnx.save(tm.cnn(), tmp_path / "cnn.onnx")
    code = cli.main(["quantize", str(tmp_path / "cnn.onnx"), "--calib", str(tmp_path), "-o",
                     str(tmp_path / "q.onnx"), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err
    assert not (tmp_path / "q.onnx").exists()
