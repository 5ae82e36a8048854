"""QDQ export: encodings, golden bit-exact dequantization, runtime equivalence, MatMulNBits fusion, opset upgrade."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.config import WeightQuantConfig
from qronos_onnx.errors import ExportError
from qronos_onnx.export import export_qdq, upgrade_opset, validate_export
from qronos_onnx.formats import IntGrid, QuantizedWeight, make_int_grid
from qronos_onnx.graph.io import save_model
from qronos_onnx.graph.model import load_model
from qronos_onnx.graph.targets import Target, find_targets, weight_matrix

from . import tiny_models as tm

# ------------------------------------------------------------------------------------------------ helpers


def linear_model(dtype=np.float32, seed: int = 0) -> onnx.ModelProto:
    """MatMul [40,24] -> Relu -> Gemm(transB=1, [20,24], bias) -> Gemm(transB=0, [20,12], bias).

    K = 40, 24, 20 make every group size (16, 32) end in a ragged last block.
    """
    rng = np.random.default_rng(seed)
    tdt = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inits = [numpy_helper.from_array((rng.standard_normal(s) / 5).astype(dtype), n) for n, s in
             [("w_mm", (40, 24)), ("w_gt", (20, 24)), ("b_gt", (20,)), ("w_g", (20, 12)), ("b_g", (12,))]]
    nodes = [
        helper.make_node("MatMul", ["x", "w_mm"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w_gt", "b_gt"], ["g1"], transB=1, name="gemm_tb"),
        helper.make_node("Gemm", ["g1", "w_g", "b_g"], ["y"], name="gemm"),
    ]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", tdt, ["b", 40])],
                              [helper.make_tensor_value_info("y", tdt, ["b", 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv 1-D (bias), 2-D grouped + depthwise, 3-D grouped, glued with reshapes so one input drives all."""
    rng = np.random.default_rng(seed)
    f = np.float32

    def w(shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(f)

    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("k1", w((6, 3, 3))), ("k1_b", rng.standard_normal(6).astype(f)),
        ("k2", w((8, 3, 3, 3))), ("k3", w((8, 1, 3, 3))), ("k3_b", rng.standard_normal(8).astype(f)),
        ("k4", w((4, 2, 2, 2, 2))),
        ("shape2d", np.array([0, 6, 4, 4], np.int64)), ("shape3d", np.array([0, 4, 2, 4, 4], np.int64)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "k1", "k1_b"], ["c1"], pads=[1, 1], name="conv1d"),  # [B,6,16]
        helper.make_node("Reshape", ["c1", "shape2d"], ["c1r"], name="to2d"),  # [B,6,4,4]
        helper.make_node("Conv", ["c1r", "k2"], ["c2"], group=2, pads=[1, 1, 1, 1], name="conv2d_grouped"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "k3", "k3_b"], ["c3"], group=8, pads=[1, 1, 1, 1], name="conv2d_dw"),
        helper.make_node("Reshape", ["c3", "shape3d"], ["c3r"], name="to3d"),  # [B,4,2,4,4]
        helper.make_node("Conv", ["c3r", "k4"], ["y"], group=2, name="conv3d_grouped"),  # [B,4,1,3,3]
    ]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 1, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def quantize_rtn(model: ir.Model, targets: list[Target], bits: int, symmetric: bool, group_size: int = 0,
                 narrow: bool = False) -> dict[str, QuantizedWeight]:
    """RTN QuantizedWeights for every target weight (once per shared weight), as the pipeline would make them."""
    out: dict[str, QuantizedWeight] = {}
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, group_size=group_size, narrow=narrow)
    for t in targets:
        if t.weight_name in out:
            continue
        W = weight_matrix(model, t).reshape(-1, t.in_features)  # [rows_total, cols]
        sdt = torch.float16 if t.weight_dtype == np.float16 else torch.float32
        grid = make_int_grid(W, cfg, sdt, force_per_channel=(t.op_type == "Conv"))
        out[t.weight_name] = QuantizedWeight(grid.codes(W), grid)
    return out


