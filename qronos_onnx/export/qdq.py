"""QDQ export: each quantized weight initializer becomes DequantizeLinear(codes, scale[, zero_point]).

Encodings follow docs/onnx_encodings.md §0 and §8 so that files are spec-valid and fuse in onnxruntime:

* MatMul / Gemm weights are stored [K, N]: per-channel is ``axis=1`` with scale [N]; group-wise is blocked
  ``axis=0, block_size=g`` with scale [ceil(K/g), N]. Gemm(transB=1) weights are stored transposed and the consumer
  switched to transB=0 (ORT does not fuse the [N, K] form).
* Conv weights are per-channel, ``axis=0`` with scale [OC].
* Symmetric grids -> INT4 (bits <= 4) or INT8 codes, no zero point; asymmetric -> UINT4/UINT8 codes plus a zero
  point of the same type and shape as the scale. 2- and 3-bit codes live in 4-bit containers (true width recorded in
  ``metadata_props``).
* One DQ node per consumer (a DQ output shared by two MatMuls is not fused); consumers share the codes initializers.

The codes, scales and zero points are packed from the QuantizedWeight as they are: nothing is re-derived.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch

from ..errors import ExportError
from ..formats import QuantizedWeight
from ..graph.targets import Target

log = logging.getLogger(__name__)

MAX_OPSET = 25  # TensorRT 11 stops here (onnx_encodings.md §8.1)

# container name -> (ir dtype, numpy dtype, min, max)
CONTAINERS: dict[str, tuple[ir.DataType, np.dtype, int, int]] = {
    "int4": (ir.DataType.INT4, np.dtype(ml_dtypes.int4), -8, 7),
    "uint4": (ir.DataType.UINT4, np.dtype(ml_dtypes.uint4), 0, 15),
    "int8": (ir.DataType.INT8, np.dtype(np.int8), -128, 127),
    "uint8": (ir.DataType.UINT8, np.dtype(np.uint8), 0, 255),
}
_SCALE_NP = {torch.float32: np.float32, torch.float16: np.float16}


@dataclass
class WeightEncoding:
    """One weight's DequantizeLinear inputs and attributes, in the ONNX layout the consumers will read."""

    weight_name: str
    codes: np.ndarray  # container dtype, ONNX layout ([K, N] for MatMul/Gemm, weight shape for Conv)
    scale: np.ndarray  # float32 or float16; [N] / [OC] per channel, [ceil(K/g), N] blocked
    zero_point: np.ndarray | None  # container dtype, same shape as scale; None when symmetric
    axis: int
    block_size: int  # 0: per-axis
    container: str
    bits: int
    transpose_gemm: bool  # Gemm(transB=1) consumers become transB=0
    output_dtype: int = 0  # TensorProto type of the DQ's output_dtype attribute (E8M0 scales); 0: not written
    min_opset: int = 0  # what the element / scale types need on top of the rule below (fp8 19, fp4 + E8M0 24)

    @property
    def opset(self) -> int:
        """Lowest opset that expresses this encoding: 4-bit types and blocked DQ need 21, float16 scales 19,
        per-axis int8 13."""
        if self.container in ("int4", "uint4") or self.block_size:
            base = 21
        else:
            base = 19 if self.scale.dtype == np.float16 else 13
        return max(base, self.min_opset)


def container_for(bits: int, symmetric: bool) -> str:
    if not 2 <= bits <= 8:
        raise ExportError(f"cannot export {bits}-bit weights as QDQ; supported widths are 2 to 8 bits")
    return ("int" if symmetric else "uint") + ("4" if bits <= 4 else "8")


def ir_version_for_opset(opset: int) -> int:
    """The IR version of the first onnx release that shipped ``opset`` (onnx.helper.VERSION_TABLE)."""
    irs = [row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= opset]
    if not irs:
        raise ExportError(f"opset {opset} is newer than the installed onnx {onnx.__version__} knows")
    return min(irs)


