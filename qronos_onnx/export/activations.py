"""Activation quantizers as ONNX subgraphs: built once here, used by the capture's quantized stream and the export.

Each quantized target reads its activation input through one of these subgraphs (onnx_encodings.md §6), so the X~
the rounding algorithms see and the file onnxruntime runs compute the same numbers:

* static per-tensor (INT8 / INT4 / FP8 E4M3FN): ``Q(x, s, zp) -> DQ`` with constant scale and zero point; the zero
  point's type fixes the element type (int8/uint8 at opset 13, int4/uint4 at 21, float8e4m3fn at 19 with
  ``saturate=1``). Asymmetric grids are unsigned (u8 activations + s8 weights is the form onnxruntime fuses).
* dynamic INT8 / INT4: scales from the tensor at run time. Per token: ``ReduceMax`` over the channel axis, then a
  *blocked* Q/DQ with ``block_size`` = channels (one block per token, any rank). Symmetric: ``s = amax / qmax``,
  codes int8/int4. Asymmetric (Brevitas ShiftedUint8DynamicActPerRowFloat): ``s = (hi - lo) / (2^b - 1)`` with
  ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, zero point ``round(-lo / s)`` as uint8/uint4 (computed by a
  ``QuantizeLinear`` with scale 1: round half to even, saturating). Brevitas keeps the zero point as a float and
  uses ``hi = max x``; ONNX needs an integer zero point, and ``max(max x, 0)`` keeps 0 on the grid when a token is
  all negative. Per token the codes are *signed* (int8/int4, zero point ``round(-lo / s) - 2^(b-1)`` from a
  ``QuantizeLinear`` with scale 1 and zero point ``-2^(b-1)``, saturating exactly as the unsigned form would): the
  same numbers, but onnxruntime fuses a per-token *uint8* DQ with int8 weights into MatMulIntegerToFloat, which then
  refuses the per-token scale at run time; it leaves int8 activations alone. Per tensor: the same with a scalar
  scale, unsigned (that fusion is right for a scalar scale, and faster).
* MXFP4 / MXFP8 (dynamic, OCP MX): blocks of 32 along the channel axis (zero-padded to a multiple of 32, padding
  sliced off), ``X = 2^floor(log2 max(amax, 2^(emax - 127))) / 2^emax`` via ``Cast(to=FLOAT8E8M0,
  round_mode="down")`` (opset 24), the floor rule of qronos_algorithm.md §5.3, clamped so that X is an E8M0 value
  (>= 2^-127): the same X as formats/mx.py gives a weight block. MXFP8 elements: ``Q(FLOAT8E4M3FN, saturate=1)``.
  MXFP4 elements: onnxruntime has no FLOAT4E2M1 QuantizeLinear, so e2m1 rounding (nearest, ties to even mantissa,
  saturating at 6) is spelled with standard ops (step 0.5 / 1 / 2 below 2 / 4 / 6, ``Round`` is half-to-even) and
  multiplied back by X: the graph carries the dequantized value (an INT8 ``Q -> DQ`` of the codes 2 * e2m1 would
  change nothing but turn NaN into a code).
  NaN / Inf (onnxruntime CPU, tested): ``ReduceMax`` skips NaN, so a NaN element leaves its block's scale alone and
  comes out NaN; +-Inf saturates the E8M0 cast to 2^127, so the Inf element becomes +-6 * X (MXFP4) or
  +-448 * X (MXFP8) with X = 2^127 / 2^emax, and the finite elements of that block round to 0. Integer quantizers
  follow QuantizeLinear, which leaves NaN undefined (onnxruntime writes code 0); static grids saturate +-Inf, and a
  dynamic token holding +-Inf gets an infinite scale and comes out all NaN. FP8 keeps NaN. (Weights refuse NaN/Inf.)

float16 inputs: static Q/DQ run in float16 (the scale is stored exactly as float16); dynamic and MX subgraphs are
computed in float32 between two Casts.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..errors import ExportError
from ..graph.model import graph_names
from ..formats.elements import E2M1, E4M3, MX_BLOCK
from .qdq import CONTAINERS, container_for

EPS = 2.0**-100  # smallest amax / range a dynamic scale is built from (an all-zero token quantizes to 0)
_INT64_MAX = np.iinfo(np.int64).max
_MX_ELEMENTS = {"mxfp4": E2M1, "mxfp8": E4M3}
SIGNED_PER_TOKEN = True  # False writes the unsigned per-token form onnxruntime cannot run (tests of the refusal)


@dataclass(frozen=True)
class ActQuantizer:
    """One activation quantizer: enough to build its subgraph. ``channel_axis`` -1 (MatMul / Gemm: features last)
    or 1 (Conv: NCHW); ``channels`` its size (the per-token block). ``scale`` / ``zero_point``: static only,
    ``scale`` exact in ``dtype``."""

    format: str  # int | mxfp4 | mxfp8 | fp8
    bits: int
    granularity: str  # per_tensor | per_token | per_block
    dynamic: bool
    symmetric: bool
    channel_axis: int = -1
    channels: int = 0
    dtype: str = "float32"  # the activation's numpy dtype name: float32 | float16
    scale: float | None = None
    zero_point: int = 0
    clip_ratio: float = 1.0  # dynamic INT: the run-time range times this before the scale is taken

    def __post_init__(self) -> None:
        if self.format not in ("int", "mxfp4", "mxfp8", "fp8"):
            raise ExportError(f"unknown activation format {self.format!r}")
        if self.dtype not in ("float32", "float16"):
            raise ExportError(f"activation quantizers take float32 or float16 inputs, got {self.dtype}")
        if not self.dynamic and (self.scale is None or not math.isfinite(self.scale) or self.scale <= 0):
            raise ExportError(f"static activation quantizer needs a finite scale > 0, got {self.scale!r}")
        if (self.granularity in ("per_token", "per_block")) and self.channels < 1:
            raise ExportError("per-token and MX activation quantizers need the channel count")

    @property
    def opset(self) -> int:
        """Lowest opset expressing the subgraph: E8M0 Cast 24, blocked / 4-bit / output_dtype 21, fp8 or float16
        Q/DQ 19, int8 Q/DQ 13."""
        if self.format in _MX_ELEMENTS:
            return 24
        if self.dynamic or self.bits == 4:
            return 21
        if self.format == "fp8" or self.dtype == "float16":
            return 19
        return 13

    def describe(self) -> str:
        if self.format == "int":
            kind = "dynamic" if self.dynamic else "static"
            clip = f" clip {self.clip_ratio:g}" if self.dynamic and self.clip_ratio != 1.0 else ""
            return f"int{self.bits} {self.granularity} {kind} {'sym' if self.symmetric else 'asym'}{clip}"
        if self.format == "fp8":
            return "fp8 e4m3fn per_tensor static"
        return f"{self.format} blocks of {MX_BLOCK} dynamic"


# ------------------------------------------------------------------------------------------------ graph building

class _Emitter:
    """Appends nodes and small constant initializers of one quantizer subgraph, with names unique in the graph."""

    def __init__(self, graph: ir.Graph, taken: set[str], prefix: str):
        self.graph, self.taken, self.prefix = graph, taken, prefix
        self.nodes: list[ir.Node] = []

    def name(self, tag: str) -> str:
        base, k = f"{self.prefix}/{tag}", 0
        name = base
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def const(self, tag: str, arr: np.ndarray) -> ir.Value:
        arr = np.asarray(arr)
        name = self.name(tag)
        tensor = ir.Tensor(arr, name=name)
        value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value], tag: str | None = None, **attrs) -> ir.Value:
        tag = tag or op_type
        node = ir.node(op_type, list(inputs), attributes=attrs or None, name=self.name(tag))
        node.outputs[0].name = self.name(tag + "_out")
        self.nodes.append(node)
        return node.outputs[0]


def _static(e: _Emitter, x: ir.Value, q: ActQuantizer) -> ir.Value:
    dt = np.dtype(q.dtype)
    scale = e.const("scale", np.array(q.scale, dt))
    if q.format == "fp8":
        zp = e.const("zero_point", np.array(0, ml_dtypes.float8_e4m3fn))
        xq = e.op("QuantizeLinear", [x, scale, zp], "quantize", saturate=1)
    else:
        np_dtype = CONTAINERS[container_for(q.bits, q.symmetric)][1]
        zp = e.const("zero_point", np.array(q.zero_point, np.int16).astype(np_dtype))
        xq = e.op("QuantizeLinear", [x, scale, zp], "quantize")
    return e.op("DequantizeLinear", [xq, scale, zp], "dequantize")


def _dynamic_int(e: _Emitter, x: ir.Value, q: ActQuantizer) -> ir.Value:
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    if q.granularity == "per_token":
        axes = [e.const("axes", np.array([q.channel_axis], np.int64))]
        keep, blocked = 1, {"axis": q.channel_axis, "block_size": q.channels}
    else:
        axes, keep, blocked = [], 0, {}
    eps = e.const("eps", f32(EPS))
    ratio = e.const("clip_ratio", f32(q.clip_ratio)) if q.clip_ratio != 1.0 else None

    def clip(v: ir.Value, tag: str) -> ir.Value:  # the run-time range times clip_ratio (no node when 1)
        return v if ratio is None else e.op("Mul", [v, ratio], tag)

    if q.symmetric:
        qmax = 2 ** (q.bits - 1) - 1
        amax = clip(e.op("ReduceMax", [e.op("Abs", [x], "abs"), *axes], "amax", keepdims=keep), "amax_clipped")
        s = e.op("Div", [e.op("Max", [amax, eps], "amax_eps"), e.const("qmax", f32(qmax))], "scale")
        code_type = ir.DataType.INT8 if q.bits == 8 else ir.DataType.INT4
        xq = e.op("QuantizeLinear", [x, s], "quantize", output_dtype=int(code_type), **blocked)
        return e.op("DequantizeLinear", [xq, s], "dequantize", **blocked)
    levels = 2**q.bits - 1
    zero = e.const("zero", f32(0.0))
    hi = clip(e.op("Max", [e.op("ReduceMax", [x, *axes], "max", keepdims=keep), zero], "hi"), "hi_clipped")
    lo = clip(e.op("Min", [e.op("ReduceMin", [x, *axes], "min", keepdims=keep), zero], "lo"), "lo_clipped")
    rng = e.op("Max", [e.op("Sub", [hi, lo], "range"), eps], "range_eps")
    s = e.op("Div", [rng, e.const("levels", f32(levels))], "scale")
    zf = e.op("Div", [e.op("Neg", [lo], "neg_lo"), s], "zero_point_float")
    one = e.const("one", f32(1.0))
    if q.granularity == "per_token" and SIGNED_PER_TOKEN:  # signed codes, zero point shifted: the same numbers
        shift = np.array(-(2 ** (q.bits - 1)), np.int8)
        shift = e.const("zero_point_shift", shift if q.bits == 8 else shift.astype(ml_dtypes.int4))
        zp = e.op("QuantizeLinear", [zf, one, shift], "zero_point")
    else:
        zp_type = ir.DataType.UINT8 if q.bits == 8 else ir.DataType.UINT4
        zp = e.op("QuantizeLinear", [zf, one], "zero_point", output_dtype=int(zp_type))
    xq = e.op("QuantizeLinear", [x, s, zp], "quantize", **blocked)
    return e.op("DequantizeLinear", [xq, s, zp], "dequantize", **blocked)


def _mx(e: _Emitter, x: ir.Value, q: ActQuantizer) -> ir.Value:
    el = _MX_ELEMENTS[q.format]
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    ax, C = q.channel_axis, q.channels
    n_blocks = -(-C // MX_BLOCK)
    pad = n_blocks * MX_BLOCK - C
    xp = x
    if pad:
        xp = e.op("Pad", [x, e.const("pads", i64([0, pad])), e.const("pad_value", f32(0.0)),
                          e.const("pad_axes", i64([ax]))], "pad")
    shape = e.op("Shape", [xp], "shape")
    head = e.op("Slice", [shape, e.const("head_start", i64([0])), e.const("head_end", i64([ax]))], "head")
    parts = [head, e.const("block_dims", i64([-1, MX_BLOCK]))]
    if ax != -1:
        parts.append(e.op("Slice", [shape, e.const("tail_start", i64([ax + 1])),
                                    e.const("tail_end", i64([_INT64_MAX]))], "tail"))
    xb = e.op("Reshape", [xp, e.op("Concat", parts, "block_shape", axis=0)], "blocks")
    bax = -1 if ax == -1 else ax + 1  # the axis of the 32 elements in the blocked view
    amax = e.op("ReduceMax", [e.op("Abs", [xb], "abs"), e.const("block_axis", i64([bax]))], "amax", keepdims=1)
    t = e.op("Max", [amax, e.const("amax_min", f32(2.0 ** (el.emax - 127)))], "amax_clamped")
    e8 = e.op("Cast", [t], "e8m0", to=int(ir.DataType.FLOAT8E8M0), round_mode="down")
    p2 = e.op("Cast", [e8], "pow2", to=int(ir.DataType.FLOAT))
    X = e.op("Mul", [p2, e.const("inv_emax", f32(2.0 ** -el.emax))], "shared_scale")
    blocked = {"axis": bax, "block_size": MX_BLOCK}
    if q.format == "mxfp8":
        qb = e.op("QuantizeLinear", [xb, X], "quantize", output_dtype=int(ir.DataType.FLOAT8E4M3FN), saturate=1,
                  **blocked)
        yb = e.op("DequantizeLinear", [qb, X], "dequantize", **blocked)
    else:  # e2m1: nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even mantissa, saturating
        y = e.op("Div", [xb, X], "elements")
        c = e.op("Min", [e.op("Abs", [y], "abs_elements"), e.const("max_value", f32(el.max_value))], "saturated")
        step = e.op("Where", [e.op("Less", [c, e.const("two", f32(2.0))], "below_2"), e.const("half", f32(0.5)),
                              e.op("Where", [e.op("Less", [c, e.const("four", f32(4.0))], "below_4"),
                                             e.const("one", f32(1.0)), e.const("two_step", f32(2.0))], "step_hi")],
                     "step")
        mag = e.op("Mul", [e.op("Round", [e.op("Div", [c, step], "steps")], "round"), step], "magnitude")
        yb = e.op("Mul", [e.op("Mul", [e.op("Sign", [y], "sign"), mag], "e2m1"), X], "dequantize")
    y = e.op("Reshape", [yb, shape], "unblocked")
    if pad:
        y = e.op("Slice", [y, e.const("crop_start", i64([0])), e.const("crop_end", i64([C])),
                           e.const("crop_axes", i64([ax]))], "crop")
    return y


def build_quantizer(graph: ir.Graph, x: ir.Value, q: ActQuantizer, taken: set[str],
                    prefix: str | None = None) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing the fake-quantized ``x`` (not yet inserted; constants are registered on ``graph``)."""
    e = _Emitter(graph, taken, prefix or f"{x.name}_aq")
    xin = x
    cast = q.dtype == "float16" and (q.dynamic or q.format in _MX_ELEMENTS)
    if cast:
        xin = e.op("Cast", [x], "to_float", to=int(ir.DataType.FLOAT))
    if not q.dynamic:
        y = _static(e, xin, q)
    elif q.format == "int":
        y = _dynamic_int(e, xin, q)
    else:
        y = _mx(e, xin, q)
    if cast:
        y = e.op("Cast", [y], "to_float16", to=int(ir.DataType.FLOAT16))
    y.dtype = ir.DataType.from_numpy(np.dtype(q.dtype))
    if x.shape is not None:
        y.shape = x.shape
    return e.nodes, y


