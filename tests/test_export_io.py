"""Saving: external data in and out, input files untouched, atomic writes, refused output paths."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qronos_onnx.errors import ExportError
from qronos_onnx.export import export_qdq, validate_export
from qronos_onnx.graph import io as gio
from qronos_onnx.graph.io import check_output_path, save_model
from qronos_onnx.graph.model import load_model
from qronos_onnx.graph.targets import find_targets

from . import tiny_models as tm
from .test_export import quantize_rtn, run, substituted


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _external_locations(path: Path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    locs = set()
    for t in m.graph.initializer:
        if onnx.external_data_helper.uses_external_data(t):
            locs.add(next(e.value for e in t.external_data if e.key == "location"))
    return locs


def test_external_data_in_and_out(tmp_path):
    """Lazy input with external data -> quantize -> external data output in another folder; inputs unchanged."""
    proto = tm.transformer(n_blocks=2, d=64, ffn=128)  # int4 [64,128] = 4 KiB: over the 1 KiB threshold
    feeds = tm.transformer_inputs(1, d=64)[0]
    ref_proto = onnx.ModelProto()
    ref_proto.CopyFrom(proto)
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    src = src_dir / "model.onnx"
    onnx.save(proto, str(src), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = src_dir / "model.onnx.data"
    hashes = {p: _sha(p) for p in (src, data)}

    model = load_model(src)
    lazy = [v.name for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert len(lazy) == len(model.graph.initializers)  # every tensor is lazy, read only when touched
    targets = find_targets(model)
    q = quantize_rtn(model, targets, 4, True, 16)
    export_qdq(model, q, targets, metadata={"quant.algorithm": "rtn"})

    out = save_model(model, out_dir / "q.onnx", external_data=True)  # folder created on the way
    assert out == (out_dir / "q.onnx").absolute()
    assert (out_dir / "q.onnx.data").stat().st_size > 0
    assert _external_locations(out) == {"q.onnx.data"}  # nothing points back to the input's data file
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx", "q.onnx.data"]  # no temp leftovers
    # tensors that stayed lazy (inv_sqrt_d, 4 bytes) were read from the *input* location and written inline
    m = onnx.load(str(out), load_external_data=False)
    small = next(t for t in m.graph.initializer if t.name == "inv_sqrt_d")
    assert not onnx.external_data_helper.uses_external_data(small)
    report = validate_export(out, q, targets)
    assert report.n_golden == len(targets)
    assert report.file_bytes == out.stat().st_size + (out_dir / "q.onnx.data").stat().st_size
    np.testing.assert_allclose(run(out, feeds)[0], run(substituted(ref_proto, q, targets), feeds)[0], rtol=1e-5,
                               atol=1e-5)

    # the same in-memory model saved as one self-contained file next to the input
    out2 = save_model(model, src_dir / "q_inline.onnx", external_data=False)
    assert _external_locations(out2) == set()
    validate_export(out2, q, targets)
    # the model object still reads from the input files, which are byte-for-byte unchanged
    assert {p: _sha(p) for p in (src, data)} == hashes
    assert sorted(p.name for p in src_dir.iterdir()) == ["model.onnx", "model.onnx.data", "q_inline.onnx"]


def test_auto_external_data_above_threshold(tmp_path, monkeypatch):
    model = ir.from_proto(tm.residual_mlp(d=32))
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD_BYTES", 100)  # 2 x 32x32 fp32 = 8 KiB is "large" now
    out = save_model(model, tmp_path / "big.onnx")
    assert _external_locations(out) == {"big.onnx.data"}
    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD_BYTES", 10**9)
    out = save_model(model, tmp_path / "small.onnx")
    assert _external_locations(out) == set() and not (tmp_path / "small.onnx.data").exists()


def _existing_output(tmp_path: Path) -> tuple[ir.Model, Path, dict[Path, str]]:
    model = ir.from_proto(tm.residual_mlp(d=32))
    out = save_model(model, tmp_path / "q.onnx", external_data=True)
    files = [out, tmp_path / "q.onnx.data"]
    return model, out, {p: _sha(p) for p in files}


@pytest.mark.parametrize("external", [True, False])
def test_failed_save_leaves_existing_output_intact(tmp_path, monkeypatch, external):
    model, out, hashes = _existing_output(tmp_path)
    real_save = onnx.save

    def half_save(proto, f, *a, **k):  # write half the bytes under the (temp) name, then die like a full disk
        data = proto.SerializeToString()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    def half_streamed(model, f):  # the inline writer (graph/io.py save_streamed) dying the same way
        half_save(ir.serde.serialize_model(model), f)

    monkeypatch.setattr(onnx, "save", half_save)
    monkeypatch.setattr(gio, "save_streamed", half_streamed)
    with pytest.raises(ExportError, match=r"failed to write '.*q\.onnx'.*No space left"):
        save_model(model, out, external_data=external, overwrite=True)
    monkeypatch.setattr(onnx, "save", real_save)
    assert {p: _sha(p) for p in hashes} == hashes  # the old output (model and data) is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]  # temp files cleaned up
    onnx.checker.check_model(str(out), full_check=True)


def test_failed_rename_leaves_existing_output_intact(tmp_path, monkeypatch):
    model, out, hashes = _existing_output(tmp_path)
    real_replace = os.replace

    calls = []

    def fail_replace(a, b):  # the data file goes into place, then the model rename fails
        calls.append(Path(b).name)
        if Path(b) == out:
            raise OSError(5, "Input/output error")
        real_replace(a, b)

    monkeypatch.setattr(gio.os, "replace", fail_replace)
    with pytest.raises(ExportError, match="failed to write"):
        save_model(model, out, external_data=True, overwrite=True)
    monkeypatch.setattr(gio.os, "replace", real_replace)
    assert "q.onnx.data" in calls and calls[-2:] == ["q.onnx", "q.onnx.data"]  # new data in, then rolled back
    assert {p: _sha(p) for p in hashes} == hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]


def test_overwrite_replaces_and_drops_stale_data(tmp_path):
    model, out, hashes = _existing_output(tmp_path)
    with pytest.raises(ExportError, match=r"q\.onnx' already exists.*overwrite"):
        save_model(model, out)
    save_model(model, out, overwrite=True, external_data=False)  # now one file: the old .data belongs to nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    assert _external_locations(out) == set()


def test_check_output_path_refusals(tmp_path, monkeypatch):
    src = tmp_path / "model.onnx"
    onnx.save(tm.residual_mlp(), str(src))
    with pytest.raises(ExportError, match="is the input model itself"):
        check_output_path(src, tmp_path / "." / "model.onnx", overwrite=True)
    link = tmp_path / "alias.onnx"
    link.symlink_to(src)
    with pytest.raises(ExportError, match="alias.onnx.*is the input model itself"):
        check_output_path(src, link, overwrite=True)
    odd = tmp_path / "odd.data"  # a model whose name is some output's data file name
    onnx.save(tm.residual_mlp(), str(odd))
    with pytest.raises(ExportError, match="external data over the input model"):
        check_output_path(odd, tmp_path / "odd", overwrite=True)
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"x")
    with pytest.raises(ExportError, match=r"old\.onnx' already exists; pass --overwrite"):
        check_output_path(src, existing, overwrite=False)
    assert check_output_path(src, existing, overwrite=True) == existing.absolute()
    with pytest.raises(ExportError, match="is a directory"):
        check_output_path(src, tmp_path, overwrite=True)
    assert check_output_path(src, tmp_path / "new" / "sub" / "q.onnx", overwrite=False).name == "q.onnx"

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root ignores permission bits: make os.access answer as for a normal user
            real = os.access
            monkeypatch.setattr(gio.os, "access", lambda p, m: False if Path(p) == locked else real(p, m))
        with pytest.raises(ExportError, match=r"output folder '.*locked' is not writable"):
            check_output_path(src, locked / "q.onnx", overwrite=False)
        with pytest.raises(ExportError, match=r"output folder '.*locked' is not writable"):
            check_output_path(src, locked / "deeper" / "q.onnx", overwrite=False)
    finally:
        locked.chmod(0o700)


def test_save_refuses_to_clobber_its_own_input_data(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(tm.residual_mlp(), str(src), save_as_external_data=True, location="x.onnx.data", size_threshold=0)
    model = load_model(src)
    with pytest.raises(ExportError, match=r"x\.onnx\.data.*still reads its external data"):
        save_model(model, tmp_path / "x.onnx", external_data=True, overwrite=True)
    assert onnx.load(str(src)) is not None  # input still loads with its data
