"""Calibration data: .npz directories and files, ORT CalibrationDataReader-like objects, lists of feeds, and text files
cut into token windows, all validated against the model's graph inputs before any work starts."""
from .dataset import CalibrationSet, load_calibration
from .specs import InputSpec, check_sample, graph_input_specs
from .text import window_starts

__all__ = ["CalibrationSet", "InputSpec", "check_sample", "graph_input_specs", "load_calibration", "window_starts"]