def insert_activation_quantizers(graph: ir.Graph, quantizers: Mapping[str, ActQuantizer]) -> list[ir.Value]:
    """Make input 0 of every node of ``graph`` named in ``quantizers`` read its quantized value (in place).

    Nodes reading the same value with the same quantizer (q/k/v) share one subgraph, inserted before the first of
    them. Returns the quantized values, one per subgraph.
    """
    groups: dict[tuple[int, ActQuantizer], tuple[ir.Value, list[ir.Node]]] = {}
    for node in graph:
        q = quantizers.get(node.name)
        if q is None:
            continue
        x = node.inputs[0]
        if x is None:
            raise ExportError(f"node {node.name!r} has no activation input to quantize")
        groups.setdefault((id(x), q), (x, []))[1].append(node)
    taken = graph_names(graph)
    outs = []
    for (_, q), (x, nodes) in groups.items():
        new_nodes, y = build_quantizer(graph, x, q, taken)
        graph.insert_before(nodes[0], new_nodes)
        for node in nodes:
            node.replace_input_with(0, y)
        outs.append(y)
    return outs


# ------------------------------------------------------------------------------------------------ running it

def quantizer_model(q: ActQuantizer, rank: int, opset: int) -> ir.Model:
    """A model ``x -> quantizer -> y`` for ``x`` of the given rank (every dimension dynamic)."""
    dtype = ir.DataType.from_numpy(np.dtype(q.dtype))
    x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape([None] * rank))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": max(opset, q.opset)}, name="activation_quantizer")
    nodes, y = build_quantizer(graph, x, q, {"x"}, prefix="aq")
    graph.extend(nodes)
    graph.outputs.append(y)
    from .qdq import ir_version_for_opset

    return ir.Model(graph, ir_version=ir_version_for_opset(max(opset, q.opset)), producer_name="qronos-onnx")


