"""Checks on the input before any work: everything that would refuse the output later refuses the run now.

A run that capture, rounding and export would spend minutes on must not end with "the checker rejects the file":
the input's checker status, whether onnxruntime can load it (its operators, contrib ops included), and whether the
output folder has room are known before capture starts. Graphs the ONNX checker rejects but onnxruntime runs (the
contrib ops onnxruntime-genai writes, such as SimplifiedLayerNormalization in the default domain) are accepted, and
their output is then validated by an onnxruntime load instead of the checker.
"""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..errors import ExportError, ModelError
from .targets import Target

log = logging.getLogger(__name__)

# operators that mean "this graph is already quantized" (weights or activations)
QUANTIZED_OPS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv",
                 "MatMulInteger", "ConvInteger", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QGemm", "QAttention", "QOrderedMatMul", "MatMulBnb4", "MatMulFpQ4"}


@dataclass
class Preflight:
    """What the input checks found; ``checker_ok`` False means the output is validated by onnxruntime alone."""

    checker_ok: bool
    checker_message: str  # "" when the checker passes
    ort_ok: bool


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_input_model(path: str | Path) -> Preflight:
    """onnx.checker and an onnxruntime load of the input, with one line saying what is wrong if it cannot run."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        checker_ok, message = True, ""
    except Exception as err:
        checker_ok, message = False, _first_line(err)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a load check, not a compile
    # no pre-packed copies of the weights: onnxruntime maps external data and, unpacked, never reads it here
    # (measured on a 1.6 GB fp32 model: 1.3 GB resident after the load with pre-packing, 57 MB without)
    so.add_session_config_entry("session.disable_prepacking", "1")
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as err:
        why = _first_line(err)
        if "NOT_IMPLEMENTED" in why or "Could not find an implementation" in why or "No Op registered" in why:
            hint = "it uses an operator onnxruntime's CPU provider does not implement"
        else:
            hint = "capture runs the model in onnxruntime"
        extra = f"; onnx.checker also rejects it ({message})" if not checker_ok else ""
        raise ModelError(f"onnxruntime cannot load the input model {str(path)!r} ({hint}): {why}{extra}") from None
    if not checker_ok:
        log.warning("note: onnx.checker rejects %s (%s) but onnxruntime runs it; the output will be validated by an "
                    "onnxruntime load instead of the checker", path, message)
    return Preflight(checker_ok=checker_ok, checker_message=message, ort_ok=True)


def quantized_ops(model: ir.Model) -> Counter:
    """op_type -> count of the quantization operators anywhere in the model (subgraphs included)."""
    return Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type in QUANTIZED_OPS)


def describe_ops(counts: Counter) -> str:
    return ", ".join(f"{n} {op}" for op, n in counts.most_common())


def estimate_output_bytes(model: ir.Model, targets: list[Target], bits: float) -> int:
    """Upper estimate of the quantized file: non-target tensors as they are, target weights at ``bits`` plus 25 % for
    scales and zero points (group size 32 with fp16 scales is about 0.5 bit per weight), plus 1 MiB of graph."""
    weights = {t.weight_name for t in targets}
    total = 2**20
    for g in model.graphs():
        for name, v in g.initializers.items():
            t = v.const_value
            if t is None:
                continue
            if name in weights:
                total += int(np.prod(t.shape, dtype=np.int64)) * bits / 8 * 1.25
            else:
                total += int(t.nbytes)
    return int(total)


def check_free_space(out: Path, needed: int) -> None:
    """Refuse the run when the output folder cannot hold the output (staged beside it before it replaces anything)."""
    folder = out.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise ExportError(f"not enough free space for {str(out)!r}: the output needs about {needed / 1e6:.0f} MB, "
                          f"{str(folder)!r} has {free / 1e6:.0f} MB free")
