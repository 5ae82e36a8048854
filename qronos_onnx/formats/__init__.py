from __future__ import annotations

import torch

from ..config import WeightQuantConfig
from ..errors import ModelError
from .elements import ElementGrid
from .fp8 import make_fp8_grid
from .grid import IntGrid, int_range, make_int_grid
from .mx import make_mx_grid
from .quantized_weight import QuantizedWeight

__all__ = ["ElementGrid", "IntGrid", "QuantizedWeight", "int_range", "make_grid", "make_int_grid"]


def make_grid(W: torch.Tensor, cfg: WeightQuantConfig, scale_dtype: torch.dtype = torch.float32,
              force_per_channel: bool = False, *, name: str | None = None) -> IntGrid | ElementGrid:
    """The frozen grid of ``cfg.format`` for ``W`` [..., rows, cols]; refuses non-finite weights (naming ``name``).

    ``force_per_channel`` (Conv weights): int and MX grids get one scale per row (FP8 is per row anyway).
    """
    # one summing pass first: a NaN or Inf anywhere makes the sum non-finite (so can overflow: then look closer)
    if not bool(torch.isfinite(W.sum())) and bool((bad := ~torch.isfinite(W)).any()):
        n_nan = int(torch.isnan(W).sum())
        raise ModelError(f"weight {name or '<unnamed>'!r} has {n_nan} NaN and {int(bad.sum()) - n_nan} Inf value(s) "
                         f"out of {W.numel()}; the model is broken, fix or exclude that node")
    fmt = cfg.format
    if fmt == "int":
        return make_int_grid(W, cfg, scale_dtype, force_per_channel=force_per_channel)
    if fmt in ("mxfp4", "mxfp8", "mxint8"):
        return make_mx_grid(W, cfg, scale_dtype, force_per_channel=force_per_channel)
    if fmt == "fp8":
        return make_fp8_grid(W, cfg, scale_dtype)
    raise ValueError(f"unknown weight format {fmt!r}")