def substituted(proto: onnx.ModelProto, quantized: dict[str, QuantizedWeight], targets: list[Target]):
    """The original graph with each quantized weight replaced by its dequantized value (the reference)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    first = {}
    for t in targets:
        first.setdefault(t.weight_name, t)
    for init in ref.graph.initializer:
        if init.name in quantized:
            t = first[init.name]
            arr = t.from_matrix(quantized[init.name].dequantize()).contiguous().numpy()
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return ref


def run(model, feeds: dict, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, config: dict | None = None,
        optimized_path: Path | None = None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def export_file(tmp_path: Path, proto: onnx.ModelProto, bits: int, symmetric: bool, group_size: int = 0,
                name: str = "q.onnx", **save_kw):
    """Save ``proto``, load it lazily, quantize with RTN, export, save, validate. Returns what the tests need."""
    src = tmp_path / f"src_{name}"
    if not src.exists():
        onnx.save(proto, str(src))
    model = load_model(src)
    targets = find_targets(model)
    q = quantize_rtn(model, targets, bits, symmetric, group_size)
    export_qdq(model, q, targets, metadata={"quant.algorithm": "rtn", "quant.tool": "test"})
    out = save_model(model, tmp_path / name, overwrite=True, **save_kw)
    report = validate_export(out, q, targets)
    return out, q, targets, report


def dq_nodes(path: Path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]


def _inits(path: Path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


LINEAR_FEEDS = {"x": np.random.default_rng(3).standard_normal((5, 40)).astype(np.float32)}
CONV_FEEDS = {"x": np.random.default_rng(4).standard_normal((2, 3, 16)).astype(np.float32)}

# ------------------------------------------------------------------------------------------------ golden + runtime


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 16, 32])
def test_golden_and_runtime_linear(tmp_path, bits, symmetric, group_size):
    """Every width / grid / granularity: bit-exact DQ (validate_export) and ORT output == substituted float graph."""
    proto = linear_model()
    out, q, targets, report = export_file(tmp_path, proto, bits, symmetric, group_size)
    assert report.n_weights == 3 and report.n_golden == 3 and report.golden_engines == {"onnxruntime": 3}
    # the golden check is not vacuous: the solver's own values, via the file's DQ nodes, match to the bit
    got = run(out, LINEAR_FEEDS)[0]
    ref = run(substituted(proto, q, targets), LINEAR_FEEDS)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # and quantization did something: the float model differs
    assert not np.allclose(run(proto, LINEAR_FEEDS)[0], got, rtol=1e-7, atol=0)

    inits = _inits(out)
    container = ("int" if symmetric else "uint") + ("4" if bits <= 4 else "8")
    elem = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4, "int8": TensorProto.INT8,
            "uint8": TensorProto.UINT8}[container]
    m = onnx.load(str(out))
    opset = m.opset_import[0].version
    blocked = {}
    for dq in dq_nodes(out):
        codes, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert codes.data_type == elem and scale.data_type == TensorProto.FLOAT
        k, n = codes.dims
        bs = _attr(dq, "block_size", 0)
        if group_size and group_size < k:
            assert (_attr(dq, "axis"), bs) == (0, group_size)
            assert list(scale.dims) == [-(-k // group_size), n]
            blocked[dq.input[0]] = k % group_size != 0
        else:
            assert (_attr(dq, "axis"), bs) == (1, 0) and list(scale.dims) == [n]
        if symmetric:
            assert len(dq.input) == 2
        else:
            zp = inits[dq.input[2]]
            assert zp.data_type == elem and list(zp.dims) == list(scale.dims)
    assert (not group_size) or any(blocked.values())  # a ragged last block was exercised
    assert opset == (21 if (bits <= 4 or group_size) else 17)  # int8 per-channel keeps the model's opset 17
    assert m.ir_version == (10 if opset == 21 else 8)
    gemm_tb = next(n for n in m.graph.node if n.name == "gemm_tb")
    assert _attr(gemm_tb, "transB") == 0
    assert gemm_tb.input[2] == "b_gt" and inits["b_gt"].data_type == TensorProto.FLOAT  # bias kept, float
    assert not {"w_mm", "w_gt", "w_g"} & set(inits)  # float weights replaced
    props = {p.key: p.value for p in m.metadata_props}
    assert props["quant.algorithm"] == "rtn" and props["quant.container"] == container
    assert props["quant.weight_bits"] == str(bits) and props["quant.bits"] == str(bits)


def test_conv_1d_2d_3d_grouped_depthwise(tmp_path):
    proto = conv_model()
    for bits, sym in [(4, True), (3, False), (8, False)]:
        out, q, targets, report = export_file(tmp_path, proto, bits, sym, name=f"c{bits}.onnx")
        assert {t.name for t in targets} == {"conv1d", "conv2d_grouped", "conv2d_dw", "conv3d_grouped"}
        assert report.n_golden == 4
        inits = _inits(out)
        for dq in dq_nodes(out):
            codes, scale = inits[dq.input[0]], inits[dq.input[1]]
            assert _attr(dq, "axis") == 0 and _attr(dq, "block_size", 0) == 0
            assert list(scale.dims) == [codes.dims[0]]
        got = run(out, CONV_FEEDS)[0]
        ref = run(substituted(proto, q, targets), CONV_FEEDS)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_conv_groupwise_grid_refused():
    model = ir.from_proto(conv_model())
    targets = find_targets(model)
    # conv1d's weight is [6, 3, 3]: 9 columns; a two-group grid over them cannot be written per channel
    grid = IntGrid(scale=torch.ones(6, 2), zero_point=torch.zeros(6, 2), qmin=-8, qmax=7, group_size=5, cols=9,
                   bits=4, symmetric=True)
    qw = QuantizedWeight(torch.zeros(6, 9, dtype=torch.int16), grid)
    with pytest.raises(ExportError, match="k1.*group-wise"):
        export_qdq(model, {"k1": qw}, targets, metadata={})


def test_matmulnbits_fusion_and_exact_numerics(tmp_path):
    """ORT default optimizations turn every 4-bit DQ+MatMul into MatMulNBits; accuracy_level 0 stays exact."""
    proto = tm.transformer(n_blocks=2)
    feeds = tm.transformer_inputs(1)[0]
    for gs in (0, 16, 32):
        out, q, targets, _ = export_file(tmp_path, proto, 4, True, gs, name=f"t{gs}.onnx")
        opt = tmp_path / f"opt{gs}.onnx"
        run(out, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=opt)
        ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
        assert ops.count("MatMulNBits") == len(targets) == 15
        assert "DequantizeLinear" not in ops
        ref = run(substituted(proto, q, targets), feeds)[0]
        exact = run(out, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    config={"session.qdq_matmulnbits_accuracy_level": "0"})[0]
        np.testing.assert_allclose(exact, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(run(out, feeds)[0], ref, rtol=1e-5, atol=1e-5)


def test_shared_weight_quantized_once(tmp_path):
    proto = tm.residual_mlp()
    out, q, targets, report = export_file(tmp_path, proto, 4, False, 16)
    assert sorted(q) == ["w2", "w_shared"] and report.n_golden == 3
    m = onnx.load(str(out))
    names = {i.name for i in m.graph.initializer}
    assert "w_shared" not in names and "w2" not in names  # float weights gone
    assert sum(n.startswith("w_shared_quantized") for n in names) == 1  # one codes tensor ...
    shared_dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w_shared")]
    assert len(shared_dqs) == 2 and len({n.output[0] for n in shared_dqs}) == 2  # ... one DQ per consumer
    feeds = tm.mlp_inputs(1)[0]
    np.testing.assert_allclose(run(out, feeds)[0], run(substituted(proto, q, targets), feeds)[0], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("bits,symmetric,gs", [(4, True, 16), (8, False, 0)])
def test_fp16_model_uses_fp16_scales(tmp_path, bits, symmetric, gs):
    proto = tm.transformer(n_blocks=1, dtype=np.float16)
    out, q, targets, report = export_file(tmp_path, proto, bits, symmetric, gs)
    assert report.n_golden == len(targets)
    inits = _inits(out)
    for dq in dq_nodes(out):
        assert inits[dq.input[1]].data_type == TensorProto.FLOAT16
    feeds = tm.transformer_inputs(1, dtype=np.float16)[0]
    got = run(out, feeds)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), run(substituted(proto, q, targets), feeds)[0].astype(
        np.float32), rtol=2e-3, atol=2e-3)


def test_fp32_scales_on_fp16_weight_refused():
    model = ir.from_proto(tm.transformer(n_blocks=1, dtype=np.float16))
    targets = find_targets(model)
    t = targets[0]
    W = weight_matrix(model, t)[0]
    grid = make_int_grid(W, WeightQuantConfig(bits=4, symmetric=True), torch.float32)
    with pytest.raises(ExportError, match=f"{t.weight_name}.*float32.*float16"):
        export_qdq(model, {t.weight_name: QuantizedWeight(grid.codes(W), grid)}, targets, metadata={})


def test_bad_codes_and_unknown_weight_refused():
    model = ir.from_proto(linear_model())
    targets = find_targets(model)
    q = quantize_rtn(model, targets, 4, True)
    with pytest.raises(ExportError, match="'nope' has no target"):
        export_qdq(model, {"nope": q["w_mm"]}, targets, metadata={})
    bad = QuantizedWeight(q["w_mm"].codes.clone(), q["w_mm"].grid)
    bad.codes[0, 0] = 9
    with pytest.raises(ExportError, match="w_mm.*codes span"):
        export_qdq(model, {"w_mm": bad}, targets, metadata={})
    with pytest.raises(ExportError, match="w_mm.*shape"):
        export_qdq(model, {"w_mm": q["w_g"]}, targets, metadata={})


# ------------------------------------------------------------------------------------------------ opset upgrade


def _layernorm_model() -> onnx.ModelProto:
    """Ops whose schema changes between opset 17 and 21 (ReduceMean axes attr -> input, Split) plus a MatMul."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 8)) / 4).astype(np.float32), "w")]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1, name="mean"),
        helper.make_node("Sub", ["x", "mu"], ["xc"], name="center"),
        helper.make_node("Split", ["xc"], ["a", "b"], axis=-1, name="split"),
        helper.make_node("Concat", ["b", "a"], ["xs"], axis=-1, name="swap"),
        helper.make_node("MatMul", ["xs", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("name", ["transformer", "residual_mlp", "conv", "linear", "layernorm"])
def test_opset_upgrade_keeps_outputs(tmp_path, name):
    proto, feeds = {
        "transformer": (tm.transformer(n_blocks=1), tm.transformer_inputs(1)[0]),
        "residual_mlp": (tm.residual_mlp(), tm.mlp_inputs(1)[0]),
        "conv": (conv_model(), CONV_FEEDS),
        "linear": (linear_model(), LINEAR_FEEDS),
        "layernorm": (_layernorm_model(), {"x": np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)}),
    }[name]
    before = run(proto, feeds, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    src = tmp_path / "m.onnx"
    onnx.save(proto, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)  # mutates proto
    model = load_model(src)  # lazy: the upgrade must carry ExternalTensors through
    upgrade_opset(model, 21)
    model.ir_version = 10
    out = save_model(model, tmp_path / "m21.onnx")
    m21 = onnx.load(str(out), load_external_data=False)
    assert m21.opset_import[0].version == 21
    # an inline save of a lazily loaded model embeds the bytes: nothing refers to the input's m.onnx.data
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in m21.graph.initializer)
    if name == "layernorm":  # the converter really rewrote opset-18 changes: ReduceMean axes became an input
        mean = next(n for n in m21.graph.node if n.op_type == "ReduceMean")
        assert len(mean.input) == 2 and not any(a.name == "axes" for a in mean.attribute)
    onnx.checker.check_model(str(out), full_check=True)
    after = run(out, feeds, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_export_upgrades_opset_13_model(tmp_path):
    proto = _layernorm_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)}
    out, q, targets, report = export_file(tmp_path, proto, 4, True, 16)
    assert (report.opset, report.ir_version) == (21, 10)
    np.testing.assert_allclose(run(out, feeds)[0], run(substituted(proto, q, targets), feeds)[0], rtol=1e-5,
                               atol=1e-6)
    out8, *_ , r8 = export_file(tmp_path, proto, 8, True, 0, name="q8.onnx")
    assert (r8.opset, r8.ir_version) == (13, 7)  # int8 per-channel: the model's opset 13 already expresses it


