"""FP8 (E4M3FN) weights with one float scale per output channel: the TensorRT / ORT FP8 weight form.

s = amax / 448 per row (made exact in the scale dtype); ``scale_method="mse"`` searches shrunk thresholds like the
integer grid does. Elements round to nearest e4m3fn (ties to even, saturating at 448): see formats/elements.py.
"""
from __future__ import annotations

import torch

from ..config import WeightQuantConfig
from .elements import E4M3, ElementGrid
from .grid import _MSE_GRID, _exact_in


def _row_err(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = E4M3.values(E4M3.encode(w / scale)) * scale
    return (q - w).pow(2).sum(-1, keepdim=True)


def make_fp8_grid(w: torch.Tensor, cfg: WeightQuantConfig, scale_dtype: torch.dtype = torch.float32) -> ElementGrid:
    """Per-channel FP8 grid for ``w`` [..., rows, cols]; an all-zero row gets scale 1."""
    w = w.float()
    amax = w.abs().amax(-1, keepdim=True) * float(cfg.minmax_scale)  # [..., rows, 1]
    scale = _exact_in(amax / E4M3.max_value, scale_dtype)
    if cfg.scale_method == "mse":
        best = _row_err(w, scale)
        for p in _MSE_GRID[1:]:
            s_p = _exact_in(amax * p / E4M3.max_value, scale_dtype)
            err = _row_err(w, s_p)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s_p, scale)
    return ElementGrid(scale=scale, zero_point=torch.zeros_like(scale), format="fp8", group_size=w.shape[-1],
                       cols=w.shape[-1], scale_dtype=scale_dtype)
