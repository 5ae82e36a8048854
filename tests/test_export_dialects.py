"""Export dialects beside plain QDQ: MX / FP8 in the onnxruntime-runnable and the canonical opset-24 forms, and
com.microsoft.MatMulNBits. Each file is golden-checked by validate_export and run end to end (ORT, or
onnx.reference for the canonical MX form) against the original graph with the dequantized weights substituted."""
from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from qronos_onnx.config import WeightQuantConfig
from qronos_onnx.errors import ExportError
from qronos_onnx.export import decode_matmulnbits, export_model, validate_export
from qronos_onnx.export.matmulnbits import pack_bits, unpack_bits
from qronos_onnx.export.validate import check_dq_node
from qronos_onnx.formats import QuantizedWeight, make_grid
from qronos_onnx.graph.io import save_model
from qronos_onnx.graph.model import load_model
from qronos_onnx.graph.targets import find_targets, weight_matrix

from . import tiny_models as tm
from .test_export import LINEAR_FEEDS, _attr, _inits, linear_model, run, substituted

MX = ("mxfp4", "mxfp8", "mxint8")


def quantize_all(model, targets, cfg: WeightQuantConfig) -> dict[str, QuantizedWeight]:
    """RTN on ``cfg``'s grid for every target weight, as the pipeline builds them (Conv forced per channel)."""
    out: dict[str, QuantizedWeight] = {}
    for t in targets:
        if t.weight_name in out:
            continue
        W = weight_matrix(model, t).reshape(-1, t.in_features)
        sdt = torch.float16 if t.weight_dtype == np.float16 else torch.float32
        g = make_grid(W, cfg, sdt, force_per_channel=(t.op_type == "Conv"), name=t.weight_name)
        out[t.weight_name] = QuantizedWeight(g.codes(W), g)
    return out


def export_file(tmp_path: Path, proto: onnx.ModelProto, cfg: WeightQuantConfig, dialect: str, name: str,
                **kw):
    src = tmp_path / f"src_{name}"
    onnx.save(proto, str(src))
    model = load_model(src)
    targets = find_targets(model)
    q = quantize_all(model, targets, cfg)
    export_model(model, q, targets, dialect=dialect, metadata={"quant.tool": "test"}, **kw)
    out = save_model(model, tmp_path / name, overwrite=True)
    return out, q, targets, validate_export(out, q, targets)


def cfg_for(fmt: str) -> WeightQuantConfig:
    return WeightQuantConfig.for_format(fmt)


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


MODELS = {
    "linear": (linear_model, lambda: [LINEAR_FEEDS]),
    "transformer": (lambda: tm.transformer(n_blocks=1), lambda: tm.transformer_inputs(1)),
    "cnn": (tm.cnn, lambda: tm.cnn_inputs(1)),
}

# ------------------------------------------------------------------------------------------------ qdq: ORT form