def test_opset_conversion_failure_is_export_error(monkeypatch):
    model = ir.from_proto(linear_model())
    targets = find_targets(model)
    q = quantize_rtn(model, targets, 4, True)

    def boom(*a, **k):
        raise RuntimeError("adapter missing for op Foo")

    monkeypatch.setattr(onnx.version_converter, "convert_version", boom)
    with pytest.raises(ExportError, match="opset 17 to opset 21.*adapter missing"):
        export_qdq(model, q, targets, metadata={})
    # the failed conversion left the model intact
    assert model.opset_imports[""] == 17 and "w_mm" in model.graph.initializers


def test_excluded_consumer_keeps_float_weight(tmp_path):
    """Only the listed targets are rewired: an excluded node reading the same weight keeps the float tensor."""
    proto = tm.residual_mlp()
    src = tmp_path / "m.onnx"
    onnx.save(proto, str(src))
    model = load_model(src)
    targets = find_targets(model, exclude=["fc3_shared"])
    q = quantize_rtn(model, targets, 4, True)
    export_qdq(model, q, targets, metadata={})
    out = save_model(model, tmp_path / "q.onnx")
    validate_export(out, q, targets)
    m = onnx.load(str(out))
    fc1, fc3 = (next(n for n in m.graph.node if n.name == k) for k in ("fc1", "fc3_shared"))
    assert fc1.input[1] == "w_shared_dequantized" and fc3.input[1] == "w_shared"
    assert "w_shared" in {i.name for i in m.graph.initializer}
    feeds = tm.mlp_inputs(1)[0]
    x = feeds["x"]
    wq = {name: qw.dequantize().t().numpy() for name, qw in q.items()}  # MatMul layout [K, N]
    w_float = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w_shared"))
    h3 = x + np.maximum(x @ wq["w_shared"], 0) @ wq["w2"]
    np.testing.assert_allclose(run(out, feeds)[0], h3 @ w_float, rtol=1e-5, atol=1e-5)


