"""Moved to ``qronos_onnx.transforms.online``; kept so that old imports keep working."""
from ..transforms.online import ROTATION_PREFIX, rotate_inputs, rotation_matrix  # noqa: F401