def _check_layout(name: str, targets: list[Target]) -> Target:
    t0 = targets[0]
    layouts = {(t.op_type, t.trans_b, t.matrix_shape, t.weight_shape) for t in targets}
    if len(layouts) > 1:
        raise ExportError(f"weight {name!r} is read in different layouts by nodes "
                          f"{', '.join(t.name for t in targets)}; cannot export one encoding for it")
    return t0


def check_scale_signs(name: str, scale: torch.Tensor, symmetric: bool) -> None:
    """Scales finite and > 0, or non-zero on a symmetric grid: a full-range one (weights.full_range) gives a group
    whose extreme is positive a negative scale, as onnxruntime's own int4 quantizer does."""
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any() if symmetric else (scale <= 0).any()):
        raise ExportError(f"quantized weight {name!r}: scales must be finite and > 0 (non-zero when symmetric)")


def encode_weight(name: str, qw: QuantizedWeight, target: Target) -> WeightEncoding:
    """Pack one QuantizedWeight for ``target``'s layout (all targets of a weight share it)."""
    grid = qw.grid
    groups, rows, cols = target.matrix_shape
    if tuple(qw.codes.shape) != (groups * rows, cols):
        raise ExportError(f"quantized weight {name!r} has codes of shape {tuple(qw.codes.shape)}, but node "
                          f"{target.name!r} needs [{groups * rows}, {cols}] (out channels x input features)")
    if tuple(grid.scale.shape) != (groups * rows, grid.n_groups) or grid.scale.shape != grid.zero_point.shape:
        raise ExportError(f"quantized weight {name!r}: scale {tuple(grid.scale.shape)} / zero point "
                          f"{tuple(grid.zero_point.shape)} do not match codes {tuple(qw.codes.shape)}")
    if grid.cols != cols:
        raise ExportError(f"quantized weight {name!r}: grid has {grid.cols} columns, codes have {cols}")
    scale_np = _SCALE_NP.get(grid.scale_dtype)
    if scale_np is None:
        raise ExportError(f"quantized weight {name!r}: scale dtype {grid.scale_dtype} is not exportable; "
                          f"use float32 or float16 (onnxruntime has no bfloat16 DequantizeLinear kernel)")
    if np.dtype(target.weight_dtype) != np.dtype(scale_np):
        raise ExportError(f"quantized weight {name!r}: scales are {np.dtype(scale_np).name} but the weight is "
                          f"{np.dtype(target.weight_dtype).name}; DequantizeLinear outputs the scale's type, "
                          f"so they must match")
    container = container_for(grid.bits, grid.symmetric)
    _, np_dtype, cmin, cmax = CONTAINERS[container]

    codes = qw.codes.detach().cpu()  # in the byte it is stored in (compact_codes): 4x less to move than int32
    lo, hi = int(codes.min()), int(codes.max())
    if lo < max(grid.qmin, cmin) or hi > min(grid.qmax, cmax):
        raise ExportError(f"quantized weight {name!r}: codes span [{lo}, {hi}], outside the {grid.bits}-bit grid "
                          f"[{grid.qmin}, {grid.qmax}] / {container} container")
    scale = grid.scale.detach().cpu().float()
    check_scale_signs(name, scale, grid.symmetric)
    scale_cast = scale.to(grid.scale_dtype)
    if not torch.equal(scale_cast.float(), scale):
        raise ExportError(f"quantized weight {name!r}: scales are not exact in {grid.scale_dtype}; the file "
                          f"would not reproduce the solver's values")
    zero = grid.zero_point.detach().cpu().float()
    if not torch.equal(zero, torch.round(zero)):
        raise ExportError(f"quantized weight {name!r}: zero points are not integers")
    if grid.symmetric and bool((zero != 0).any()):
        raise ExportError(f"quantized weight {name!r}: a symmetric grid must have zero points 0")
    if not grid.symmetric and (float(zero.min()) < cmin or float(zero.max()) > cmax):
        raise ExportError(f"quantized weight {name!r}: zero points outside the {container} range")

    per_channel = grid.n_groups == 1
    transpose_gemm = target.op_type == "Gemm" and target.trans_b
    if target.op_type == "Conv":
        if not per_channel:
            raise ExportError(f"Conv weight {name!r} (node {target.name!r}) has a group-wise grid; Conv weights are "
                              f"exported per output channel only")
        onnx_codes = codes.reshape(target.weight_shape)
        s, z, axis, block = scale[:, 0], zero[:, 0], 0, 0
    else:
        onnx_codes = target.from_matrix(codes)  # [K, N] for MatMul and Gemm(transB=0), [N, K] for transB=1
        if transpose_gemm:
            onnx_codes = onnx_codes.t()
        if per_channel:
            s, z, axis, block = scale[:, 0], zero[:, 0], 1, 0
        else:
            g = grid.group_size
            if math.ceil(cols / g) != grid.n_groups:
                raise ExportError(f"quantized weight {name!r}: {grid.n_groups} groups do not tile {cols} columns "
                                  f"with group size {g}")
            s, z, axis, block = scale.t(), zero.t(), 0, g  # [ceil(K/g), N]
    # torch's blocked transpose copy (numpy's is ~8x slower on a large int8 matrix), then the container dtype
    codes_np = onnx_codes.contiguous().numpy().astype(np.int8 if cmin < 0 else np.uint8).astype(np_dtype)
    scale_arr = np.ascontiguousarray(s.to(grid.scale_dtype).numpy())
    zp_arr = None if grid.symmetric else np.ascontiguousarray(z.numpy().astype(np.int16)).astype(
        np.int8 if cmin < 0 else np.uint8).astype(np_dtype)
    return WeightEncoding(name, codes_np, scale_arr, zp_arr, axis, block, container, grid.bits, transpose_gemm)