def test_upgrade_with_initializers_listed_as_inputs(tmp_path):
    """Old-IR models list initializers among graph inputs; the upgrade must keep them as initializers."""
    proto = tm.residual_mlp()
    for init in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    proto.ir_version = 3
    proto.opset_import[0].version = 9
    onnx.checker.check_model(proto)
    feeds = tm.mlp_inputs(1)[0]
    model = ir.from_proto(proto)
    upgrade_opset(model, 21)
    assert set(model.graph.initializers) == {"w_shared", "w2"}
    model.ir_version = 10
    out = save_model(model, tmp_path / "m.onnx")
    np.testing.assert_array_equal(run(out, feeds)[0], run(proto, feeds)[0])


@pytest.mark.parametrize("bits,symmetric,gs", [(4, True, 32), (3, False, 16), (8, True, 0)])
def test_tiny_cnn_conv_and_gemm(tmp_path, bits, symmetric, gs):
    """tiny_models.cnn: padded, grouped, depthwise dilated SAME_UPPER convs, Gemm transB=1 and transB=0."""
    proto = tm.cnn()
    out, q, targets, report = export_file(tmp_path, proto, bits, symmetric, gs)
    assert report.n_golden == len(targets) == 5
    m = onnx.load(str(out))
    assert all(_attr(n, "transB", 0) == 0 for n in m.graph.node if n.op_type == "Gemm")
    for feeds in tm.cnn_inputs(2):
        np.testing.assert_allclose(run(out, feeds)[0], run(substituted(proto, q, targets), feeds)[0], rtol=1e-5,
                                   atol=1e-5)


def test_upgrade_inlines_local_functions(tmp_path):
    rng = np.random.default_rng(0)
    fn = helper.make_function("local", "Act", ["X"], ["Y"],
                              [helper.make_node("ReduceMax", ["X"], ["m"], axes=[-1], keepdims=1),
                               helper.make_node("Sub", ["X", "m"], ["Y"])],
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Act", ["h"], ["y"],
                                                                                  domain="local", name="act")],
        "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")])
    proto = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                    helper.make_opsetid("local", 1)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    out, q, targets, report = export_file(tmp_path, proto, 4, True, 16)
    assert report.opset == 21
    m = onnx.load(str(out))
    assert not m.functions and "ReduceMax" in {n.op_type for n in m.graph.node}
    np.testing.assert_allclose(run(out, feeds)[0], run(substituted(proto, q, targets), feeds)[0], rtol=1e-5,
                               atol=1e-6)
