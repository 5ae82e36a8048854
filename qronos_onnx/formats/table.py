"""Embedding tables rounded to nearest: no activation feeds a Gather's table, so there is nothing to solve against.

A table ``[rows, hidden]`` is already in solver layout (one row per token vector, groups along the hidden axis), so
it becomes an ordinary :class:`QuantizedWeight` on an ordinary :class:`IntGrid`; the exporter and the golden check
treat it like any weight.
"""
from __future__ import annotations

import numpy as np
import torch

from ..config import EmbeddingConfig, WeightQuantConfig
from . import make_grid
from .quantized_weight import QuantizedWeight


def quantize_table(table: np.ndarray, cfg: EmbeddingConfig, name: str) -> QuantizedWeight:
    """Round-to-nearest codes of ``table`` on a min-max grid of ``cfg.bits`` with ``cfg.block`` weights per scale
    along the hidden axis (0: one per row); scales exact in the table's dtype (float16 tables get float16 scales)."""
    if not cfg.enabled:
        raise ValueError("quantize_table needs embeddings.bits 8 or 4")
    W = torch.from_numpy(np.array(table, dtype=np.float32, copy=True))
    scale_dtype = torch.float16 if np.dtype(table.dtype) == np.float16 else torch.float32
    wcfg = WeightQuantConfig(format="int", bits=int(cfg.bits), symmetric=cfg.symmetric, group_size=cfg.block)
    grid = make_grid(W, wcfg, scale_dtype, name=name)
    codes = grid.codes(W)
    qw = QuantizedWeight(codes, grid, info={"algorithm": "rtn"})
    err = (qw.dequantize(torch.float32) - W).norm() / W.norm().clamp_min(1e-30)
    qw.info["rel_error"] = float(err)  # ||Q - W|| / ||W||: what the report shows for a table
    return qw
