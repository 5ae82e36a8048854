"""Capture: X (float model) and X~ (partially quantized model) of every target, folded into LayerStats."""
from .runner import CaptureEngine, KeptInputs, SegmentRunner, build_segment_model, default_providers
from .stats import LayerStats, StatsAccumulator

__all__ = ["CaptureEngine", "KeptInputs", "LayerStats", "SegmentRunner", "StatsAccumulator", "build_segment_model",
           "default_providers"]
