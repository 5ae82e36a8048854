"""Issue 14 items 4-5: refusals happen before capture; what stays float is said; layouts that were skipped
(Gemm transA=1) are quantized; misleading labels (group size, merged q/k/v errors, --samples on one batch) fixed."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx import api
from qronos_onnx.api import quantize
from qronos_onnx.config import load_recipe
from qronos_onnx.errors import ConfigError, ExportError, ModelError

from . import tiny_models as tm

RTN = load_recipe("w4").override({"rounding.algorithm": "rtn"})


def _mlp_with(nodes_mid, inits_extra=(), opset=17, extra_opsets=()):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), *nodes_mid,
             helper.make_node("MatMul", ["m", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
                          [w1, w2, *inits_extra])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 8
    return m


def _calib(tmp_path: Path, n: int = 4) -> Path:
    d = tmp_path / "calib"
    d.mkdir(exist_ok=True)
    for i, s in enumerate(tm.mlp_inputs(n=n)):
        np.savez(d / f"s{i}.npz", **s)
    return d


@pytest.fixture()
def no_capture(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("capture started before the refusal")

    monkeypatch.setattr(api, "CaptureEngine", refuse)


def test_checker_rejected_contrib_op_is_accepted_and_validated_by_onnxruntime(tmp_path, caplog):
    # onnxruntime registers SimplifiedLayerNormalization in the default domain; onnx.checker does not know it
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), "norm_scale")
    norm = helper.make_node("SimplifiedLayerNormalization", ["h", "norm_scale"], ["m"], axis=-1, epsilon=1e-5,
                            name="norm")
    model = tmp_path / "genai_like.onnx"
    onnx.save(_mlp_with([norm], [scale]), str(model))
    with pytest.raises(Exception, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(str(model), full_check=True)
    out = tmp_path / "q.onnx"
    with caplog.at_level(logging.WARNING):
        res = quantize(model, _calib(tmp_path), out, RTN, quiet=True)
    assert "onnx.checker rejects" in caplog.text
    assert len(res.layers) == 2
    report = json.loads(res.report_path.read_text())
    assert report["input_checker"].startswith("rejected: ") and "onnxruntime" in report["input_checker"]
    x = tm.mlp_inputs(n=1)[0]
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2


def test_model_onnxruntime_cannot_load_is_refused_before_capture(tmp_path, no_capture):
    odd = helper.make_node("Frobnicate", ["h"], ["m"], domain="com.example", name="custom")
    model = tmp_path / "custom.onnx"
    onnx.save(_mlp_with([odd], extra_opsets=[helper.make_opsetid("com.example", 1)]), str(model))
    with pytest.raises(ModelError, match=r"onnxruntime cannot load the input model .*custom\.onnx"):
        quantize(model, _calib(tmp_path), tmp_path / "q.onnx", RTN, quiet=True)
    assert not (tmp_path / "q.onnx").exists()


def test_no_space_for_the_output_is_refused_before_capture(tmp_path, monkeypatch, no_capture):
    model = tmp_path / "m.onnx"
    onnx.save(tm.residual_mlp(), str(model))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(ExportError, match=r"not enough free space .*needs about \d+ MB, .* 0 MB free"):
        quantize(model, _calib(tmp_path), tmp_path / "q.onnx", RTN, quiet=True)


def test_already_quantized_model_is_named_as_such(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(tm.residual_mlp(), str(model))
    calib = _calib(tmp_path)
    quantize(model, calib, tmp_path / "q.onnx", RTN, quiet=True)
    with pytest.raises(ModelError, match=r"is already quantized \(it holds \d+ DequantizeLinear\)"):
        quantize(tmp_path / "q.onnx", calib, tmp_path / "qq.onnx", RTN, quiet=True)


def test_gemm_trans_a_is_quantized(tmp_path):
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((16, 8)) / 4).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("Gemm", ["xt", "w", "b"], ["y"], transA=1, name="fc_ta")], "g",
                          [helper.make_tensor_value_info("xt", TensorProto.FLOAT, [16, "batch"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    model = tmp_path / "ta.onnx"
    onnx.save(m, str(model))
    calib = tmp_path / "c"
    calib.mkdir()
    for i in range(4):
        np.savez(calib / f"s{i}.npz", xt=rng.standard_normal((16, 32)).astype(np.float32))
    res = quantize(model, calib, tmp_path / "q.onnx", load_recipe("w8"), quiet=True)
    assert [r.nodes for r in res.layers] == [["fc_ta"]]
    assert json.loads(res.report_path.read_text())["gemm_transA_rewritten"] == ["fc_ta"]
    x = {"xt": rng.standard_normal((16, 5)).astype(np.float32)}
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02  # 8-bit: close to float


def test_subgraph_matmul_is_counted_in_a_warning_and_the_report(tmp_path, caplog):
    rng = np.random.default_rng(1)
    ws = numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), "w_sub")
    cond = numpy_helper.from_array(np.array(True), "cond")
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_sub"], ["m_then"], name="sub_mm")], "then", [],
                               [helper.make_tensor_value_info("m_then", TensorProto.FLOAT, ["batch", 16])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["m_else"], name="sub_id")], "else", [],
                               [helper.make_tensor_value_info("m_else", TensorProto.FLOAT, ["batch", 16])])
    iff = helper.make_node("If", ["cond"], ["m"], then_branch=then_g, else_branch=else_g, name="branch")
    model = tmp_path / "if.onnx"
    onnx.save(_mlp_with([iff], [ws, cond]), str(model))
    with caplog.at_level(logging.WARNING):
        res = quantize(model, _calib(tmp_path), tmp_path / "q.onnx", RTN, quiet=True)
    assert "1 MatMul/Gemm/Conv node(s) with a constant weight stay float: sub_mm (inside a subgraph of If node " \
           "'branch'" in caplog.text
    left = json.loads(res.report_path.read_text())["left_float"]
    assert [(x["node"], x["op"], x["weight"]) for x in left] == [("sub_mm", "MatMul", "w_sub")]


def test_group_size_wider_than_every_input_is_refused(tmp_path, no_capture):
    model = tmp_path / "m.onnx"
    onnx.save(tm.residual_mlp(), str(model))  # K = 16 everywhere
    with pytest.raises(ConfigError, match=r"--group-size 4096 is not smaller than .*widest K = 16"):
        quantize(model, _calib(tmp_path), tmp_path / "q.onnx", load_recipe("w4").override(
            {"weights.group_size": 4096}), quiet=True)


def test_group_size_per_layer_in_report_and_each_of_qkv_has_its_own_error(tmp_path, caplog):
    model = tmp_path / "t.onnx"
    onnx.save(tm.transformer(n_blocks=1), str(model))  # K = 32 (q/k/v/o/gate/up/head) and K = 64 (down)
    calib = tmp_path / "c"
    calib.mkdir()
    for i, s in enumerate(tm.transformer_inputs(n=8, seq=16)):
        np.savez(calib / f"s{i}.npz", **s)
    with caplog.at_level(logging.WARNING):
        res = quantize(model, calib, tmp_path / "q.onnx", load_recipe("w4").override(
            {"weights.group_size": 32, "rounding.algorithm": "gptq"}), quiet=True)
    assert "not smaller than the input width of 7 of 8" in caplog.text
    sizes = {r.nodes[0]: r.group_size for r in res.layers}
    assert sizes["b0_down_proj"] == 32 and sizes["b0_q_proj"] == 32 and sizes["b0_up_proj"] == 32
    errs = {r.nodes[0]: (r.rel_error, r.rtn_rel_error) for r in res.layers}
    qkv = [errs[f"b0_{n}_proj"] for n in "qkv"]
    assert len({e for e, _ in qkv}) == 3 and len({e for _, e in qkv}) == 3, qkv  # no longer one merged figure
    assert all(0 < e < 1 for e, _ in qkv)


def test_samples_limits_rows_of_one_batched_file(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(tm.residual_mlp(), str(model))  # input x [batch, 16], batch symbolic
    one = tmp_path / "one.npz"
    np.savez(one, x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    res = quantize(model, one, tmp_path / "q.onnx", RTN.override({"capture.samples": 8}), quiet=True)
    assert res.n_samples == 8
    assert all(r.n_tokens == 8 for r in res.layers)
    res = quantize(model, one, tmp_path / "q2.onnx", RTN, quiet=True)  # no limit: the file is one sample
    assert res.n_samples == 1 and all(r.n_tokens == 64 for r in res.layers)


def test_spill_without_room_is_one_clear_error(tmp_path, monkeypatch):
    from qronos_onnx.capture import frontier
    from qronos_onnx.errors import CalibrationError

    real = shutil.disk_usage
    monkeypatch.setattr(frontier.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000) if "qronos-frontier" in str(p)
                        else real(p))
    store = frontier.FrontierStore(max_memory=0, tmp_root=tmp_path)
    with pytest.raises(CalibrationError, match=r"no room to spill captured activations in .*qronos-frontier.*"
                                               r"raise --max-memory"):
        store.put("a", np.ones((64, 64), np.float32))
    store.close()
    assert not list(tmp_path.iterdir())  # the spill folder is gone
