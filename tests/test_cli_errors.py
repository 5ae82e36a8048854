"""Every command's errors are one line on stderr with exit code 2; unexpected exceptions one line with exit code 3.

The CLI cases run ``cli.main`` in-process (fast); one case runs ``python -m qronos_onnx`` to check the real exit code.
The last tests walk the package's source: every ``raise SomeQronosError(...)`` must build a one-line message.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qronos_onnx import cli, errors

from . import tiny_models as tm

PACKAGE = Path(cli.__file__).resolve().parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_errors")
    onnx.save(tm.residual_mlp(), d / "mlp.onnx")
    onnx.save(tm.cnn(), d / "cnn.onnx")
    onnx.save(tm.transformer(n_blocks=1), d / "tf.onnx")
    np.savez(d / "mlp.npz", x=tm.mlp_inputs(n=1)[0]["x"])
    np.savez(d / "wrong_keys.npz", y=np.zeros((2, 16), np.float32))
    rng = np.random.default_rng(0)
    np.savez(d / "images28.npz", input=rng.standard_normal((4, 1, 28, 28)).astype(np.float32),
             label=np.arange(4, dtype=np.int64))
    (d / "junk.onnx").write_bytes(b"this is not a protobuf")
    (d / "bad.yaml").write_text("weights: {bits: 4\nrounding: [\n")
    (d / "badvalue.yaml").write_text("rounding: {damping: lots}\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "bad.json").write_text('{"layers": [\n')
    (d / "list.json").write_text("[1, 2]\n")
    (d / "nolayers.json").write_text('{"output": "x.onnx", "config": {}}\n')
    (d / "badlayer.json").write_text(json.dumps({"output": "x.onnx", "config": {}, "layers": [{"weight": "w"}]}))
    (d / "badconfig.json").write_text(json.dumps({"output": "x.onnx", "config": {"weights": {"bits": 11}},
                                                  "layers": []}))
    return d


def _q(d, *extra):
    return ["quantize", str(d / "mlp.onnx"), "--calib", str(d / "mlp.npz"), "-o", str(d / "out" / "q.onnx"),
            "--quiet", *extra]


# (id, argv builder, a fragment the one line must contain)
CASES = [
    ("quantize-missing-model", lambda d: ["quantize", str(d / "nope.onnx"), "--calib", str(d / "mlp.npz"), "-o",
                                          str(d / "o.onnx")], "does not exist"),
    ("quantize-corrupt-model", lambda d: ["quantize", str(d / "junk.onnx"), "--calib", str(d / "mlp.npz"), "-o",
                                          str(d / "o.onnx")], "junk.onnx"),
    ("quantize-missing-calib", lambda d: ["quantize", str(d / "mlp.onnx"), "--calib", str(d / "nope.npz"), "-o",
                                          str(d / "o.onnx")], "nope.npz"),
    ("quantize-calib-keys", lambda d: ["quantize", str(d / "mlp.onnx"), "--calib", str(d / "wrong_keys.npz"), "-o",
                                       str(d / "o.onnx")], "'x'"),
    ("quantize-bits", lambda d: _q(d, "--bits", "9"), "weights.bits"),
    ("quantize-group-size", lambda d: _q(d, "--group-size", "24"), "group_size"),
    ("quantize-max-memory", lambda d: _q(d, "--max-memory", "lots"), "--max-memory"),
    ("quantize-recipe-and-preset", lambda d: _q(d, "--recipe", "w4", "--w8"), "not both"),
    ("quantize-unknown-recipe", lambda d: _q(d, "--recipe", "w5"), "unknown recipe"),
    ("quantize-missing-recipe-file", lambda d: _q(d, "--recipe", str(d / "nope.yaml")), "does not exist"),
    ("quantize-malformed-yaml", lambda d: _q(d, "--recipe", str(d / "bad.yaml")), "bad.yaml:2:"),
    ("quantize-recipe-bad-value", lambda d: _q(d, "--recipe", str(d / "badvalue.yaml")), "rounding.damping"),
    ("quantize-recipe-not-mapping", lambda d: _q(d, "--recipe", str(d / "list.yaml")), "mapping"),
    ("quantize-reduce-range", lambda d: _q(d, "--reduce-range"), "--reduce-range"),
    ("quantize-no-calib-flag", lambda d: ["quantize", str(d / "mlp.onnx"), "-o", str(d / "o.onnx")], "--calib"),
    ("quantize-bad-choice", lambda d: _q(d, "--algo", "adaround"), "--algo"),
    ("quantize-rounds-without-budget", lambda d: _q(d, "--sensitivity-rounds", "1"), "--target-bits"),
    ("quantize-rounds-zero", lambda d: _q(d, "--target-bits", "6", "--sensitivity-rounds", "0"),
     "sensitivity_rounds must be a positive integer"),
    ("inspect-missing", lambda d: ["inspect", str(d / "nope.onnx")], "does not exist"),
    ("inspect-corrupt", lambda d: ["inspect", str(d / "junk.onnx")], "junk.onnx"),
    ("inspect-bad-flag", lambda d: ["inspect", str(d / "mlp.onnx"), "--bogus"], "--bogus"),
    ("recipes-extra-arg", lambda d: ["recipes", "w4"], "w4"),
    ("no-command", lambda d: [], "command"),
    ("eval-missing-model", lambda d: ["eval", str(d / "nope.onnx"), "--task", "classify", "--images",
                                      str(d / "images28.npz")], "does not exist"),
    ("eval-corrupt-model", lambda d: ["eval", str(d / "junk.onnx"), "--task", "classify", "--images",
                                      str(d / "images28.npz")], "junk.onnx"),
    ("eval-classify-input-mismatch", lambda d: ["eval", str(d / "cnn.onnx"), "--task", "classify", "--images",
                                                str(d / "images28.npz")], "--images"),
    ("eval-classify-two-inputs", lambda d: ["eval", str(d / "tf.onnx"), "--task", "classify", "--images",
                                            str(d / "images28.npz")], "image input"),
    ("eval-compare-different-inputs", lambda d: ["eval", str(d / "cnn.onnx"), "--compare", str(d / "mlp.onnx"),
                                                 "--task", "classify", "--images", str(d / "images28.npz")],
     "different inputs"),
    ("eval-json-missing-dir", lambda d: ["eval", str(d / "cnn.onnx"), "--task", "classify", "--images",
                                         str(d / "images28.npz"), "--json", str(d / "nodir" / "r.json")], "nodir"),
    ("eval-images-missing", lambda d: ["eval", str(d / "cnn.onnx"), "--task", "classify", "--images",
                                       str(d / "nope.npz")], "nope.npz"),
    ("eval-images-bad-keys", lambda d: ["eval", str(d / "cnn.onnx"), "--task", "classify", "--images",
                                        str(d / "mlp.npz")], "'label'"),
    ("eval-seq-len", lambda d: ["eval", str(d / "tf.onnx"), "--task", "ppl", "--seq-len", "1"], "--seq-len"),
    ("eval-ppl-no-tokenizer", lambda d: ["eval", str(d / "tf.onnx"), "--task", "ppl", "--text",
                                         str(d / "bad.yaml")], "tokenizer"),
    ("eval-bad-task", lambda d: ["eval", str(d / "tf.onnx"), "--task", "bleu"], "--task"),
    ("report-missing", lambda d: ["report", str(d / "nope.report.json")], "does not exist"),
    ("report-invalid-json", lambda d: ["report", str(d / "bad.json")], "bad.json:2:"),
    ("report-not-object", lambda d: ["report", str(d / "list.json")], "not a qronos-onnx report"),
    ("report-no-layers", lambda d: ["report", str(d / "nolayers.json")], "'layers'"),
    ("report-bad-layer", lambda d: ["report", str(d / "badlayer.json")], "layer 0"),
    ("report-bad-config", lambda d: ["report", str(d / "badconfig.json")], "weights.bits"),
    ("report-a-directory", lambda d: ["report", str(d)], "not a file"),
]


def _run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse errors exit from parse_args
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _last_line(err: str) -> str:
    """The text a terminal shows last: progress bars clear themselves with carriage returns, never newlines."""
    return err.rstrip("\n").split("\r")[-1].strip()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, files, capsys):
    _, build, fragment = case
    rc, _, err = _run_main(build(files), capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.rstrip("\n").count("\n") == 0, f"more than one stderr line: {err!r}"
    line = _last_line(err)
    assert line.startswith("qronos-onnx: error: "), line
    assert fragment in line, line


def test_every_subcommand_has_a_bad_input_case():
    commands = set(cli.COMMANDS)
    covered = {c[0].split("-")[0] for c in CASES}
    assert commands <= covered, f"no bad-input case for {sorted(commands - covered)}"


def test_malformed_yaml_names_file_line_and_column(files, capsys):
    rc, _, err = _run_main(_q(files, "--recipe", str(files / "bad.yaml")), capsys)
    assert rc == 2
    assert f"{files / 'bad.yaml'}:2:9: not valid YAML" in err and "^" not in err


def test_exit_code_of_the_real_process(files):
    proc = subprocess.run([sys.executable, "-m", "qronos_onnx", "report", str(files / "bad.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("qronos-onnx: error: report ")


def _raising(exc):
    def command(_args):
        raise exc
    return command


def test_unexpected_exception_is_one_line_exit_3(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "recipes", _raising(RuntimeError("boom\nsecond line")))
    rc, _, err = _run_main(["recipes"], capsys)
    assert rc == cli.INTERNAL_ERROR == 3
    assert err == ("qronos-onnx: internal error: RuntimeError: boom second line "
                   "(rerun with --debug for the traceback)\n")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(monkeypatch, capsys, where):
    monkeypatch.setitem(cli.COMMANDS, "recipes", _raising(RuntimeError("boom")))
    argv = ["--debug", "recipes"] if where == "before" else ["recipes", "--debug"]
    rc, _, err = _run_main(argv, capsys)
    assert rc == 3
    assert "Traceback (most recent call last)" in err and 'raise exc' in err
    assert err.rstrip("\n").splitlines()[-1] == "qronos-onnx: internal error: RuntimeError: boom"


def test_debug_on_a_user_error_keeps_exit_2(files, capsys):
    rc, _, err = _run_main(["--debug", "report", str(files / "bad.json")], capsys)
    assert rc == 2 and "Traceback" in err and "ConfigError" in err


def test_onnxruntime_and_os_errors_are_user_errors(monkeypatch, capsys):
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    monkeypatch.setitem(cli.COMMANDS, "recipes", _raising(InvalidArgument("Got invalid dimensions\n index: 2")))
    rc, _, err = _run_main(["recipes"], capsys)
    assert rc == 2 and err == ("qronos-onnx: error: onnxruntime rejected the model or its inputs: Got invalid "
                               "dimensions index: 2\n")
    monkeypatch.setitem(cli.COMMANDS, "recipes", _raising(PermissionError(13, "Permission denied", "/x/out.onnx")))
    rc, _, err = _run_main(["recipes"], capsys)
    assert rc == 2 and err == "qronos-onnx: error: Permission denied: '/x/out.onnx'\n"


def test_report_prints_the_end_of_run_table(files, capsys):
    from qronos_onnx.api import quantize
    from qronos_onnx.config import load_recipe

    out = files / "ok" / "mlp.w4.onnx"
    out.parent.mkdir(exist_ok=True)
    result = quantize(files / "mlp.onnx", tm.mlp_inputs(n=2), out, load_recipe("w4"), quiet=True)
    rc, stdout, err = _run_main(["report", str(result.report_path)], capsys)
    assert rc == 0 and err == ""
    assert stdout == cli.format_summary(result) + "\n"
    rc, stdout, _ = _run_main(["report", str(result.report_path), "--top", "1"], capsys)
    assert rc == 0 and stdout.count(" ok") == 1


# ------------------------------------------------------------------------------------------- every raise site

def _error_classes() -> set[str]:
    return {name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, errors.QronosError)}


def _raise_sites():
    classes = _error_classes()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in classes:
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node.exc


SITES = list(_raise_sites())


def test_the_walk_finds_the_raise_sites():
    assert len(SITES) > 100  # if this drops, the walk above broke, not the code


@pytest.mark.parametrize("site", SITES, ids=[s[0] for s in SITES])
def test_every_error_message_is_one_line(site):
    """No literal newline in any QronosError message (the CLI joins the lines of foreign messages itself)."""
    _, call = site
    assert call.args or call.keywords, "an error without a message"
    for node in ast.walk(call):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert "\n" not in node.value, f"newline in {node.value!r}"
