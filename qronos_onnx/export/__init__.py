"""Export dialects and self-validation of written files."""
from __future__ import annotations

import onnx_ir as ir

from ..errors import ExportError
from ..formats import QuantizedWeight
from ..graph.targets import Target
from .matmulnbits import decode_matmulnbits, export_matmulnbits
from .qdq import WeightEncoding, encode_weight, export_qdq, upgrade_opset
from .validate import ValidationReport, validate_export

__all__ = ["ValidationReport", "WeightEncoding", "decode_matmulnbits", "encode_weight", "export_matmulnbits",
           "export_model", "export_qdq", "upgrade_opset", "validate_export"]


def export_model(model: ir.Model, quantized: dict[str, QuantizedWeight], targets: list[Target], *,
                 dialect: str = "qdq", metadata: dict[str, str], accuracy_level: int = 0) -> ir.Model:
    """Write ``quantized`` into ``model`` (in place) in ``dialect``: "qdq" (onnxruntime-runnable DequantizeLinear),
    "mx" (canonical opset-24 MX for compilers) or "matmulnbits" (com.microsoft.MatMulNBits, QDQ for the rest)."""
    if dialect in ("qdq", "mx"):
        return export_qdq(model, quantized, targets, metadata=metadata, dialect=dialect)
    if dialect == "matmulnbits":
        return export_matmulnbits(model, quantized, targets, metadata=metadata, accuracy_level=accuracy_level)
    raise ExportError(f"unknown export dialect {dialect!r}; expected qdq, mx or matmulnbits")