@pytest.mark.parametrize("fmt", MX + ("fp8",))
@pytest.mark.parametrize("model_name", ["linear", "cnn"])
def test_qdq_dialect_runs_in_ort(tmp_path, fmt, model_name):
    build, feeds = MODELS[model_name]
    proto = build()
    out, q, targets, rep = export_file(tmp_path, proto, cfg_for(fmt), "qdq", "q.onnx")
    assert rep.n_golden == len(targets) and rep.golden_engines == {"onnxruntime": len(targets)}
    assert rep.ort_load == "ok"
    m = onnx.load(str(out))
    inits = _inits(out)
    elem = TensorProto.INT8 if fmt in ("mxfp4", "mxint8") else TensorProto.FLOAT8E4M3FN
    convs = {t.name for t in targets if t.op_type == "Conv"}
    consumers = {i: n for n in m.graph.node for i in n.input}
    for dq in (n for n in m.graph.node if n.op_type == "DequantizeLinear"):
        codes, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert codes.data_type == elem and scale.data_type == TensorProto.FLOAT and len(dq.input) == 2
        s = numpy_helper.to_array(scale)
        if consumers[dq.output[0]].name in convs:
            assert _attr(dq, "axis") == 0 and list(scale.dims) == [codes.dims[0]]
        elif fmt == "fp8":
            assert (_attr(dq, "axis"), _attr(dq, "block_size", 0)) == (1, 0) and list(scale.dims) == [codes.dims[1]]
        else:
            k, n = codes.dims
            assert (_attr(dq, "axis"), _attr(dq, "block_size")) == (0, 32) and list(scale.dims) == [-(-k // 32), n]
        if fmt in MX:  # power-of-two scales: 2^(e-1) for MXFP4 means codes = 2 * e2m1 in [-12, 12]
            assert np.all(np.frexp(s)[0] == 0.5)
        if fmt == "mxfp4":
            c = numpy_helper.to_array(codes).astype(int)
            assert set(np.abs(c).ravel()) <= {0, 1, 2, 3, 4, 6, 8, 12}
    opset = m.opset_import[0].version
    assert opset == (19 if fmt == "fp8" else 21) and m.ir_version == (9 if fmt == "fp8" else 10)
    props = _props(out)
    assert props["quant.format"] == fmt and props["quant.dialect"] == "qdq" and props["quant.tool"] == "test"
    assert props.get("quant.mx_form") == ("onnxruntime" if fmt in MX else None)
    for f in feeds():
        got = run(out, f)[0]
        ref = run(substituted(proto, q, targets), f)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(proto, feeds()[0])[0], run(out, feeds()[0])[0], rtol=1e-7, atol=0)


def test_mxfp4_ort_form_fuses_into_matmulnbits(tmp_path):
    proto = tm.transformer(n_blocks=1)
    out, q, targets, _ = export_file(tmp_path, proto, cfg_for("mxfp4"), "qdq", "q.onnx")
    opt = tmp_path / "opt.onnx"
    feeds = tm.transformer_inputs(1)[0]
    got = run(out, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=opt,
              config={"session.qdq_matmulnbits_accuracy_level": "0"})[0]
    nodes = onnx.load(str(opt)).graph.node
    nb = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nb) == len(targets) and all(_attr(n, "bits") == 8 and _attr(n, "block_size") == 32 for n in nb)
    np.testing.assert_allclose(got, run(substituted(proto, q, targets), feeds)[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ mx: canonical form


def _blocked_dequant(codes: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    return codes.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=0)[: codes.shape[0]]


@pytest.mark.parametrize("fmt", MX)
@pytest.mark.parametrize("model_name", ["linear", "transformer", "cnn"])
def test_mx_dialect_canonical_form(tmp_path, fmt, model_name):
    build, feeds = MODELS[model_name]
    proto = build()
    out, q, targets, rep = export_file(tmp_path, proto, cfg_for(fmt), "mx", "q.onnx")
    # golden check by onnx.reference: ORT has no kernel for FLOAT4E2M1 / E8M0 DequantizeLinear
    assert rep.golden_engines == {"onnx.reference": len(targets)} and rep.ort_load.startswith("skipped")
    assert (rep.opset, rep.ir_version) == (24, 12)
    m = onnx.load(str(out))
    inits = _inits(out)
    elem = {"mxfp4": TensorProto.FLOAT4E2M1, "mxfp8": TensorProto.FLOAT8E4M3FN, "mxint8": TensorProto.INT8}[fmt]
    first = {}
    for t in targets:
        first.setdefault(t.weight_name, t)
    n_blocked = 0
    for dq in (n for n in m.graph.node if n.op_type == "DequantizeLinear"):
        codes, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert codes.data_type == elem and scale.data_type == TensorProto.FLOAT8E8M0
        assert _attr(dq, "output_dtype") == TensorProto.FLOAT
        if _attr(dq, "block_size", 0):
            n_blocked += 1
            assert (_attr(dq, "axis"), _attr(dq, "block_size")) == (0, 32)
            # independent decode of the file's bytes: element value * E8M0 scale, blocked along K
            c = numpy_helper.to_array(codes)
            s = numpy_helper.to_array(scale)
            assert s.dtype == ml_dtypes.float8_e8m0fnu
            w = _blocked_dequant(c.astype(np.float64), s.astype(np.float64), 32)
            name = dq.input[0][: -len("_quantized")]
            t = first[name]
            exp = t.from_matrix(q[name].dequantize()).numpy()
            if t.op_type == "Gemm" and t.trans_b:
                exp = exp.T
            np.testing.assert_array_equal(w, exp.astype(np.float64))
    assert n_blocked == sum(t.op_type != "Conv" for t in first.values())
    props = _props(out)
    assert (props["quant.dialect"], props["quant.mx_form"], props["quant.group_size"]) == ("mx", "canonical", "32")
    # the whole canonical model, run by the reference evaluator, equals the substituted float graph
    f = feeds()[0]
    got = ReferenceEvaluator(str(out)).run(None, f)[0]
    ref = run(substituted(proto, q, targets), f)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # asking ORT to load it fails with a clear message
    with pytest.raises(ExportError, match="onnxruntime cannot load"):
        validate_export(out, q, targets, ort_load=True)


def test_mx_dialect_keeps_int_and_fp8_weights_as_qdq(tmp_path):
    for cfg in (WeightQuantConfig(bits=4, symmetric=True, group_size=16), cfg_for("fp8")):
        out, q, targets, rep = export_file(tmp_path, linear_model(), cfg, "mx", f"{cfg.format}.onnx")
        assert rep.ort_load == "ok" and rep.opset == (21 if cfg.format == "int" else 19)
        assert not any(i.data_type == TensorProto.FLOAT8E8M0 for i in onnx.load(str(out)).graph.initializer)


def test_canonical_mxint8_folds_implicit_scale(tmp_path):
    out, q, targets, _ = export_file(tmp_path, linear_model(), cfg_for("mxint8"), "mx", "q.onnx")
    inits = _inits(out)
    qw = q["w_mm"]
    s = numpy_helper.to_array(inits["w_mm_scale"]).astype(np.float64)  # [ceil(40/32), 24] = X * 2^-6
    np.testing.assert_array_equal(s, qw.grid.scale.t().double().numpy())
    c = numpy_helper.to_array(inits["w_mm_quantized"])
    assert c.dtype == np.int8 and np.array_equal(c.T, qw.codes.numpy())


def test_all_zero_block_canonical_and_ort(tmp_path):
    """An all-zero block gets the smallest scale (canonical E8M0 byte 0x00 = 2^-127; for MXINT8 that is X * 2^-6
    with X = 2^-121) and decodes to 0."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 8)) / 5).astype(np.float32)
    w[:32, 3] = 0.0  # output column 3, first K-block: all zero
    g = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                               [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                               [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                               [numpy_helper.from_array(w, "w")])
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for fmt in MX:
        out, q, targets, rep = export_file(tmp_path, proto, cfg_for(fmt), "mx", f"{fmt}.onnx")
        e8 = numpy_helper.to_array(_inits(out)["w_scale"]).view(np.uint8)
        assert e8[0, 3] == 0 and (e8[:, [0, 1, 2, 4]] > 100).all()
        assert (q["w"].dequantize()[3, :32] == 0).all()
        out, q, targets, rep = export_file(tmp_path, proto, cfg_for(fmt), "qdq", f"{fmt}_ort.onnx")
        feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
        np.testing.assert_allclose(run(out, feeds)[0], run(substituted(proto, q, targets), feeds)[0], rtol=1e-5,
                                   atol=1e-6)


def test_fp16_model_mx_forms(tmp_path):
    proto = tm.transformer(n_blocks=1, dtype=np.float16)
    feeds = tm.transformer_inputs(1, dtype=np.float16)[0]
    out, q, targets, rep = export_file(tmp_path, proto, cfg_for("mxfp4"), "qdq", "q.onnx")
    assert all(i.data_type != TensorProto.FLOAT for i in onnx.load(str(out)).graph.initializer)
    np.testing.assert_allclose(run(out, feeds)[0].astype(np.float32),
                               run(substituted(proto, q, targets), feeds)[0].astype(np.float32), rtol=2e-3, atol=2e-3)
    out, q, targets, rep = export_file(tmp_path, proto, cfg_for("mxfp8"), "mx", "c.onnx")
    dq = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "DequantizeLinear")
    assert _attr(dq, "output_dtype") == TensorProto.FLOAT16 and rep.golden_engines == {"onnx.reference": 8}


# ------------------------------------------------------------------------------------------------ matmulnbits


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        u = rng.integers(0, 2**bits, (3, 5, 37)).astype(np.uint8)
        p = pack_bits(u, bits)
        assert p.shape == (3, 5, -(-37 * bits // 8)) and np.array_equal(unpack_bits(p, bits, 37), u)
    assert pack_bits(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]  # first element in the low nibble


@pytest.mark.parametrize("bits,symmetric,gs", [(4, True, 32), (4, False, 16), (3, False, 0), (2, True, 16),
                                               (2, False, 0), (8, True, 0), (8, False, 32), (6, True, 0)])
def test_matmulnbits_int(tmp_path, bits, symmetric, gs):
    proto = tm.transformer(n_blocks=1)
    feeds = tm.transformer_inputs(1)[0]
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, group_size=gs)
    out, q, targets, rep = export_file(tmp_path, proto, cfg, "matmulnbits", "q.onnx")
    assert rep.n_matmulnbits == len(targets) == 8 and rep.golden_engines == {"numpy-matmulnbits": 8}
    m = onnx.load(str(out))
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert {n.name for n in nodes} == {t.name for t in targets} and not any(n.op_type == "MatMul" and n.name in
                                                                            {t.name for t in targets}
                                                                            for n in m.graph.node)
    container = 2 if bits == 2 else 4 if bits <= 4 else 8
    inits = _inits(out)
    for n in nodes:
        assert n.domain == "com.microsoft" and _attr(n, "bits") == container and _attr(n, "accuracy_level") == 0
        bs = _attr(n, "block_size")
        K, N = _attr(n, "K"), _attr(n, "N")
        assert bs == (gs or K)  # per-channel: one block of next_pow2(K) (K = 32 or 64 here)
        kb = -(-K // bs)
        assert list(inits[n.input[1]].dims) == [N, kb, bs * container // 8]
        assert list(inits[n.input[2]].dims) == [N, kb]
        assert len(n.input) == (3 if symmetric else 4)
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in m.opset_import)
    props = _props(out)
    assert props["quant.dialect"] == "matmulnbits" and props["quant.matmulnbits_nodes"] == "8"
    assert props["quant.weight_bits"] == str(bits)
    # decode every node back to its weight, bit for bit, and run the file in ORT (accuracy level 0: float compute)
    graph = ir.load(str(out)).graph
    for n in graph:
        if n.op_type == "MatMulNBits":
            t = next(t for t in targets if t.name == n.name)
            assert np.array_equal(decode_matmulnbits(n), t.from_matrix(q[t.weight_name].dequantize()).numpy())
    ref = run(substituted(proto, q, targets), feeds)[0]
    np.testing.assert_allclose(run(out, feeds)[0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(out, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)[0], ref, rtol=1e-5,
                               atol=1e-5)


def test_matmulnbits_block_rules_for_long_rows(tmp_path):
    """Per-channel K=40 -> block 64 > K (ORT accepts it); K=200 -> blocks of 128; a ragged last group."""
    rng = np.random.default_rng(0)
    for K, gs, block in [(40, 0, 64), (200, 0, 128), (200, 64, 64)]:
        inits = [numpy_helper.from_array((rng.standard_normal((K, 12)) / 5).astype(np.float32), "w")]
        g = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                                   [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 12])], inits)
        proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
        proto.ir_version = 8
        for sym in (True, False):
            out, q, targets, rep = export_file(tmp_path, proto, WeightQuantConfig(bits=4, symmetric=sym,
                                                                                  group_size=gs), "matmulnbits",
                                               f"k{K}_{gs}_{sym}.onnx")
            node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits")
            assert _attr(node, "block_size") == block
            feeds = {"x": rng.standard_normal((3, K)).astype(np.float32)}
            np.testing.assert_allclose(run(out, feeds)[0], run(substituted(proto, q, targets), feeds)[0], rtol=1e-5,
                                       atol=1e-5)


def test_matmulnbits_mx_and_fallbacks(tmp_path):
    proto = linear_model()  # MatMul + Gemm(transB=1) + Gemm
    for fmt, n_nbits in (("mxfp4", 1), ("mxint8", 1), ("mxfp8", 0), ("fp8", 0)):
        out, q, targets, rep = export_file(tmp_path, proto, cfg_for(fmt), "matmulnbits", f"{fmt}.onnx")
        m = onnx.load(str(out))
        nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
        assert len(nb) == n_nbits and rep.n_golden == 3
        assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) == 3 - n_nbits  # the Gemms stay QDQ
        if nb:
            assert (_attr(nb[0], "bits"), _attr(nb[0], "block_size")) == (8, 32) and len(nb[0].input) == 3
        np.testing.assert_allclose(run(out, LINEAR_FEEDS)[0], run(substituted(proto, q, targets), LINEAR_FEEDS)[0],
                                   rtol=1e-5, atol=1e-5)
        assert _props(out)["quant.dialect"] == "matmulnbits"
    # cnn: no MatMul at all -> everything QDQ, still a valid file
    out, q, targets, rep = export_file(tmp_path, tm.cnn(), WeightQuantConfig(bits=4, symmetric=True), "matmulnbits",
                                       "cnn.onnx")
    assert rep.n_matmulnbits == 0 and rep.n_golden == 5


def test_matmulnbits_shared_weight_and_accuracy_level(tmp_path):
    proto = tm.residual_mlp()
    out, q, targets, rep = export_file(tmp_path, proto, WeightQuantConfig(bits=4, symmetric=False, group_size=16),
                                       "matmulnbits", "q.onnx", accuracy_level=4)
    m = onnx.load(str(out))
    nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nb) == 3 and all(_attr(n, "accuracy_level") == 4 for n in nb)
    shared = [n for n in nb if n.input[1].startswith("w_shared")]
    assert len(shared) == 2 and shared[0].input[1:] == shared[1].input[1:]  # one B / scales / zp, two consumers
    assert "w_shared" not in _inits(out) and rep.n_golden == 3
    feeds = tm.mlp_inputs(1)[0]
    ref = run(substituted(proto, q, targets), feeds)[0]
    got = run(out, feeds)[0]  # accuracy level 4: int8 activations, close but not exact
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_corrupted_matmulnbits_is_caught(tmp_path):
    out, q, targets, _ = export_file(tmp_path, tm.residual_mlp(), WeightQuantConfig(bits=4, symmetric=True),
                                     "matmulnbits", "q.onnx")
    m = onnx.load(str(out))
    b = next(i for i in m.graph.initializer if i.name.startswith("w2_MatMulNBits_B"))
    raw = bytearray(b.raw_data)
    raw[5] ^= 0x01
    b.raw_data = bytes(raw)
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ExportError, match=r"MatMulNBits 'fc2' for weight 'w2' differs .* at 1 of"):
        validate_export(bad, q, targets)
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
    for a in node.attribute:
        if a.name == "block_size":
            a.i = 48
    onnx.save(m, str(bad))
    with pytest.raises(ExportError, match="block_size 48 must be a power of two"):
        validate_export(bad, q, targets)


# ------------------------------------------------------------------------------------------------ misc


def test_e8m0_scale_without_output_dtype_refused():
    x = ir.Value(name="x", const_value=ir.tensor(np.zeros((32, 2), np.int8)))
    s = ir.Value(name="s", const_value=ir.tensor(np.ones((1, 2), np.float32).astype(ml_dtypes.float8_e8m0fnu)))
    node = ir.node("DequantizeLinear", [x, s], attributes={"axis": 0, "block_size": 32}, name="dq")
    with pytest.raises(ExportError, match="FLOAT8E8M0 scale needs the output_dtype"):
        check_dq_node(node, 24, 12)


def test_unknown_dialect_refused():
    model = ir.from_proto(linear_model())
    with pytest.raises(ExportError, match="unknown export dialect 'qonnx'"):
        export_model(model, {}, [], dialect="qonnx", metadata={})


def test_pipeline_mxfp4_and_nan_weight(tmp_path):
    """quantize() end to end with the MXFP4 recipe in the matmulnbits dialect; a NaN weight is refused by name."""
    from qronos_onnx.api import quantize
    from qronos_onnx.config import load_recipe
    from qronos_onnx.errors import ModelError

    proto = tm.transformer(n_blocks=1)
    model = tmp_path / "m.onnx"
    onnx.save(proto, str(model))
    calib = tm.transformer_inputs(n=4, seq=8)
    cfg = load_recipe("mxfp4-w").override({"export.dialect": "matmulnbits", "rounding.algorithm": "gptq"})
    res = quantize(model, calib, tmp_path / "q.onnx", cfg, quiet=True)
    m = onnx.load(str(res.output_path))
    assert sum(n.op_type == "MatMulNBits" for n in m.graph.node) == 8
    assert _props(res.output_path)["quant.format"] == "mxfp4"
    assert np.mean([r.rel_error for r in res.layers]) < np.mean([r.rtn_rel_error for r in res.layers])
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    w = next(i for i in bad.graph.initializer if i.name == "b0_wq")
    arr = numpy_helper.to_array(w).copy()
    arr[1, 2] = np.nan
    w.CopyFrom(numpy_helper.from_array(arr, "b0_wq"))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="weight 'b0_wq' has 1 NaN"):
        quantize(tmp_path / "bad.onnx", calib, tmp_path / "bad_q.onnx", cfg, quiet=True)


@pytest.mark.parametrize("dialect", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("gs", [32, 0])
def test_full_range_symmetric_grid_exports_negative_scales(tmp_path, dialect, gs):
    """weights.full_range: each group's largest-magnitude value lands on -8 with a scale of its sign (what
    onnxruntime's own int4 quantizer writes). The negative scales pass the golden check in both dialects and the
    file runs in onnxruntime with the substituted weights' outputs."""
    proto = tm.transformer(n_blocks=1)
    feeds = tm.transformer_inputs(1)[0]
    cfg = WeightQuantConfig(bits=4, symmetric=True, group_size=gs, full_range=True)
    out, q, targets, rep = export_file(tmp_path, proto, cfg, dialect, "q.onnx")
    scales = torch.cat([q[t.weight_name].grid.scale.flatten() for t in targets])
    assert (scales < 0).any() and (scales > 0).any()
    for t in targets:
        codes = q[t.weight_name].codes
        assert int(codes.min()) == -8 and int(codes.max()) <= 7
    ref = run(substituted(proto, q, targets), feeds)[0]
    np.testing.assert_allclose(run(out, feeds)[0], ref, rtol=1e-5, atol=1e-5)
    fused = run(out, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # DQ+MatMul fused into MatMulNBits
                config={"session.qdq_matmulnbits_accuracy_level": "0"})[0]
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)


def test_full_range_and_accuracy_level_defaults_resolve_per_dialect():
    """Unset (None), full_range is on exactly for symmetric integer grids written as MatMulNBits (onnxruntime's own
    int4 grid) and off in QDQ, where a compiler may refuse negative scales; an explicit value always wins. An unset
    accuracy_level resolves to 0 (exact) for a plain file (genai folders: test_genai_folder.py)."""
    from qronos_onnx.config import ConfigError, QuantConfig

    def resolved(**kw) -> QuantConfig:
        return QuantConfig().override(kw).resolved()

    assert QuantConfig().weights.full_range is None and QuantConfig().export.accuracy_level is None
    on = resolved(**{"weights.symmetric": True, "export.dialect": "matmulnbits"})
    assert on.weights.full_range is True and on.export.accuracy_level == 0
    assert resolved(**{"weights.symmetric": True}).weights.full_range is False  # QDQ
    assert resolved(**{"weights.symmetric": True, "export.dialect": "mx"}).weights.full_range is False
    assert resolved(**{"export.dialect": "matmulnbits"}).weights.full_range is False  # asymmetric
    assert resolved(**{"weights.symmetric": True, "weights.bits": 2, "weights.narrow": True,
                       "export.dialect": "matmulnbits"}).weights.full_range is False  # ternary
    assert resolved(**{"weights.format": "mxfp4", "weights.group_size": 32, "weights.symmetric": True,
                       "export.dialect": "matmulnbits"}).weights.full_range is False
    assert resolved(**{"weights.symmetric": True, "weights.full_range": False,
                       "export.dialect": "matmulnbits"}).weights.full_range is False
    assert resolved(**{"weights.symmetric": True, "weights.full_range": True}).weights.full_range is True
    assert resolved(**{"export.accuracy_level": 4}).export.accuracy_level == 4
    with pytest.raises(ConfigError, match="full_range must be true, false or null"):
        QuantConfig().override({"weights.full_range": "yes"})


def test_matmulnbits_symmetric_run_uses_the_full_range_grid_by_default(tmp_path):
    """`--sym --dialect matmulnbits` writes onnxruntime's extreme-on--8 grid (negative scales, code -8 used) and says
    so in OUT.config.yaml; the same run in QDQ, or with --no-full-range, keeps positive scales. A layer rule that
    makes one layer asymmetric under the full-range default is accepted (that layer leaves the full range)."""
    import yaml

    from qronos_onnx.cli import main

    model = tmp_path / "m.onnx"
    onnx.save(tm.transformer(n_blocks=1), str(model))
    common = ["--algo", "rtn", "--sym", "--group-size", "16", "--quiet", "--no-checkpoint"]

    def scales(path: Path) -> np.ndarray:
        m = onnx.load(str(path))
        names = {n.input[2] for n in m.graph.node if n.op_type == "MatMulNBits"} | \
                {n.input[1] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        return np.concatenate([numpy_helper.to_array(i).ravel() for i in m.graph.initializer if i.name in names])

    def full_range(path: Path) -> bool:
        return yaml.safe_load(path.with_name(path.name + ".config.yaml").read_text())["weights"]["full_range"]

    nbits = tmp_path / "nbits.onnx"
    assert main(["quantize", str(model), "-o", str(nbits), "--dialect", "matmulnbits", *common]) == 0
    assert full_range(nbits) is True and (scales(nbits) < 0).any()
    qdq = tmp_path / "qdq.onnx"
    assert main(["quantize", str(model), "-o", str(qdq), *common]) == 0
    assert full_range(qdq) is False and (scales(qdq) > 0).all()
    plain = tmp_path / "plain.onnx"
    assert main(["quantize", str(model), "-o", str(plain), "--dialect", "matmulnbits", "--no-full-range",
                 *common]) == 0
    assert full_range(plain) is False and (scales(plain) > 0).all()
    rules = tmp_path / "layers.yaml"
    rules.write_text("'.*': {weights: {symmetric: false}}\n")
    mixed = tmp_path / "mixed.onnx"
    assert main(["quantize", str(model), "-o", str(mixed), "--dialect", "matmulnbits", "--layer-config", str(rules),
                 *common]) == 0
    m = onnx.load(str(mixed))
    assert all(len(n.input) > 3 and n.input[3] for n in m.graph.node if n.op_type == "MatMulNBits")  # zero points
    assert (scales(mixed) > 0).all()
    with pytest.raises(SystemExit):
        main(["quantize", str(model), "-o", str(tmp_path / "x.onnx"), "--full-range", "--no-full-range", *common])