# ------------------------------------------------------------------------------------------------ opset upgrade

def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", 1))


def upgrade_opset(model: ir.Model, target: int) -> None:
    """Convert the default-domain opset of ``model`` up to ``target`` in place with onnx's version converter.

    Initializers are detached while the C++ converter runs (so models over 2 GB and lazy external tensors are never
    serialized) and put back afterwards by name.
    """
    current = default_opset(model)
    if current >= target:
        return
    if target > MAX_OPSET:
        raise ExportError(f"exporting needs opset {target}, above the supported maximum {MAX_OPSET}")
    if model.functions:
        ir_passes.InlinePass()(model)
    graph = model.graph
    saved = {name: v.const_value for name, v in graph.initializers.items()}
    n_inputs = len(graph.inputs)
    originals = list(graph.initializers.values())
    # subgraph initializers stay in the proto: bring external ones into memory so they survive the round trip
    for g in model.graphs():
        if g is graph:
            continue
        for v in g.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                t = v.const_value
                v.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name)
    try:
        for v in originals:
            if v.const_value is not None:
                if v.shape is None:
                    v.shape = v.const_value.shape
                if v.dtype is None:
                    v.dtype = v.const_value.dtype
            if v not in graph.inputs:
                graph.inputs.append(v)
        graph.initializers.clear()
        proto = ir.serde.serialize_model(model)
    finally:
        while len(graph.inputs) > n_inputs:
            graph.inputs.pop()
        for v in originals:
            v.const_value = saved[v.name]
            if v.const_value is not None:
                graph.register_initializer(v)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        changed = _ops_changed_between(model, current, target)
        if changed is None or changed:  # the converter failed on something else, or some op must be converted
            why = f" (operator(s) whose definition changes: {', '.join(changed[:5])})" if changed else ""
            raise ExportError(f"cannot convert the model from opset {current} to opset {target} (needed by the "
                              f"quantized format): {msg}{why}") from None
        # only operators onnx does not know (onnxruntime contrib ops in the default domain) stopped the converter,
        # and every known operator means the same at both versions: raising the import is the whole conversion
        log.info("opset %d -> %d: no known operator changes; import raised without the converter (%s)",
                 current, target, msg)
        model.opset_imports[""] = target
        if "" in model.graph.opset_imports:
            model.graph.opset_imports[""] = target
        return
    new_opset = next((o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")), None)
    if new_opset != target:
        raise ExportError(f"converting the model from opset {current} to {target} left it at opset {new_opset}")
    new_model = ir.serde.deserialize_model(converted)
    new_graph = new_model.graph
    user_inputs = list(new_graph.inputs[:n_inputs])
    missing = set(saved) - {v.name for v in new_graph.inputs}
    if missing:
        raise ExportError(f"opset conversion lost initializer(s) {sorted(missing)[:3]}; cannot restore them")
    for v in new_graph.inputs:  # includes initializers that were graph inputs already (old IR style)
        if v.name in saved and saved[v.name] is not None:
            v.const_value = saved[v.name]
            new_graph.register_initializer(v)
    new_graph.inputs.clear()
    new_graph.inputs.extend(user_inputs)
    model.graph = new_graph


def _ops_changed_between(model: ir.Model, current: int, target: int) -> list[str] | None:
    """Default-domain operators of ``model`` whose definition changes between the two opsets (None when the model
    holds no operator onnx does not know, i.e. the converter failed for another reason)."""
    changed, unknown = set(), False
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            old = onnx.defs.get_schema(node.op_type, current, "").since_version
            new = onnx.defs.get_schema(node.op_type, target, "").since_version
        except Exception:
            unknown = True
            continue
        if old != new:
            changed.add(node.op_type)
    return sorted(changed) if unknown else None


# ------------------------------------------------------------------------------------------------ graph editing

def _all_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for g in model.graphs():
        for v in list(g.inputs) + list(g.outputs) + list(g.initializers.values()):
            if v.name:
                names.add(v.name)
        for node in g:
            if node.name:
                names.add(node.name)
            for v in node.outputs:
                if v.name:
                    names.add(v.name)
    return names


def _unique(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    tensor = ir.Tensor(arr, name=name)
    value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _lazy_const(graph: ir.Graph, name: str, make: Callable[[], np.ndarray], dtype: np.dtype,
                shape: tuple[int, ...]) -> ir.Value:
    """An initializer whose array ``make`` builds when the file is written (or the value is read), not now."""
    tensor = ir.LazyTensor(lambda: ir.Tensor(make()), dtype=ir.DataType.from_numpy(np.dtype(dtype)),
                           shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _deferred(enc: WeightEncoding) -> WeightEncoding:
    """``enc`` without its codes array (a zero-size broadcast view of the same shape and dtype stands in): the
    codes initializer is a LazyTensor that encodes again when the file is written, tensor by tensor, so that the
    export never holds every weight's codes at once (they are checked here, and re-encoding gives the same ones)."""
    return dataclasses.replace(enc, codes=np.broadcast_to(np.zeros((), enc.codes.dtype), enc.codes.shape))


def _rewire(model: ir.Model, enc: WeightEncoding, targets: list[Target], nodes: dict[str, ir.Node],
            taken: set[str], encode: Callable[[], WeightEncoding]) -> int:
    """Add the codes/scale/zero-point initializers of one weight and a DQ in front of each consumer; ``encode``
    encodes the weight again when the file is written (a lazy codes initializer: ``enc`` is the deferred one)."""
    graph = model.graph
    w = enc.weight_name
    old = graph.initializers.get(w)
    if old is None:
        raise ExportError(f"weight initializer {w!r} is not in the model's main graph")
    codes = _lazy_const(graph, _unique(f"{w}_quantized", taken), lambda: encode().codes, enc.codes.dtype,
                        enc.codes.shape)
    scale = _const(graph, _unique(f"{w}_scale", taken), enc.scale)
    zp = None if enc.zero_point is None else _const(graph, _unique(f"{w}_zero_point", taken), enc.zero_point)
    attrs = {"axis": enc.axis}
    if enc.block_size:
        attrs["block_size"] = enc.block_size
    if enc.output_dtype:
        attrs["output_dtype"] = enc.output_dtype
    out_dtype = ir.DataType(enc.output_dtype) if enc.output_dtype else ir.DataType.from_numpy(enc.scale.dtype)
    n_dq = 0
    for t in targets:
        node = nodes.get(t.name)
        if node is None:
            raise ExportError(f"node {t.name!r} (consumer of weight {w!r}) is not in the model's main graph")
        if len(node.inputs) < 2 or node.inputs[1] is not old:
            raise ExportError(f"node {t.name!r} does not read weight {w!r} as its second input")
        dq = ir.node("DequantizeLinear", inputs=[codes, scale] + ([zp] if zp is not None else []),
                     attributes=attrs, name=_unique(f"{w}_DequantizeLinear", taken))
        out = dq.outputs[0]
        out.name = _unique(f"{w}_dequantized", taken)
        out.dtype = out_dtype
        out.shape = ir.Shape(enc.codes.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(1, out)
        if enc.transpose_gemm:
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
        n_dq += 1
    if not old.uses() and not old.is_graph_output():
        graph.initializers.pop(w)
    return n_dq


def export_qdq(model: ir.Model, quantized: dict[str, QuantizedWeight], targets: list[Target], *,
               metadata: dict[str, str], dialect: str = "qdq") -> ir.Model:
    """Replace each quantized weight initializer of ``model`` (edited in place and returned) by a DequantizeLinear.

    Only the consumers listed in ``targets`` are rewired; a weight that other nodes also read keeps its float
    initializer for them. Raises ExportError (naming the weight) on anything the file could not express exactly.
    ``dialect``: "qdq" writes MX / FP8 weights in their onnxruntime-runnable form, "mx" writes MX weights in the
    canonical opset-24 form (FLOAT4E2M1 / E8M0); integer weights are the same in both (export/mx.py).
    """
    if dialect not in ("qdq", "mx"):
        raise ExportError(f"export_qdq writes the 'qdq' and 'mx' dialects, not {dialect!r}")
    from .mx import encode_element_weight

    by_weight: dict[str, list[Target]] = {}
    for t in targets:
        by_weight.setdefault(t.weight_name, []).append(t)
    encodings: list[tuple[WeightEncoding, list[Target]]] = []
    encoders: dict[str, Callable[[], WeightEncoding]] = {}
    formats: set[str] = set()
    for name, qw in quantized.items():
        ts = by_weight.get(name)
        if not ts:
            raise ExportError(f"quantized weight {name!r} has no target node in the target list")
        target = _check_layout(name, ts)
        if qw.format == "int":
            encode = functools.partial(encode_weight, name, qw, target)
        else:
            encode = functools.partial(encode_element_weight, name, qw, target, canonical=(dialect == "mx"))
        formats.add(qw.format)
        encodings.append((_deferred(encode()), ts))
        encoders[name] = encode

    need = max((e.opset for e, _ in encodings), default=13)
    current = default_opset(model)
    if current < need:
        upgrade_opset(model, need)
    opset = max(current, need)
    model.ir_version = max(int(model.ir_version or 0), ir_version_for_opset(opset))

    nodes = {n.name: n for n in model.graph if n.name}
    taken = _all_names(model)
    n_dq = sum(_rewire(model, enc, ts, nodes, taken, encoders[enc.weight_name]) for enc, ts in encodings)

    props = model.metadata_props
    props.update({str(k): str(v) for k, v in metadata.items()})
    containers = sorted({e.container for e, _ in encodings})
    bits = sorted({e.bits for e, _ in encodings})
    if encodings:
        props.setdefault("quant.bits", ",".join(map(str, bits)))
        props["quant.weight_bits"] = ",".join(map(str, bits))
        props["quant.container"] = ",".join(containers)
    if formats:
        props["quant.format"] = ",".join(sorted(formats))
    if formats & {"mxfp4", "mxfp8", "mxint8"}:
        props["quant.group_size"] = "32"
        props["quant.mx_form"] = "canonical" if dialect == "mx" else "onnxruntime"
    props["quant.dialect"] = dialect
    props["quant.quantized_weights"] = str(len(encodings))
    log.info("QDQ export: %d weights, %d DequantizeLinear nodes, opset %d", len(encodings), n_dq, opset)
    return model
