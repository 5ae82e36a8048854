"""SmoothQuant (transforms/smoothquant.py, qronos_algorithm.md §4.6): scales from float activation ranges, folded
into the producer where exact, else an explicit reported Mul; the float function is unchanged."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.api import quantize
from qronos_onnx.config import ConfigError, QuantConfig, load_recipe
from qronos_onnx.graph.io import save_model
from qronos_onnx.graph.model import load_model
from qronos_onnx.graph.targets import find_targets
from qronos_onnx.transforms import TransformLog
from qronos_onnx.transforms.smoothquant import SMOOTH_PREFIX, channel_absmax, smooth_inputs, smoothing_scales

from . import tiny_models as tm


def _run(path, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _foldable(seed=0):
    """LayerNorm -> q, k; q -> MatMul (fold into q's columns) -> +bias -> MatMul (fold into MatMul + Add); k -> an
    RMSNorm written out with a Mul(gamma) -> MatMul (fold into gamma); SimplifiedLayerNormalization -> MatMul (fold
    into its scale); a Gemm(transB=1, bias) -> Gemm chain on a 2-D input (fold into the first Gemm's rows and bias).
    Channel ranges differ wildly so that the scales are far from 1."""
    g = np.random.default_rng(seed)
    f = np.float32
    ch = np.exp(g.uniform(-2, 2, 16)).astype(f)  # per-channel spread of the LayerNorm scale
    inits = {
        "g1": ch, "b1": g.standard_normal(16).astype(f) * 0.1,
        "wq": g.standard_normal((16, 24)).astype(f) / 4, "wk": g.standard_normal((16, 24)).astype(f) / 4,
        "wa": g.standard_normal((24, 24)).astype(f) / 5, "ba": g.standard_normal(24).astype(f),
        "wc": g.standard_normal((24, 16)).astype(f) / 5,
        "eps": np.array(1e-6, f), "two": np.array(2.0, f),
        "g2": np.exp(g.uniform(-1, 1, 24)).astype(f), "wd": g.standard_normal((24, 16)).astype(f) / 5,
        "g3": np.exp(g.uniform(-1, 1, 16)).astype(f), "we": g.standard_normal((16, 8)).astype(f) / 4,
        "gw1": g.standard_normal((12, 10)).astype(f) / 3, "gb1": g.standard_normal(12).astype(f),
        "gw2": g.standard_normal((12, 6)).astype(f) / 3,
    }
    mk = helper.make_node
    nodes = [
        mk("LayerNormalization", ["x", "g1", "b1"], ["ln"], axis=-1, name="ln"),
        mk("MatMul", ["ln", "wq"], ["q"], name="q_proj"),
        mk("MatMul", ["ln", "wk"], ["k"], name="k_proj"),
        mk("MatMul", ["q", "wa"], ["a"], name="a_proj"),
        mk("Add", ["a", "ba"], ["a2"], name="a_bias"),
        mk("MatMul", ["a2", "wc"], ["c"], name="c_proj"),
        mk("Pow", ["k", "two"], ["p"], name="rms_pow"),
        mk("ReduceMean", ["p"], ["m"], axes=[-1], keepdims=1, name="rms_mean"),
        mk("Add", ["m", "eps"], ["e"], name="rms_eps"),
        mk("Sqrt", ["e"], ["r"], name="rms_sqrt"),
        mk("Div", ["k", "r"], ["n"], name="rms_div"),
        mk("Mul", ["n", "g2"], ["y"], name="rms_scale"),
        mk("MatMul", ["y", "wd"], ["d"], name="d_proj"),
        mk("SimplifiedLayerNormalization", ["c", "g3"], ["sl"], axis=-1, epsilon=1e-6, name="sln"),
        mk("MatMul", ["sl", "we"], ["out2"], name="e_proj"),
        mk("Gemm", ["x2", "gw1", "gb1"], ["h"], transB=1, name="gemm1"),
        mk("Gemm", ["h", "gw2"], ["out3"], name="gemm2"),
    ]
    graph = helper.make_graph(
        nodes, "foldable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16]),
         helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["rows", 10])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("out2", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("out3", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _foldable_inputs(n=4, seed=1):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = g.standard_normal((1, 8, 16)).astype(np.float32)
        x2 = (g.standard_normal((5, 10)) * np.exp(g.uniform(-2, 2, 10))).astype(np.float32)
        out.append({"x": x, "x2": x2})
    return out


def _smooth(tmp_path, proto, feeds, alpha):
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    log = TransformLog()
    muls = smooth_inputs(model, find_targets(model), feeds, alpha, log=log)
    save_model(model, tmp_path / "s.onnx", overwrite=True)
    return path, tmp_path / "s.onnx", muls, log


def _same_function(a, b, feeds):
    for f in feeds:
        for ref, got in zip(_run(a, f), _run(b, f)):
            assert np.abs(got - ref).max() <= 2e-6 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()


def test_scales_formula():
    s = smoothing_scales(np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 4.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0])  # sqrt(a / w); 1 where a range is zero
    np.testing.assert_allclose(smoothing_scales(np.array([8.0]), np.array([2.0]), 0.0), [0.5])  # 1 / w


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_folds_into_norms_muls_and_matmuls_exactly(tmp_path, alpha):
    feeds = _foldable_inputs()
    path, out, muls, log = _smooth(tmp_path, _foldable(), feeds, alpha)
    assert len(muls) == 1  # only gemm1's: its input is a graph input, nothing to fold into
    how = {k: v[0] for k, v in log.touched.items()}
    assert how["q_proj"] == how["k_proj"] == "smoothquant(folded into LayerNormalization ln)"
    assert how["a_proj"] == "smoothquant(folded into MatMul q_proj)"
    assert how["c_proj"] == "smoothquant(folded into MatMul a_proj + Add a_bias)"
    assert how["d_proj"] == "smoothquant(folded into Mul rms_scale)"
    assert how["e_proj"] == "smoothquant(folded into SimplifiedLayerNormalization sln)"
    assert how["gemm2"] == "smoothquant(folded into Gemm gemm1)"
    assert how["gemm1"] == "smoothquant(explicit Mul)"
    assert any("explicit Mul" in n and "gemm1" in n and "graph input" in n for n in log.notes)
    _same_function(path, out, feeds)


def test_smoothed_ranges_meet_in_the_middle(tmp_path):
    """alpha = 0.5: after smoothing, each channel's activation max equals its weight max (sqrt(a w) both), also for
    q_proj and a_proj, whose output columns later folds divide (groups are smoothed downstream first)."""
    feeds = _foldable_inputs()
    path, out, _, _ = _smooth(tmp_path, _foldable(), feeds, 0.5)
    model = load_model(out)
    targets = {t.name: t for t in find_targets(model)}
    for name in ("q_proj", "a_proj", "d_proj", "e_proj"):
        t = targets[name]
        a = channel_absmax(model, [t.input_name], feeds)[t.input_name]
        w = np.abs(model.graph.initializers[t.weight_name].const_value.numpy()).max(1)
        if name == "q_proj":  # q and k share the input: the group's weight max is over both
            wk = model.graph.initializers[targets["k_proj"].weight_name].const_value.numpy()
            w = np.maximum(w, np.abs(wk).max(1))
        np.testing.assert_allclose(a, w, rtol=1e-4)
    before = load_model(path)
    t0 = {t.name: t for t in find_targets(before)}["q_proj"]
    a0 = channel_absmax(before, [t0.input_name], feeds)[t0.input_name]
    assert a0.max() / a0.min() > 10  # the unsmoothed ranges really were spread out


@pytest.mark.parametrize("name", ["transformer", "cnn", "residual_mlp"])
def test_tiny_models_keep_their_function(tmp_path, name):
    proto, feeds = {"transformer": (tm.transformer(n_blocks=2), tm.transformer_inputs(n=3, seq=8)),
                    "cnn": (tm.cnn(), tm.cnn_inputs(n=3)),
                    "residual_mlp": (tm.residual_mlp(), tm.mlp_inputs(n=3))}[name]
    path, out, muls, log = _smooth(tmp_path, proto, feeds, 0.5)
    _same_function(path, out, feeds)
    notes = " ".join(log.notes)
    assert all(m.startswith(SMOOTH_PREFIX) for m in muls)
    assert len([n for n in log.notes if "explicit Mul" in n]) == len(muls)
    if name == "transformer":
        # the residual stream feeds q/k/v and an Add, attention context and the GLU product have no constant
        # producer: every group gets a reported explicit Mul
        assert len(muls) == 2 * 4 + 1 and "explicit Mul" in notes
    if name == "cnn":
        assert "Conv target(s) not smoothed" in notes
    if name == "residual_mlp":
        assert "not smoothed: a weight is also read by nodes outside the group" in notes


def test_pipeline_reports_it_per_target(tmp_path):
    onnx.save(tm.transformer(n_blocks=1), str(tmp_path / "t.onnx"))
    cfg = load_recipe("w8a8").override({"transforms.smoothquant": 0.5})
    res = quantize(tmp_path / "t.onnx", tm.transformer_inputs(n=4, seq=8), tmp_path / "q.onnx", cfg, quiet=True)
    report = json.loads(res.report_path.read_text())
    assert all(layer["transforms"] == ["smoothquant(explicit Mul)"] for layer in report["layers"])
    assert sum("explicit Mul" in n for n in report["transforms"]["notes"]) == 5


def test_config_values():
    assert QuantConfig.from_dict({"transforms": {"smoothquant": 0.5}}).transforms.smoothquant == 0.5
    for bad in (-0.1, 1.5, "a", True):
        with pytest.raises(ConfigError, match="transforms.smoothquant"):
            QuantConfig.from_dict({"transforms": {"smoothquant": bad}})
