"""Data-free weight-only RTN: no calibration data, no capture, the same file as RTN with data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from qronos_onnx import api
from qronos_onnx.api import quantize
from qronos_onnx.cli import main
from qronos_onnx.config import load_recipe
from qronos_onnx.errors import ConfigError

from . import tiny_models as tm

RTN = {"rounding.algorithm": "rtn"}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _content(path: Path) -> tuple:
    """Graph and initializers of a file, metadata aside (it says how many calibration samples there were)."""
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props if p.key != "quant.calibration_samples"}
    del m.metadata_props[:]
    return m.SerializeToString(), meta


@pytest.mark.parametrize("recipe,extra", [("w4", {}), ("w3", {"weights.group_size": 16, "weights.symmetric": True}),
                                          ("w8", {"export.dialect": "matmulnbits"})])
def test_data_free_rtn_equals_rtn_with_calibration(tmp_path, monkeypatch, recipe, extra):
    src = _save(tm.transformer(), tmp_path / "m.onnx")
    cfg = load_recipe(recipe).override({**RTN, **extra})
    with_data = quantize(src, tm.transformer_inputs(), tmp_path / "a.onnx", cfg, quiet=True)

    def no_capture(*a, **k):
        raise AssertionError("a data-free run must not capture")

    monkeypatch.setattr(api, "CaptureEngine", no_capture)
    free = quantize(src, None, tmp_path / "b.onnx", cfg, quiet=True)
    assert _content(tmp_path / "a.onnx") == _content(tmp_path / "b.onnx")
    assert [r.weight for r in free.layers] == [r.weight for r in with_data.layers]
    assert free.n_samples == 0 and "capture" not in free.timings
    report = json.loads((tmp_path / "b.onnx.report.json").read_text())
    assert "no calibration data" in report["output_errors"]
    for layer in report["layers"]:
        assert layer["rel_error"] is None and layer["rtn_rel_error"] is None and layer["n_tokens"] == 0
        assert "not measured" in layer["note"]
    assert all(isinstance(r.rel_error, float) for r in with_data.layers)


def test_data_free_cnn_and_tables(tmp_path):
    """Conv weights, and a decoder with an embedding table and a tied head: same content as with data."""
    src = _save(tm.cnn(), tmp_path / "cnn.onnx")
    cfg = load_recipe("w4").override(RTN)
    quantize(src, tm.cnn_inputs(), tmp_path / "a.onnx", cfg, quiet=True)
    quantize(src, None, tmp_path / "b.onnx", cfg, quiet=True)
    assert _content(tmp_path / "a.onnx") == _content(tmp_path / "b.onnx")
    dec = _save(tm.token_decoder(tied=True), tmp_path / "dec.onnx")
    quantize(dec, tm.token_inputs(), tmp_path / "c.onnx", cfg.override({"transforms.rotate": "online"}), quiet=True)
    quantize(dec, None, tmp_path / "d.onnx", cfg.override({"transforms.rotate": "online"}), quiet=True)
    assert _content(tmp_path / "c.onnx") == _content(tmp_path / "d.onnx")


@pytest.mark.parametrize("overrides,named", [
    ({}, "--algo qronos"),
    ({"rounding.algorithm": "gptq"}, "--algo gptq"),
    ({**RTN, "activations.format": "int", "activations.bits": 8}, "activation quantization"),
    ({**RTN, "transforms.smoothquant": 0.5}, "--smoothquant"),
    ({**RTN, "transforms.magr": 0.01}, "--magr"),
    ({**RTN, "transforms.rotate": "fused"}, "--rotate fused"),
    ({**RTN, "precision.target_bits": 5.0}, "--target-bits"),
    ({**RTN, "precision.layers": [{"match": "q_proj", "activations": "int8"}]}, "layer rule 'q_proj'"),
])
def test_missing_calibration_names_the_setting(tmp_path, overrides, named):
    src = _save(tm.transformer(), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="no calibration data") as err:
        quantize(src, None, tmp_path / "q.onnx", load_recipe("w4").override(overrides), quiet=True)
    assert named in str(err.value)
    assert not (tmp_path / "q.onnx").exists()


def test_cli_without_calib(tmp_path, capsys):
    src = _save(tm.transformer(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--w4", "--algo", "rtn"]) == 0
    text = capsys.readouterr().out
    assert "not measured" in text and out.exists() and (tmp_path / "q.onnx.report.json").exists()
    assert main(["report", str(tmp_path / "q.onnx.report.json")]) == 0
    assert "data-free" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "r.onnx"), "--w4"]) == 2
    err = capsys.readouterr().err
    assert "--calib" in err and "--algo qronos" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(tmp_path / "q.onnx.report.json"), "--plot", str(tmp_path / "p.png")]) == 2
    assert "no measured output errors" in capsys.readouterr().err


def test_data_free_leaves_the_input_alone(tmp_path):
    src = _save(tm.transformer(), tmp_path / "m.onnx")
    before = src.read_bytes()
    quantize(src, None, tmp_path / "q.onnx", load_recipe("w4").override(RTN), quiet=True)
    assert src.read_bytes() == before
    assert np.isfinite(json.loads((tmp_path / "q.onnx.report.json").read_text())["output_bytes"])


def test_torch_threads_restores_the_count():
    import torch

    from qronos_onnx.threads import torch_threads

    n = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        with torch_threads(1):
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == n
