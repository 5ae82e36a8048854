"""DequantizeLinear encodings of MX / FP8 weights (onnx_encodings.md §0, §8.4-8.5), in two forms.

* ``canonical=False`` (dialect "qdq", runs in onnxruntime):
  MXFP4 -> DQ(INT8 codes = 2 * e2m1, FLOAT scale 2^(e-1), axis=0, block_size=32), opset 21 (fuses into an 8-bit
  MatMulNBits); MXINT8 -> DQ(INT8, FLOAT 2^(e-6)); MXFP8 -> DQ(FLOAT8E4M3FN, FLOAT 2^e, blocked);
  FP8 -> DQ(FLOAT8E4M3FN [K, N], FLOAT scale [N], axis=1), opset 19.
* ``canonical=True`` (dialect "mx", for compilers; onnxruntime has no kernel for it):
  DQ(FLOAT4E2M1 | INT8 | FLOAT8E4M3FN, FLOAT8E8M0 scale [K/32, N], axis=0, block_size=32, output_dtype=FLOAT),
  opset 24; for MXINT8 the element's implicit 2^-6 is folded into the E8M0 scale (X * 2^-6). FP8 has no canonical
  MX form and is written as above.

Both forms are packed from the grid's codes and scales as they are (formats/elements.py documents the codes): the
ORT form writes them verbatim, the canonical form converts them exactly (code / 2 -> e2m1,
scale * 2^e8m0_shift -> E8M0).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from onnx import TensorProto

from ..errors import ExportError
from ..formats import QuantizedWeight
from ..formats.elements import E8M0_MAX_EXP, E8M0_MIN_EXP, ElementGrid, e4m3_bytes
from ..graph.targets import Target
from .qdq import _SCALE_NP, WeightEncoding

_OUT_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def _check(name: str, qw: QuantizedWeight, target: Target) -> None:
    grid: ElementGrid = qw.grid  # type: ignore[assignment]
    groups, rows, cols = target.matrix_shape
    if tuple(qw.codes.shape) != (groups * rows, cols):
        raise ExportError(f"quantized weight {name!r} has codes of shape {tuple(qw.codes.shape)}, but node "
                          f"{target.name!r} needs [{groups * rows}, {cols}] (out channels x input features)")
    if tuple(grid.scale.shape) != (groups * rows, grid.n_groups) or grid.cols != cols \
            or -(-cols // grid.group_size) != grid.n_groups:
        raise ExportError(f"quantized weight {name!r}: {grid.format} scale {tuple(grid.scale.shape)} (group size "
                          f"{grid.group_size}) does not match codes {tuple(qw.codes.shape)}")
    scale_np = _SCALE_NP.get(grid.scale_dtype)
    if scale_np is None:
        raise ExportError(f"quantized weight {name!r}: scale dtype {grid.scale_dtype} is not exportable; use float32 "
                          f"or float16")
    if np.dtype(target.weight_dtype) != np.dtype(scale_np):
        raise ExportError(f"quantized weight {name!r}: scales are {np.dtype(scale_np).name} but the weight is "
                          f"{np.dtype(target.weight_dtype).name}; they must match")
    lo, hi = int(qw.codes.min()), int(qw.codes.max())
    if lo < grid.qmin or hi > grid.qmax:
        raise ExportError(f"quantized weight {name!r}: codes span [{lo}, {hi}], outside the {grid.format} code range "
                          f"[{grid.qmin}, {grid.qmax}]")
    scale = grid.scale.detach().cpu().float()
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ExportError(f"quantized weight {name!r}: scales must be finite and > 0")
    if not torch.equal(scale.to(grid.scale_dtype).float(), scale):
        raise ExportError(f"quantized weight {name!r}: scales are not exact in {grid.scale_dtype}")
    if grid.is_mx:
        mant, ex = torch.frexp(scale)
        e, e_dq = ex - 1 + grid.scale_shift, ex - 1 + grid.e8m0_shift  # OCP exponent, canonical DQ's E8M0 exponent
        if not bool((mant == 0.5).all()) or min(int(e.min()), int(e_dq.min())) < E8M0_MIN_EXP \
                or max(int(e.max()), int(e_dq.max())) > E8M0_MAX_EXP:
            raise ExportError(f"quantized weight {name!r}: {grid.format} scales must be powers of two whose shared "
                              f"exponent and canonical scale lie in E8M0's [2^{E8M0_MIN_EXP}, 2^{E8M0_MAX_EXP}]")


def _elements(grid: ElementGrid, codes: np.ndarray, canonical: bool) -> tuple[np.ndarray, str]:
    """Codes (int, ONNX layout) -> the DQ input array and its container name."""
    if grid.format == "mxfp4" and canonical:
        return (codes.astype(np.float32) / 2).astype(ml_dtypes.float4_e2m1fn), "float4e2m1"
    if grid.linear:  # mxfp4 (ORT form), mxint8
        return codes.astype(np.int8), "int8"
    return e4m3_bytes(codes), "float8e4m3fn"


def encode_element_weight(name: str, qw: QuantizedWeight, target: Target, *, canonical: bool) -> WeightEncoding:
    """Pack one MX / FP8 QuantizedWeight for ``target``'s layout (``canonical``: the opset-24 E8M0 form)."""
    grid: ElementGrid = qw.grid  # type: ignore[assignment]
    _check(name, qw, target)
    canonical = canonical and grid.is_mx
    codes = qw.codes.detach().cpu().to(torch.int32)
    scale = grid.scale.detach().cpu().float()
    per_axis = not grid.is_mx  # FP8: one scale per channel; MX: always blocked along K (block 32, or K if forced)
    transpose_gemm = target.op_type == "Gemm" and target.trans_b
    if target.op_type == "Conv":
        if grid.n_groups != 1:
            raise ExportError(f"Conv weight {name!r} (node {target.name!r}) has a blocked {grid.format} grid; Conv "
                              f"weights are exported with one scale per output channel only")
        onnx_codes = codes.reshape(target.weight_shape)
        s, axis, block = scale[:, 0], 0, 0
    else:
        onnx_codes = target.from_matrix(codes)
        if transpose_gemm:
            onnx_codes = onnx_codes.t()
        if per_axis:
            s, axis, block = scale[:, 0], 1, 0
        else:
            s, axis, block = scale.t(), 0, grid.group_size  # [ceil(K/32), N]
    elems, container = _elements(grid, np.ascontiguousarray(onnx_codes.numpy()), canonical)
    s = s.contiguous()
    if canonical:
        x = (s.double() * 2.0 ** grid.e8m0_shift).numpy()  # exact: X for MXFP4 / MXFP8, X * 2^-6 for MXINT8
        scale_arr = np.ascontiguousarray(x.astype(np.float32).astype(ml_dtypes.float8_e8m0fnu))
        if not np.array_equal(scale_arr.astype(np.float64), x):
            raise ExportError(f"quantized weight {name!r}: scale does not convert exactly to E8M0")
        out_dtype, min_opset = _OUT_DTYPE[grid.scale_dtype], 24
    else:
        scale_arr = np.ascontiguousarray(s.to(grid.scale_dtype).numpy())
        out_dtype, min_opset = 0, (19 if container.startswith("float8") else 13)
    return WeightEncoding(name, np.ascontiguousarray(elems), scale_arr, None, axis, block, container, grid.bits,
                          transpose_gemm, output_dtype=out_dtype, min_opset=min_opset)
