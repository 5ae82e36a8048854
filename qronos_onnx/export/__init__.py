"""Export dialects and self-validation of written files."""
from .qdq import WeightEncoding, encode_weight, export_qdq, upgrade_opset
from .validate import ValidationReport, validate_export

__all__ = ["ValidationReport", "WeightEncoding", "encode_weight", "export_qdq", "upgrade_opset", "validate_export"]
