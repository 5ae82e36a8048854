"""Self-validation of a written QDQ file: what onnx.checker misses, the checker itself, an ORT load, and a golden
bit-exact comparison of every DequantizeLinear with ``QuantizedWeight.dequantize()``.

The golden check runs the file's own DQ nodes and initializers (not our in-memory copy), so it proves what a runtime
will compute from the bytes on disk. DQ forms onnxruntime has no kernel for (canonical MX: FLOAT4E2M1, E8M0 scales)
are evaluated by ``onnx.reference``; com.microsoft.MatMulNBits weights are unpacked in numpy
(``decode_matmulnbits``) and compared to the bit. Quantized embedding tables are checked the same way: the
``DequantizeLinear`` in front of a Gather joins the DQ golden run, and each com.microsoft.GatherBlockQuantized node
is run by onnxruntime over every row of its table (indices 0 .. V-1) and must give the expected table bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from ..errors import ExportError
from ..formats import QuantizedWeight
from ..graph.io import data_path_for
from ..graph.model import read_external, release
from ..memory import collect, trim
from ..graph.targets import Target
from .matmulnbits import MS_DOMAIN, decode_matmulnbits_nk

GOLDEN_CHUNK_BYTES = 64 * 2**20  # DQ outputs computed per golden sub-model (each held 3-4 times while checked)

# element type -> (min opset of DequantizeLinear accepting it, min IR version that defines it)
_DQ_INPUT_TYPES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.INT8: (10, 3), ir.DataType.UINT8: (10, 3), ir.DataType.INT32: (10, 3),
    ir.DataType.FLOAT8E4M3FN: (19, 9), ir.DataType.FLOAT8E4M3FNUZ: (19, 9),
    ir.DataType.FLOAT8E5M2: (19, 9), ir.DataType.FLOAT8E5M2FNUZ: (19, 9),
    ir.DataType.INT16: (21, 3), ir.DataType.UINT16: (21, 3),
    ir.DataType.INT4: (21, 10), ir.DataType.UINT4: (21, 10),
    ir.DataType.FLOAT4E2M1: (23, 11),
    ir.DataType.INT2: (25, 13), ir.DataType.UINT2: (25, 13),
}
_SCALE_TYPES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.FLOAT: (10, 3), ir.DataType.FLOAT16: (19, 3), ir.DataType.BFLOAT16: (19, 3),
    ir.DataType.FLOAT8E8M0: (24, 12),
}
# the IR version that introduced each element type (for any initializer in the file)
_TYPE_IR = {
    ir.DataType.FLOAT8E4M3FN: 9, ir.DataType.FLOAT8E4M3FNUZ: 9, ir.DataType.FLOAT8E5M2: 9,
    ir.DataType.FLOAT8E5M2FNUZ: 9, ir.DataType.INT4: 10, ir.DataType.UINT4: 10, ir.DataType.FLOAT4E2M1: 11,
    ir.DataType.FLOAT8E8M0: 12, ir.DataType.INT2: 13, ir.DataType.UINT2: 13,
}


@dataclass
class ValidationReport:
    """What was checked on the written file; every check passed or validate_export would have raised."""

    path: Path
    opset: int
    ir_version: int
    n_dequantize: int  # DequantizeLinear nodes in the main graph (all spec-checked)
    n_weights: int  # quantized weights whose every consumer was golden-checked
    n_golden: int  # DQ nodes compared bit-exactly with the solver's values
    golden_engines: dict[str, int] = field(default_factory=dict)  # onnxruntime / onnx.reference -> DQ count
    file_bytes: int = 0  # .onnx plus .data
    seconds: float = 0.0
    n_matmulnbits: int = 0  # com.microsoft.MatMulNBits nodes (spec-checked, golden-checked in numpy)
    n_tables: int = 0  # quantized embedding tables whose every Gather was golden-checked
    ort_load: str = ""  # "ok", "skipped: <why>" or "not asked"
    ort_run: str = ""  # "ok" (one calibration sample ran at onnxruntime's default optimizations) or why not


def _fail(msg: str) -> None:
    raise ExportError(msg)


_FUSION_HINT = ("onnxruntime fused a MatMul behind a per-token activation quantizer into MatMulIntegerToFloat, "
                "whose kernel takes one activation scale and zero point only: give those layers per-tensor "
                "activations (--layer-config), or report the model and the onnxruntime version")


def _run_sample(session, path: Path, sample: Mapping[str, np.ndarray] | None) -> str:
    """Run one calibration sample through the loaded session; refuse the file if onnxruntime fails on it."""
    if sample is None:
        return "not run: no calibration sample"
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in sample]
    if missing:
        return f"not run: the sample lacks input {missing[0]!r}"
    try:
        session.run(None, {n: np.asarray(sample[n]) for n in names})
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = f" ({_FUSION_HINT})" if "MatMulIntegerToFloat" in text and "Per-Channel" in text else ""
        _fail(f"onnxruntime loads exported model {str(path)!r} but fails to run it on a calibration sample: "
              f"{text}{hint}")
    return "ok"


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.as_int()) if a is not None else default


def _const(value: ir.Value | None, node: ir.Node, role: str) -> ir.TensorProtocol:
    if value is None or value.const_value is None:
        _fail(f"DequantizeLinear {node.name!r}: its {role} {getattr(value, 'name', None)!r} is not a constant "
              f"initializer")
    return value.const_value


def check_dq_node(node: ir.Node, opset: int, ir_version: int) -> None:
    """Spec checks that onnx.checker does not make (onnx_encodings.md §1): shapes vs axis/block_size, types."""
    x = _const(node.inputs[0], node, "input")
    s = _const(node.inputs[1] if len(node.inputs) > 1 else None, node, "scale")
    zv = node.inputs[2] if len(node.inputs) > 2 else None
    z = _const(zv, node, "zero point") if zv is not None else None
    name = f"DequantizeLinear {node.name!r} (input {node.inputs[0].name!r})"
    need = _DQ_INPUT_TYPES.get(x.dtype)
    if need is None:
        _fail(f"{name}: input type {x.dtype.name} is not a DequantizeLinear input type")
    if opset < need[0] or ir_version < need[1]:
        _fail(f"{name}: {x.dtype.name} needs opset >= {need[0]} and IR >= {need[1]}, file has opset {opset}, "
              f"IR {ir_version}")
    sneed = _SCALE_TYPES.get(s.dtype)
    if sneed is None or opset < sneed[0] or ir_version < sneed[1]:
        _fail(f"{name}: scale type {s.dtype.name} is not allowed at opset {opset} / IR {ir_version}")
    if s.dtype == ir.DataType.BFLOAT16:
        _fail(f"{name}: bfloat16 scales have no onnxruntime DequantizeLinear kernel; use float32 or float16")
    if z is not None and z.dtype != x.dtype:
        _fail(f"{name}: zero point type {z.dtype.name} differs from the input type {x.dtype.name}")
    xs, ss = tuple(x.shape.numpy()), tuple(s.shape.numpy())
    rank = len(xs)
    axis = _attr_int(node, "axis", 1)
    block = _attr_int(node, "block_size", 0)
    if block and opset < 21:
        _fail(f"{name}: block_size needs opset >= 21, file has opset {opset}")
    if block < 0:
        _fail(f"{name}: block_size {block} is negative")
    if len(ss) > 0 or block:
        if not -rank <= axis < rank:
            _fail(f"{name}: axis {axis} is out of range for an input of rank {rank}")
        axis %= rank
    if block:
        if len(ss) != rank:
            _fail(f"{name}: blocked scale must have the input's rank {rank}, got shape {ss}")
        for i, (d, sd) in enumerate(zip(xs, ss)):
            if i != axis and d != sd:
                _fail(f"{name}: blocked scale shape {ss} differs from input shape {xs} outside axis {axis}")
        d, n = xs[axis], ss[axis]
        lo = math.ceil(d / n) if n > 0 else 0
        hi = math.ceil(d / (n - 1)) - 1 if n > 1 else None  # one block: any block_size >= d
        if n < 1 or block < lo or (hi is not None and block > hi):
            _fail(f"{name}: block_size {block} is outside the valid range [{lo}, {hi if hi is not None else 'inf'}] "
                  f"for {n} scale blocks over dimension {d}")
    elif len(ss) == 1:
        if ss[0] != xs[axis]:
            _fail(f"{name}: per-axis scale has length {ss[0]}, input dimension {axis} is {xs[axis]}")
    elif len(ss) != 0:
        _fail(f"{name}: scale of shape {ss} needs block_size (blocked quantization)")
    if z is not None and tuple(z.shape.numpy()) != ss:
        _fail(f"{name}: zero point shape {tuple(z.shape.numpy())} differs from the scale shape {ss}")
    if s.dtype == ir.DataType.FLOAT8E8M0 and not _attr_int(node, "output_dtype", 0):
        _fail(f"{name}: a FLOAT8E8M0 scale needs the output_dtype attribute (E8M0 cannot be the output type)")


def check_matmulnbits_node(node: ir.Node) -> None:
    """Shapes, types and attributes of a com.microsoft.MatMulNBits node (onnx_encodings.md §4)."""
    name = f"MatMulNBits {node.name!r}"
    a = {k: v.value for k, v in node.attributes.items()}
    for key in ("K", "N", "bits", "block_size"):
        if key not in a:
            _fail(f"{name}: attribute {key} is missing")
    K, N, bits, bs = (int(a[k]) for k in ("K", "N", "bits", "block_size"))
    if bits not in (2, 4, 8):
        _fail(f"{name}: bits={bits}; onnxruntime's CPU kernel takes 2, 4 or 8")
    if bs < 16 or bs & (bs - 1) or (bits == 2 and bs > 256):
        _fail(f"{name}: block_size {bs} must be a power of two >= 16 (<= 256 for 2 bits)")
    if len(node.inputs) < 3:
        _fail(f"{name}: needs inputs A, B and scales")
    B = _const(node.inputs[1], node, "B")
    sc = _const(node.inputs[2], node, "scales")
    kb = -(-K // bs)
    if B.dtype != ir.DataType.UINT8 or tuple(B.shape.numpy()) != (N, kb, bs * bits // 8):
        _fail(f"{name}: B must be uint8 [{N}, {kb}, {bs * bits // 8}], got {B.dtype.name}{list(B.shape.numpy())}")
    if sc.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or tuple(sc.shape.numpy()) not in ((N, kb), (N * kb,)):
        _fail(f"{name}: scales must be float [{N}, {kb}], got {sc.dtype.name}{list(sc.shape.numpy())}")
    zv = node.inputs[3] if len(node.inputs) > 3 else None
    if zv is not None:
        z = _const(zv, node, "zero_points")
        zb = -(-kb * bits // 8)
        if z.dtype != ir.DataType.UINT8 or tuple(z.shape.numpy()) not in ((N, zb), (N * zb,)):
            _fail(f"{name}: packed zero points must be uint8 [{N}, {zb}], got {z.dtype.name}{list(z.shape.numpy())}")


def check_gbq_node(node: ir.Node) -> None:
    """Shapes, types and attributes of a com.microsoft.GatherBlockQuantized node as export/gather.py writes it."""
    name = f"GatherBlockQuantized {node.name!r}"
    bits, block = _attr_int(node, "bits", 4), _attr_int(node, "block_size", 128)
    if bits not in (4, 8):
        _fail(f"{name}: bits={bits}; onnxruntime takes 4 or 8")
    if block < 16 or block & (block - 1):
        _fail(f"{name}: block_size {block} must be a power of two >= 16")
    if _attr_int(node, "gather_axis", 0) != 0 or _attr_int(node, "quantize_axis", 1) not in (1, -1):
        _fail(f"{name}: expected gather_axis 0 and quantize_axis 1 (the hidden axis of a [V, D] table)")
    if len(node.inputs) < 3:
        _fail(f"{name}: needs inputs data, indices and scales")
    data = _const(node.inputs[0], node, "data")
    sc = _const(node.inputs[2], node, "scales")
    if data.dtype != ir.DataType.UINT8 or len(data.shape) != 2:
        _fail(f"{name}: data must be a 2-D uint8 table, got {data.dtype.name}{list(data.shape.numpy())}")
    if sc.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or len(sc.shape) != 2:
        _fail(f"{name}: scales must be 2-D float32 or float16, got {sc.dtype.name}{list(sc.shape.numpy())}")
    V, packed = (int(d) for d in data.shape.numpy())
    cols = packed * 8 // bits
    nb = -(-cols // block)
    if tuple(sc.shape.numpy()) != (V, nb):
        _fail(f"{name}: scales must be [{V}, {nb}] for {cols} columns in blocks of {block}, got "
              f"{list(sc.shape.numpy())}")
    zv = node.inputs[3] if len(node.inputs) > 3 else None
    if zv is not None:
        z = _const(zv, node, "zero_points")
        want = (V, nb if bits == 8 else -(-nb // 2))
        if z.dtype != ir.DataType.UINT8 or tuple(z.shape.numpy()) != want:
            _fail(f"{name}: zero points must be uint8 {list(want)}, got {z.dtype.name}{list(z.shape.numpy())}")


def _spec_checks(model: ir.Model) -> list[ir.Node]:
    opset = int(model.opset_imports.get("", 1))
    irv = int(model.ir_version)
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if t is not None and _TYPE_IR.get(t.dtype, 0) > irv:
                _fail(f"initializer {v.name!r} has type {t.dtype.name}, which needs IR >= {_TYPE_IR[t.dtype]}; "
                      f"file has IR {irv}")
    # weight DQs (constant codes); activation Q/DQ read runtime tensors and are checked by onnx.checker and onnxruntime
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")
           and n.inputs[0] is not None and n.inputs[0].const_value is not None]
    for n in dqs:
        check_dq_node(n, opset, irv)
    for n in model.graph:
        if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN:
            check_matmulnbits_node(n)
        if n.op_type == "GatherBlockQuantized" and n.domain == MS_DOMAIN:
            check_gbq_node(n)
    return dqs


def _ort_unrunnable(dqs: list[ir.Node]) -> str | None:
    """Why onnxruntime's CPU build cannot load this file (DQ element / scale types it has no kernel for), or None."""
    for n in dqs:
        x, s = n.inputs[0].const_value, n.inputs[1].const_value
        if x is not None and x.dtype == ir.DataType.FLOAT4E2M1:
            return f"DequantizeLinear {n.name!r} has FLOAT4E2M1 input (no onnxruntime kernel)"
        if s is not None and s.dtype == ir.DataType.FLOAT8E8M0:
            return f"DequantizeLinear {n.name!r} has a FLOAT8E8M0 scale (no onnxruntime kernel)"
    return None


