"""validate_export catches corrupted or mis-encoded files that onnx.checker lets through."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.errors import ExportError
from qronos_onnx.export import validate_export
from qronos_onnx.export.validate import check_dq_node

from .test_export import export_file, linear_model


@pytest.fixture()
def exported(tmp_path):
    out, q, targets, _ = export_file(tmp_path, linear_model(), 4, False, 16)
    return out, q, targets


def _edit(path: Path, fn) -> Path:
    m = onnx.load(str(path))
    fn(m)
    dst = path.with_name("bad.onnx")
    onnx.save(m, str(dst))
    return dst


def _init(m: onnx.ModelProto, prefix: str) -> onnx.TensorProto:
    return next(i for i in m.graph.initializer if i.name.startswith(prefix))


def _dq(m: onnx.ModelProto, weight: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{weight}_quantized")


def test_clean_file_passes(exported):
    out, q, targets = exported
    rep = validate_export(out, q, targets)
    assert rep.n_golden == 3 and rep.opset == 21 and rep.n_dequantize == 3 and rep.seconds > 0


def test_flipped_code_byte_is_caught(exported):
    out, q, targets = exported

    def flip(m):
        t = _init(m, "w_mm_quantized")
        raw = bytearray(t.raw_data)
        raw[7] ^= 0x10  # one 4-bit code, high nibble
        t.raw_data = bytes(raw)

    bad = _edit(out, flip)
    onnx.checker.check_model(str(bad), full_check=True)  # the checker is happy ...
    with pytest.raises(ExportError, match=r"w_mm.*node 'mm'.*differs.*at 1 of 960 elements"):
        validate_export(bad, q, targets)  # ... the golden check is not


def test_scale_off_by_one_ulp_is_caught(exported):
    out, q, targets = exported

    def nudge(m):
        t = _init(m, "w_g_scale")
        arr = numpy_helper.to_array(t).copy()
        arr.flat[3] = np.nextafter(arr.flat[3], np.float32(1))
        t.CopyFrom(numpy_helper.from_array(arr, t.name))

    with pytest.raises(ExportError, match=r"w_g.*node 'gemm'.*differs"):
        validate_export(_edit(out, nudge), q, targets)


def test_wrong_block_size_is_caught(exported):
    out, q, targets = exported

    def rebless(m):
        dq = _dq(m, "w_mm")
        for a in dq.attribute:
            if a.name == "block_size":
                a.i = 32  # scale still has ceil(40/16) = 3 blocks
    bad = _edit(out, rebless)
    onnx.checker.check_model(str(bad), full_check=True)
    with pytest.raises(ExportError, match=r"w_mm_quantized.*block_size 32 is outside the valid range \[14, 19\]"):
        validate_export(bad, q, targets)


def test_wrong_scale_and_zero_point_shapes_are_caught(exported):
    out, q, targets = exported

    def short_scale(m):  # per-block scale with a wrong non-axis dimension
        t = _init(m, "w_g_scale")
        arr = numpy_helper.to_array(t)[:, :-1].copy()
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        z = _init(m, "w_g_zero_point")
        z.dims[1] -= 1
        z.raw_data = z.raw_data[: (z.dims[0] * z.dims[1] + 1) // 2]

    with pytest.raises(ExportError, match=r"w_g_quantized.*blocked scale shape \(2, 11\) differs"):
        validate_export(_edit(out, short_scale), q, targets)

    def zp_shape(m):
        z = _init(m, "w_mm_zero_point")
        z.dims[:] = [z.dims[0] * z.dims[1]]
    with pytest.raises(ExportError, match=r"w_mm_quantized.*zero point shape \(72,\) differs from the scale shape"):
        validate_export(_edit(out, zp_shape), q, targets)


def test_zero_point_type_mismatch_is_caught(exported):
    out, q, targets = exported

    def retype(m):
        z = _init(m, "w_mm_zero_point")
        arr = np.zeros(tuple(z.dims), np.uint8)
        z.CopyFrom(numpy_helper.from_array(arr, z.name))
    with pytest.raises(ExportError, match=r"w_mm_quantized.*zero point type UINT8 differs from the input type UINT4"):
        validate_export(_edit(out, retype), q, targets)


def test_float_weight_left_in_place_is_caught(exported, tmp_path):
    out, q, targets = exported

    def unquantize(m):
        dq = _dq(m, "w_g")
        node = next(n for n in m.graph.node if n.name == "gemm")
        w = np.zeros((20, 12), np.float32)
        m.graph.initializer.append(numpy_helper.from_array(w, "w_g_float"))
        node.input[1] = "w_g_float"
        m.graph.node.remove(dq)
    with pytest.raises(ExportError, match=r"weight 'w_g' of node 'gemm' is not read through a DequantizeLinear"):
        validate_export(_edit(out, unquantize), q, targets)


def test_int4_below_ir10_is_caught(exported):
    out, q, targets = exported
    with pytest.raises(ExportError, match=r"INT4.*needs.*IR >= 10.*IR 9"):
        validate_export(_edit(out, lambda m: setattr(m, "ir_version", 9)), q, targets)


def test_check_dq_node_per_axis_and_axis_range():
    import onnx_ir as ir

    def node(x_shape, s_shape, **attrs):
        g = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["x", "s"], ["y"], name="dq", **attrs)], "g", [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.zeros(x_shape, np.int8), "x"),
             numpy_helper.from_array(np.ones(s_shape, np.float32), "s")])
        model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
        return next(iter(model.graph))

    check_dq_node(node((4, 6), (6,), axis=1), 21, 10)
    check_dq_node(node((4, 6), (), axis=1), 21, 10)  # per-tensor
    with pytest.raises(ExportError, match="per-axis scale has length 5"):
        check_dq_node(node((4, 6), (5,), axis=1), 21, 10)
    with pytest.raises(ExportError, match="axis 2 is out of range"):
        check_dq_node(node((4, 6), (6,), axis=2), 21, 10)
    with pytest.raises(ExportError, match="needs block_size"):
        check_dq_node(node((4, 6), (2, 6), axis=0), 21, 10)
    with pytest.raises(ExportError, match="block_size needs opset >= 21"):
        check_dq_node(node((4, 6), (2, 6), axis=0, block_size=2), 19, 9)


def test_golden_falls_back_to_onnx_reference(exported, monkeypatch):
    """Forms onnxruntime cannot run are checked with onnx.reference, still bit-exactly."""
    out, q, targets = exported
    import onnxruntime as ort

    def no_kernel(*a, **k):
        raise RuntimeError("NOT_IMPLEMENTED : Could not find an implementation for DequantizeLinear(21)")

    monkeypatch.setattr(ort, "InferenceSession", no_kernel)
    rep = validate_export(out, q, targets, ort_load=False)
    assert rep.golden_engines == {"onnx.reference": 3}

    def flip(m):
        t = _init(m, "w_gt_quantized")
        t.raw_data = bytes([t.raw_data[0] ^ 0x01]) + t.raw_data[1:]
    with pytest.raises(ExportError, match=r"w_gt.*differs.*at 1 of"):
        validate_export(_edit(out, flip), q, targets, ort_load=False)
