"""`qronos-onnx report OUT.report.json --plot out.png` (eval/report_plot.py) on small fake reports built here."""
from __future__ import annotations

import json

import pytest

from qronos_onnx.cli import main as cli_main
from qronos_onnx.config import load_recipe
from qronos_onnx.eval import report_plot

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_report(path, n: int = 12, promoted=(3, 7), old_style: bool = False):
    """A report.json as quantize() writes it; ``promoted`` entries carry the mixed-precision plan fields."""
    layers = []
    for i in range(n):
        e = {"weight": f"layer{i}.weight", "nodes": [f"MatMul@{i}"], "shape": [16, 16], "algorithm": "qronos",
             "rel_error": 0.01 * (1 + i % 5), "rtn_rel_error": 0.02 * (1 + i % 5), "damping": 0.0, "retries": 0,
             "status": "ok", "seconds": 0.01}
        if not old_style:
            e["plan_source"] = "target-bits" if i in promoted else "recipe"
            e["weight_format"] = "int8" if i in promoted else "int4"
        layers.append(e)
    layers[0]["rel_error"] = 0.0  # an exact layer: must not break the log axis
    data = {"output": str(path.with_name("model.q.onnx")), "config": load_recipe("w4").to_dict(), "layers": layers,
            "timings_seconds": {"total": 1.0}, "calibration_samples": 4, "output_bytes": 1000}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("old_style", [False, True])
def test_report_plot_writes_a_png(tmp_path, capsys, old_style):
    rep = fake_report(tmp_path / "model.q.onnx.report.json", old_style=old_style)
    png = tmp_path / "layers.png"
    assert cli_main(["report", str(rep), "--plot", str(png)]) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert png.stat().st_mode & 0o044  # readable by others as an ordinary file (umask permitting), not 0600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the atomic write left no temp file


def test_promoted_layers_are_read_and_old_reports_have_none(tmp_path):
    new = json.loads(fake_report(tmp_path / "a.report.json").read_text())
    old = json.loads(fake_report(tmp_path / "b.report.json", old_style=True).read_text())
    layers = report_plot.plot_layers(new)
    assert [i for i, x in enumerate(layers) if x.promoted] == [3, 7]
    assert layers[3].weight_format == "int8" and layers[0].weight_format == "int4"
    assert not any(x.promoted or x.weight_format for x in report_plot.plot_layers(old))


def test_report_plot_refuses_bad_paths(tmp_path, capsys):
    rep = fake_report(tmp_path / "m.report.json")
    png = tmp_path / "x.png"
    png.write_bytes(b"keep")
    cases = [
        ([str(rep), "--plot", str(png)], "already exists; pass --overwrite"),
        ([str(rep), "--plot", str(tmp_path / "x.jpg")], "expected a .png"),
        ([str(rep), "--plot", str(tmp_path / "no" / "x.png")], "does not exist"),
        ([str(tmp_path / "missing.report.json"), "--plot", str(tmp_path / "y.png")], "does not exist"),
    ]
    for argv, msg in cases:
        assert cli_main(["report", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert png.read_bytes() == b"keep"
    assert cli_main(["report", str(rep), "--plot", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_report_plot_never_overwrites_the_report(tmp_path, capsys):
    rep = fake_report(tmp_path / "m.report.png")  # a report that happens to end in .png
    before = rep.read_bytes()
    assert cli_main(["report", str(rep), "--plot", str(rep), "--overwrite"]) == 2
    assert "is the report itself" in capsys.readouterr().err
    assert rep.read_bytes() == before


def test_report_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    rep = fake_report(tmp_path / "m.report.json")
    assert cli_main(["report", str(rep), "--plot", str(tmp_path / "z.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and err.count("\n") == 1
    assert not (tmp_path / "z.png").exists()