@functools.lru_cache(maxsize=64)
def _session(q: ActQuantizer, rank: int, opset: int, providers: tuple[str, ...]) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as the capture segments run
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    proto = ir.serde.serialize_model(quantizer_model(q, rank, opset))
    return ort.InferenceSession(proto.SerializeToString(), so, providers=list(providers))


def run_quantizer(q: ActQuantizer, x: np.ndarray, opset: int = 0,
                  providers: Sequence[str] = ("CPUExecutionProvider",)) -> np.ndarray:
    """Fake-quantize ``x`` with onnxruntime running exactly the subgraph the export writes."""
    x = np.asarray(x)
    if x.dtype != np.dtype(q.dtype):
        raise ExportError(f"activation quantizer for {q.dtype} inputs got a {x.dtype} array")
    return _session(q, x.ndim, opset, tuple(providers)).run(None, {"x": x})[0]


class ActQuantRunner:
    """``act_quant(target, x)`` for CaptureEngine: each target's quantizer run by :func:`run_quantizer` (CPU)."""

    def __init__(self, quantizers: Mapping[str, ActQuantizer], opset: int = 0):
        self.quantizers, self.opset = dict(quantizers), opset

    def __call__(self, target, x: np.ndarray) -> np.ndarray:
        q = self.quantizers.get(target.name)
        return np.asarray(x) if q is None else run_quantizer(q, x, self.opset)
