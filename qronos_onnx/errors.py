"""One exception family; every message is written for the person running the tool."""
from __future__ import annotations


class QronosError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 2


class ModelError(QronosError):
    """The ONNX model is missing, corrupt, or has nothing to quantize."""


class CalibrationError(QronosError):
    """Calibration data is missing, malformed, or does not match the model inputs."""


class ConfigError(QronosError):
    """A recipe, flag or option has a value the tool cannot use."""


class ExportError(QronosError):
    """The quantized model could not be written or failed validation."""


class SolverError(QronosError):
    """A rounding algorithm failed in a way that cannot be recovered from."""
