"""Every class of bad or unusual input against the CLI: what each prints and its exit code (issue 14's table).

    .venv/bin/python bench/bad_inputs.py [--out bench/results/bad_inputs.md]

Builds tiny models and data in a temporary folder, runs `python -m qronos_onnx ...` once per case, and writes a
markdown table: case, exit code, number of stderr lines, the last stderr line (the error), and whether the inputs
were left byte-identical. Nothing is asserted here (tests/test_inputs_sacred.py, test_failfast.py and
test_cli_errors.py do that); this records what a user sees.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests import tiny_models as tm  # noqa: E402


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def build(d: Path) -> dict[str, Path]:
    """The inputs the cases use, under d/in (hashed before and after every case)."""
    i = d / "in"
    i.mkdir()
    f = {}
    onnx.save(tm.residual_mlp(), str(i / "mlp.onnx"))
    f["model"] = i / "mlp.onnx"
    onnx.save(tm.residual_mlp(), str(i / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    f["ext"] = i / "ext.onnx"
    calib = i / "calib"
    calib.mkdir()
    for k, s in enumerate(tm.mlp_inputs(n=4)):
        np.savez(calib / f"a{k}.npz", **s)
    f["calib"] = calib
    (i / "empty.onnx").write_bytes(b"")
    f["empty"] = i / "empty.onnx"
    (i / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    f["corrupt"] = i / "corrupt.onnx"
    raw = f["model"].read_bytes()
    (i / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    f["truncated"] = i / "truncated.onnx"
    wrong = i / "wrong"
    wrong.mkdir()
    np.savez(wrong / "w.npz", y=np.ones((8, 16), np.float32))
    f["wrong_key"] = wrong
    nan = i / "nan"
    nan.mkdir()
    s = tm.mlp_inputs(n=1)[0]
    s["x"][0, 0] = np.nan
    np.savez(nan / "n.npz", **s)
    f["nan"] = nan
    pk = i / "pickled"
    pk.mkdir()
    np.savez(pk / "p.npz", x=np.array([{"a": 1}], dtype=object))
    f["pickled"] = pk
    tr = i / "truncnpz"
    tr.mkdir()
    np.savez(tr / "t.npz", **tm.mlp_inputs(n=1)[0])
    b = (tr / "t.npz").read_bytes()
    (tr / "t.npz").write_bytes(b[: len(b) // 2])
    f["trunc_npz"] = tr
    (i / "pickle.pkl").write_bytes(pickle.dumps({"x": 1}))
    f["pkl"] = i / "pickle.pkl"
    q = d / "q_already.onnx"
    f["quantized_src"] = q
    # a custom op onnxruntime cannot run
    w = numpy_helper.from_array(np.eye(16, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                           helper.make_node("Frobnicate", ["h"], ["y"], domain="com.example", name="custom")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    m.ir_version = 8
    onnx.save(m, str(i / "custom.onnx"))
    f["custom"] = i / "custom.onnx"
    # Gemm transA=1
    g = helper.make_graph([helper.make_node("Gemm", ["xt", "w"], ["y"], transA=1, name="fc_ta")], "g",
                          [helper.make_tensor_value_info("xt", TensorProto.FLOAT, [16, "b"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(i / "transa.onnx"))
    f["transa"] = i / "transa.onnx"
    ta = i / "calib_ta"
    ta.mkdir()
    np.savez(ta / "a.npz", xt=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    f["calib_ta"] = ta
    # one batch of 64 rows in one file
    np.savez(i / "batch64.npz", x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    f["batch64"] = i / "batch64.npz"
    (i / "bad.yaml").write_text("weights: {bits: 4\n  group_size: [\n")
    f["bad_yaml"] = i / "bad.yaml"
    return f


def cases(f: dict[str, Path], d: Path) -> list[tuple[str, list[str]]]:
    o = str(d / "out" / "q.onnx")
    m, c = str(f["model"]), str(f["calib"])
    base = [m, "--calib", c, "--w4", "--algo", "rtn"]
    return [
        ("model: missing file", ["quantize", str(d / "nope.onnx"), "--calib", c, "-o", o]),
        ("model: empty file", ["quantize", str(f["empty"]), "--calib", c, "-o", o]),
        ("model: corrupt bytes", ["quantize", str(f["corrupt"]), "--calib", c, "-o", o]),
        ("model: truncated", ["quantize", str(f["truncated"]), "--calib", c, "-o", o]),
        ("model: custom op onnxruntime cannot run", ["quantize", str(f["custom"]), "--calib", c, "-o", o]),
        ("model: already quantized", ["quantize", str(f["quantized_src"]), "--calib", c, "-o", o]),
        ("model: Gemm transA=1 (now quantized)", ["quantize", str(f["transa"]), "--calib", str(f["calib_ta"]),
                                                  "-o", str(d / "out" / "ta.onnx"), "--w8", "--quiet"]),
        ("calib: missing", ["quantize", m, "--calib", str(d / "nocalib"), "-o", o]),
        ("calib: wrong key", ["quantize", m, "--calib", str(f["wrong_key"]), "-o", o]),
        ("calib: NaN", ["quantize", m, "--calib", str(f["nan"]), "-o", o]),
        ("calib: pickled object array", ["quantize", m, "--calib", str(f["pickled"]), "-o", o]),
        ("calib: truncated .npz", ["quantize", m, "--calib", str(f["trunc_npz"]), "-o", o]),
        ("calib: .pkl file", ["quantize", m, "--calib", str(f["pkl"]), "-o", o]),
        ("calib: --samples 8 on one 64-row batch", ["quantize", m, "--calib", str(f["batch64"]), "--samples", "8",
                                                   "-o", str(d / "out" / "s8.onnx"), "--quiet"]),
        ("flag: --bits 11", ["quantize", *base, "-o", o, "--bits", "11"]),
        ("flag: --group-size 48", ["quantize", *base, "-o", o, "--group-size", "48"]),
        ("flag: --group-size 4096 on K=16", ["quantize", *base, "-o", o, "--group-size", "4096"]),
        ("flag: --samples 0", ["quantize", *base, "-o", o, "--samples", "0"]),
        ("flag: --damping -1", ["quantize", *base, "-o", o, "--damping", "-1"]),
        ("flag: --max-memory lots", ["quantize", *base, "-o", o, "--max-memory", "lots"]),
        ("flag: unknown recipe", ["quantize", m, "--calib", c, "-o", o, "--recipe", "w9"]),
        ("flag: malformed recipe YAML", ["quantize", m, "--calib", c, "-o", o, "--recipe", str(f["bad_yaml"])]),
        ("output: the input model", ["quantize", *base, "-o", m, "--overwrite"]),
        ("output: the input's external data", ["quantize", str(f["ext"]), "--calib", c, "--w4", "-o",
                                               str(f["ext"]) + ".data", "--overwrite"]),
        ("output: a calibration file", ["quantize", *base, "-o", str(f["calib"] / "a0.npz"), "--overwrite"]),
        ("output: new .npz in the calibration folder", ["quantize", *base, "-o", str(f["calib"] / "z.npz")]),
        ("output: a directory", ["quantize", *base, "-o", str(d)]),
        ("output: existing sidecar", ["quantize", *base, "-o", str(d / "side.onnx")]),
        ("output: under a regular file", ["quantize", *base, "-o", str(f["model"]) + "/q.onnx"]),
        ("inspect: corrupt model", ["inspect", str(f["corrupt"])]),
        ("eval: classify on a model that does not fit", ["eval", m, "--task", "classify"]),
        ("eval: --json into a missing folder", ["eval", m, "--task", "classify", "--json",
                                                str(d / "no" / "dir" / "r.json")]),
        ("eval: --compare with different inputs", ["eval", m, "--compare", str(f["transa"]), "--task", "classify"]),
        ("report: missing file", ["report", str(d / "none.report.json")]),
        ("report: not JSON", ["report", str(f["bad_yaml"])]),
        ("recipes: extra argument", ["recipes", "--bogus"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bad_inputs.md"))
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        f = build(d)
        (d / "out").mkdir()
        (d / "side.onnx.report.json").write_text("keep")
        subprocess.run([sys.executable, "-m", "qronos_onnx", "quantize", str(f["model"]), "--calib", str(f["calib"]),
                        "--w4", "--algo", "rtn", "-o", str(f["quantized_src"]), "--quiet"], env=env, check=True)
        before = _tree(d / "in")
        rows = []
        for name, argv in cases(f, d):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "qronos_onnx", *argv], capture_output=True, text=True, env=env)
            lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
            last = lines[-1] if lines else "(nothing on stderr)"
            intact = _tree(d / "in") == before
            rows.append((name, r.returncode, len(lines), last.replace(str(d), "TMP").replace("|", "\\|"), intact,
                         time.perf_counter() - t0))
            print(f"{r.returncode:>3} {len(lines)} {'ok ' if intact else 'MOD'} {name}: {last[:140]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = ["# Bad inputs against the CLI", "", f"`bench/bad_inputs.py`, {time.strftime('%Y-%m-%d %H:%M')}; "
            "TMP is the temporary folder. 'inputs intact': every input file byte-identical after the case.", "",
            "| case | exit | stderr lines | last stderr line | inputs intact |", "|---|---|---|---|---|"]
    text += [f"| {n} | {c} | {k} | {line} | {'yes' if ok else 'NO'} |" for n, c, k, line, ok, _ in rows]
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