def _expected(t: Target, qw: QuantizedWeight, consumer: ir.Node) -> np.ndarray:
    """The solver's dequantized weight in the layout the file's consumer reads."""
    cpu = QuantizedWeight(qw.codes.detach().cpu(), qw.grid.to("cpu"))
    w = t.from_matrix(cpu.dequantize()).contiguous()
    if t.op_type == "Gemm" and t.trans_b and _attr_int(consumer, "transB", 0) == 0:
        w = w.t().contiguous()
    return w.numpy()


def _owned(t: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values; read from the written file without leaving its mapping (or onnx-ir's unpacked 4-bit
    copy) alive, so that checking weight after weight does not accumulate them all in memory."""
    return read_external(t) if isinstance(t, ir.ExternalTensor) else np.asarray(t.numpy())


def _golden_model(dqs: list[ir.Node], opset: int, ir_version: int) -> onnx.ModelProto:
    """A model whose outputs are the given DQ nodes' outputs, with their initializers read into memory."""
    inits: dict[str, onnx.TensorProto] = {}
    nodes, outputs = [], []
    for dq in dqs:
        for v in dq.inputs:
            if v is not None and v.name not in inits:
                t = v.const_value
                inits[v.name] = ir.serde.serialize_tensor(ir.Tensor(_owned(t), dtype=t.dtype, name=v.name))
        nodes.append(ir.serde.serialize_node(dq))
        out_type = _attr_int(dq, "output_dtype", 0) or int(dq.inputs[1].const_value.dtype)
        outputs.append(helper.make_tensor_value_info(dq.outputs[0].name, out_type, None))
    graph = helper.make_graph(nodes, "qronos_golden", [], outputs, list(inits.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _run_golden(proto: onnx.ModelProto) -> tuple[list[np.ndarray], str]:
    names = [o.name for o in proto.graph.output]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(names, {}), "onnxruntime"
    except Exception:  # e.g. NOT_IMPLEMENTED for element types ORT's CPU DQ lacks: fall back to the reference
        from onnx.reference import ReferenceEvaluator

        try:
            return list(ReferenceEvaluator(proto).run(names, {})), "onnx.reference"
        except Exception as err:
            _fail(f"DequantizeLinear nodes {', '.join(names[:3])}... cannot be evaluated by onnxruntime or "
                  f"onnx.reference: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")


def _table_expected(qt) -> np.ndarray:
    cpu = QuantizedWeight(qt.qw.codes.detach().cpu(), qt.qw.grid.to("cpu"))
    return cpu.dequantize().contiguous().numpy()


def _golden_gbq(model: ir.Model, node: ir.Node, exp: np.ndarray, table: str) -> None:
    """Run the file's GatherBlockQuantized node in onnxruntime over indices 0 .. V-1 and compare to the bit."""
    inits = []
    ins = []
    for i, v in enumerate(node.inputs):
        if i == 1:
            ins.append("__all_rows")
            continue
        if v is None:
            ins.append("")
            continue
        t = v.const_value
        inits.append(ir.serde.serialize_tensor(ir.Tensor(_owned(t), dtype=t.dtype, name=v.name)))
        ins.append(v.name)
    attrs = {k: a.value for k, a in node.attributes.items()}
    gnode = helper.make_node("GatherBlockQuantized", ins, ["__table"], domain=MS_DOMAIN, name=node.name, **attrs)
    out_type = int(node.inputs[2].const_value.dtype)
    graph = helper.make_graph([gnode], "qronos_golden_gather",
                              [helper.make_tensor_value_info("__all_rows", onnx.TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("__table", out_type, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(model.opset_imports.get("", 21))),
                                                    helper.make_opsetid(MS_DOMAIN, 1)],
                              ir_version=int(model.ir_version))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    what = f"GatherBlockQuantized {node.name!r} for table {table!r}"
    rows = max(1, GOLDEN_CHUNK_BYTES // max(1, exp[:1].nbytes))  # every row, a chunk of rows per call
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        del proto
        for r0 in range(0, max(exp.shape[0], 1), rows):
            got = sess.run(None, {"__all_rows": np.arange(r0, min(r0 + rows, exp.shape[0]), dtype=np.int64)})[0]
            _check_exact(got, exp[r0 : r0 + rows], what + (f" (rows {r0}..{r0 + len(got) - 1})" if rows < len(exp)
                                                           else ""), "the expected table")
    except ExportError:
        raise
    except Exception as err:
        _fail(f"{what} cannot be run by onnxruntime: "
              f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")


def _check_exact(got, exp: np.ndarray, what: str, reference: str) -> None:
    """The golden rule: ``got`` (what onnxruntime computed from the file) has ``exp``'s dtype, shape and bits."""
    got = np.asarray(got)
    if got.dtype != exp.dtype or got.shape != exp.shape:
        _fail(f"{what} gives {got.dtype}{list(got.shape)}, expected {exp.dtype}{list(exp.shape)}")
    g, e = np.ascontiguousarray(got).view(f"u{got.itemsize}"), np.ascontiguousarray(exp).view(f"u{exp.itemsize}")
    if not np.array_equal(g, e):  # the bits, without two byte copies of the pair
        bad = g != e
        diff = float(np.max(np.abs(got.astype(np.float64) - exp.astype(np.float64))))
        _fail(f"{what} differs from {reference} at {int(bad.sum())} of {bad.size} elements (max |diff| {diff:.3g})")


def _golden(model: ir.Model, quantized: dict[str, QuantizedWeight], targets: list[Target],
            report: ValidationReport, tables=()) -> None:
    nodes = {n.name: n for n in model.graph if n.name}
    # dq, expected (a function: the solver's values are made chunk by chunk, never all at once), weight, consumer
    checks: list[tuple[ir.Node, Callable[[], np.ndarray], int, str, str]] = []
    for qt in tables:
        exp = _table_expected(qt)
        if not qt.nodes:
            _fail(f"quantized embedding table {qt.table.name!r} has no Gather in the written file")
        for name in qt.nodes:
            node = nodes.get(name)
            if node is None:
                _fail(f"Gather node {name!r} (reader of table {qt.table.name!r}) is missing from the written file")
            if node.op_type == "GatherBlockQuantized" and node.domain == MS_DOMAIN:
                _golden_gbq(model, node, exp, qt.table.name)
                report.golden_engines["onnxruntime-gather"] = report.golden_engines.get("onnxruntime-gather", 0) + 1
                report.n_golden += 1
                continue
            dq = node.inputs[0].producer() if node.op_type == "Gather" and node.inputs[0] is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                _fail(f"table {qt.table.name!r} of node {name!r} is not read through a DequantizeLinear or "
                      f"GatherBlockQuantized in the written file")
            checks.append((dq, lambda exp=exp: exp, exp.nbytes, qt.table.name, name))
        report.n_tables += 1
    n_nbits = 0
    by_weight: dict[str, list[Target]] = {}
    for t in targets:
        if t.weight_name in quantized:
            by_weight.setdefault(t.weight_name, []).append(t)
    for w, qw in quantized.items():
        ts = by_weight.get(w)
        if not ts:
            _fail(f"quantized weight {w!r} has no target node to validate against")
        for t in ts:
            node = nodes.get(t.name)
            if node is None:
                _fail(f"node {t.name!r} (consumer of weight {w!r}) is missing from the written file")
            if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
                _golden_nbits(node, _expected_nk(qw), w)
                for v in node.inputs:
                    release(v.const_value if v is not None else None)
                report.golden_engines["numpy-matmulnbits"] = report.golden_engines.get("numpy-matmulnbits", 0) + 1
                n_nbits += 1
                continue
            inp = node.inputs[1] if len(node.inputs) > 1 else None
            dq = inp.producer() if inp is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                _fail(f"weight {w!r} of node {t.name!r} is not read through a DequantizeLinear in the written file")
            nbytes = math.prod(t.weight_shape) * np.dtype(t.weight_dtype).itemsize
            checks.append((dq, lambda t=t, qw=qw, node=node: _expected(t, qw, node), nbytes, w, t.name))
    opset, irv = int(model.opset_imports.get("", 1)), int(model.ir_version)
    seen: set[int] = set()
    chunk: list[tuple[ir.Node, Callable[[], np.ndarray], int, str, str]] = []
    size = 0
    todo = []
    for item in checks:
        if id(item[0]) in seen:
            continue
        seen.add(id(item[0]))
        chunk.append(item)
        size += item[2]
        if size >= GOLDEN_CHUNK_BYTES:
            todo.append(chunk)
            chunk, size = [], 0
    if chunk:
        todo.append(chunk)
    for chunk in todo:
        outs, engine = _run_golden(_golden_model([c[0] for c in chunk], opset, irv))
        for (dq, expected, _, w, consumer), got in zip(chunk, outs):
            _check_exact(got, expected(), f"DequantizeLinear {dq.name!r} for weight {w!r} (node {consumer!r})",
                         "the solver's values")
            report.golden_engines[engine] = report.golden_engines.get(engine, 0) + 1
            report.n_golden += 1
        del outs
        trim()
    report.n_golden += n_nbits
    report.n_weights = len(quantized)


def _expected_nk(qw: QuantizedWeight) -> np.ndarray:
    """The solver's dequantized weight in the layout MatMulNBits packs, [N, K] (no transposed copies)."""
    return QuantizedWeight(qw.codes.detach().cpu(), qw.grid.to("cpu")).dequantize().numpy()


def _golden_nbits(node: ir.Node, exp: np.ndarray, w: str) -> None:
    """The node's packed weight decoded in [N, K], compared with ``exp`` [N, K] to the bit (shapes named as the
    [K, N] weight the node multiplies by)."""
    got = decode_matmulnbits_nk(node)
    if got.dtype != exp.dtype or got.shape != exp.shape:
        _fail(f"MatMulNBits {node.name!r} for weight {w!r} decodes to {got.dtype}{list(got.shape[::-1])}, expected "
              f"{exp.dtype}{list(exp.shape[::-1])}")
    bad = got.view(f"u{got.itemsize}") != exp.view(f"u{exp.itemsize}")  # the bits, without two byte copies
    if bad.any():
        diff = float(np.max(np.abs(got.astype(np.float64) - exp.astype(np.float64))))
        _fail(f"MatMulNBits {node.name!r} for weight {w!r} differs from the solver's values at {int(bad.sum())} of "
              f"{bad.size} elements (max |diff| {diff:.3g})")


def _read_back(path: Path) -> ir.Model:
    try:
        return ir.load(str(path))
    except Exception as err:
        _fail(f"exported model {str(path)!r} cannot be read back: {err}")


def validate_export(path: str | Path, quantized: dict[str, QuantizedWeight], targets: list[Target], *,
                    ort_load: bool | None = None, checker: bool = True, tables=(),
                    sample: Mapping[str, np.ndarray] | None = None) -> ValidationReport:
    """Validate the exported file at ``path``; raises ExportError naming the tensor or node on the first failure.

    ``ort_load``: True loads the file in onnxruntime (fails for canonical MX, which it cannot run); None (default)
    does so unless the file uses DQ types onnxruntime has no kernel for; False skips it. ``checker`` False (an input
    the ONNX checker already rejects but onnxruntime runs, e.g. contrib ops in the default domain): the checker's
    verdict is not required and the onnxruntime load becomes mandatory. ``sample`` (a calibration feed): the loaded
    session also runs it, because onnxruntime's graph optimizations can fuse a valid graph into a kernel that then
    refuses it at run time (a load alone does not show that).
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        _fail(f"exported model {str(path)!r} does not exist")
    model = _read_back(path)
    opset, irv = int(model.opset_imports.get("", 1)), int(model.ir_version)
    dqs = _spec_checks(model)
    n_dq, why_not = len(dqs), _ort_unrunnable(dqs)
    n_nbits = sum(n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN for n in model.graph)
    # the checker and onnxruntime read the file themselves: our copy (all of a self-contained file's tensors) goes
    # while they hold theirs, and is read again for the golden check
    del model, dqs
    collect()
    if checker:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as err:
            _fail(f"exported model {str(path)!r} fails onnx.checker: {str(err).strip().splitlines()[0]}")
    if not checker and why_not is not None:
        _fail(f"exported model {str(path)!r} cannot be validated: the input fails onnx.checker, so onnxruntime must "
              f"load the output, but it cannot run {why_not}; choose an export onnxruntime runs")
    if ort_load is None:
        ort_load = why_not is None
        ort_state = "ok" if ort_load else f"skipped: {why_not}"
    else:
        ort_state = "ok" if ort_load else "not asked"
    if ort_load:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # the graph is optimized (fused) as a deployment's would be, but float weights are not pre-packed into
        # copies of their own: a check of what runs, not of how fast (a float lm_head would be copied whole)
        so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as err:
            _fail(f"onnxruntime cannot load exported model {str(path)!r}: {str(err).strip().splitlines()[0]}")
        ort_run = _run_sample(session, path, sample)
        del session  # its copy of every weight goes before the golden runs read them again
        collect()  # freed in onnxruntime's threads' arenas: given back, or it stays resident (memory.py)
    else:
        ort_run = "not run: the file is not loaded in onnxruntime"
    data = data_path_for(path)
    nbytes = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    report = ValidationReport(path=path, opset=opset, ir_version=irv, n_dequantize=n_dq, n_weights=0,
                              n_golden=0, file_bytes=nbytes, ort_load=ort_state, ort_run=ort_run,
                              n_matmulnbits=n_nbits)
    _golden(_read_back(path), quantized, targets, report, tables)
    report.seconds = time.perf_counter() - t0
    return report
