"""Issue 14 items 1-2: no output file (model, .data, sidecars) may ever land on an input of the run, whatever the
flags; sidecars follow the output's rules; a failed run leaves nothing behind and every old file intact."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qronos_onnx import api
from qronos_onnx.api import quantize
from qronos_onnx.cli import main
from qronos_onnx.config import load_recipe
from qronos_onnx.errors import ExportError
from qronos_onnx.graph.io import check_output_path, run_inputs

from . import tiny_models as tm

REPO = Path(__file__).resolve().parent.parent


def _sha_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def run_files(tmp_path):
    """An MLP with external data, a calibration folder and a tokenizer-like folder, all in ``tmp_path/in``."""
    d = tmp_path / "in"
    d.mkdir()
    onnx.save(tm.residual_mlp(), str(d / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    calib = d / "calib"
    calib.mkdir()
    for i, s in enumerate(tm.mlp_inputs(n=4)):
        np.savez(calib / f"a{i}.npz", **s)
    tok = d / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    return d / "model.onnx", calib, tok


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qronos_onnx", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _refused(args: list[str], expect: str, cwd: Path | None = None) -> str:
    """The CLI in a subprocess (once: the real exit code and stderr) or in-process (fast, same main())."""
    if cwd is not None:
        r = _cli("quantize", *args, cwd=cwd)
        code, err = r.returncode, r.stderr
    else:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            code = main(["quantize", *args])
        err = buf.getvalue()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert expect in lines[0], lines[0]
    return lines[0]


def test_cli_never_writes_over_an_input(run_files, tmp_path):
    model, calib, _ = run_files
    before = _sha_tree(tmp_path / "in")
    base = [str(model), "--calib", str(calib), "--w4", "--algo", "rtn", "--overwrite"]
    # the input model's own external-data file, as the output model (the case that destroyed weights)
    _refused(base + ["-o", str(model) + ".data"], "is the external data of the input model")
    # a calibration file the run reads, and a new .npz in the calibration folder
    _refused(base + ["-o", str(calib / "a0.npz")], "is the calibration file")
    _refused(base + ["-o", str(calib / "new.npz")], "would add a calibration file")
    # the calibration folder itself
    _refused(base + ["-o", str(calib)], "is a directory")
    # relative paths from another working directory
    _refused([os.path.relpath(model, calib), "--calib", ".", "--w4", "--overwrite", "-o", "a1.npz"],
             "is the calibration file", cwd=calib)
    # a symlink and a hard link that point at inputs
    link = tmp_path / "link.onnx"
    link.symlink_to(calib / "a2.npz")
    _refused(base + ["-o", str(link)], "is the calibration file")
    hard = tmp_path / "hard.onnx"
    os.link(str(model) + ".data", hard)
    _refused(base + ["-o", str(hard)], "is the external data of the input model")
    # an output whose *data file* is a hard link to the input's data
    os.link(str(model) + ".data", tmp_path / "q2.onnx.data")
    _refused(base + ["-o", str(tmp_path / "q2.onnx")], "external data file")
    # an output whose sidecar is the calibration file (symlinked name)
    (tmp_path / "q3.onnx.report.json").symlink_to(calib / "a3.npz")
    _refused(base + ["-o", str(tmp_path / "q3.onnx")], "report sidecar")
    assert _sha_tree(tmp_path / "in") == before, "an input changed"


def test_tokenizer_and_text_files_are_inputs(run_files, tmp_path):
    model, calib, tok = run_files
    text = tmp_path / "in" / "text.txt"
    text.write_text("hello world\n")
    inputs = run_inputs(model, None, text, tok)
    roles = {r for r, _ in inputs}
    assert {"input model", "calibration file", "tokenizer directory", "tokenizer file"} <= roles
    with pytest.raises(ExportError, match=r"is the tokenizer file .*tokenizer\.json"):
        check_output_path(model, tok / "tokenizer.json", True, inputs)
    with pytest.raises(ExportError, match=r"is the calibration file .*text\.txt"):
        check_output_path(model, text, True, inputs)
    with pytest.raises(ExportError, match=r"config sidecar .*text\.txt"):
        (tmp_path / "in" / "o.onnx.config.yaml").symlink_to(text)
        check_output_path(model, tmp_path / "in" / "o.onnx", True, inputs)
    # an output folder that merely holds inputs is fine: nothing is overwritten
    assert check_output_path(model, tok / "model.q.onnx", False, inputs) == (tok / "model.q.onnx").absolute()


@pytest.mark.parametrize("sidecar", [".config.yaml", ".report.json", ".data"])
def test_existing_sidecar_is_refused_before_any_work(run_files, tmp_path, monkeypatch, sidecar):
    model, calib, _ = run_files
    out = tmp_path / "q.onnx"
    side = Path(str(out) + sidecar)
    side.write_text("keep me")

    def no_capture(*a, **k):
        raise AssertionError("the run started capture before refusing the output")

    monkeypatch.setattr(api, "CaptureEngine", no_capture)
    with pytest.raises(ExportError, match=f"{side.name}' of output .* already exists; pass --overwrite"):
        quantize(model, calib, out, load_recipe("w4"), quiet=True)
    assert side.read_text() == "keep me" and not out.exists()


def test_failed_validation_leaves_nothing_and_keeps_old_files(run_files, tmp_path, monkeypatch):
    model, calib, _ = run_files
    out = tmp_path / "q.onnx"
    cfg = load_recipe("w4").override({"rounding.algorithm": "rtn"})
    quantize(model, calib, out, cfg, quiet=True)
    old = _sha_tree(tmp_path)

    def bad_validation(path, *a, **k):
        assert Path(path).parent != out.parent, "validation must run on the staged file, before it is in place"
        raise ExportError(f"exported model {str(path)!r} fails onnx.checker: invented")

    monkeypatch.setattr(api, "validate_export", bad_validation)
    with pytest.raises(ExportError, match="invented"):
        quantize(model, calib, out, cfg, quiet=True, overwrite=True)
    after = _sha_tree(tmp_path)
    assert any(k.startswith("q.onnx.qronos-resume/") for k in after)  # the waves done stay resumable
    assert {k: v for k, v in after.items() if ".qronos-resume/" not in k} == old  # old output and sidecars intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # and on a fresh output name nothing at all is written
    with pytest.raises(ExportError, match="invented"):
        quantize(model, calib, tmp_path / "fresh.onnx", cfg, quiet=True)
    assert not [p for p in tmp_path.glob("fresh*") if not p.name.endswith(".qronos-resume")] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_output_and_sidecars_together(run_files, tmp_path):
    model, calib, _ = run_files
    out = tmp_path / "q.onnx"
    for suffix in ("", ".config.yaml", ".report.json"):
        Path(str(out) + suffix).write_text("old")
    quantize(model, calib, out, load_recipe("w4").override({"rounding.algorithm": "rtn"}), quiet=True,
             overwrite=True)
    onnx.checker.check_model(str(out), full_check=True)
    assert Path(str(out) + ".config.yaml").read_text().startswith("weights")
    assert Path(str(out) + ".report.json").read_text().startswith("{")
