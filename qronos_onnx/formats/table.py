"""Embedding tables rounded to nearest: no activation feeds a Gather's table, so there is nothing to solve against.

A table ``[rows, hidden]`` is already in solver layout (one row per token vector, groups along the hidden axis), so
it becomes an ordinary :class:`QuantizedWeight` on an ordinary :class:`IntGrid`; the exporter and the golden check
treat it like any weight.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import EmbeddingConfig, WeightQuantConfig
from . import make_grid
from .quantized_weight import QuantizedWeight


ROWS_PER_BLOCK = 8192  # rows rounded at a time: the float32 working copies stay a few hundred MB for any vocab


def quantize_table(table: np.ndarray, cfg: EmbeddingConfig, name: str) -> QuantizedWeight:
    """Round-to-nearest codes of ``table`` on a min-max grid of ``cfg.bits`` with ``cfg.block`` weights per scale
    along the hidden axis (0: one per row); scales exact in the table's dtype (float16 tables get float16 scales).

    Every scale covers part of one row, so the table is rounded block of rows by block of rows (the same grid and
    codes as in one piece): a 128k-token vocabulary never has several float32 copies of the whole table alive."""
    if not cfg.enabled:
        raise ValueError("quantize_table needs embeddings.bits 8 or 4")
    scale_dtype = torch.float16 if np.dtype(table.dtype) == np.float16 else torch.float32
    wcfg = WeightQuantConfig(format="int", bits=int(cfg.bits), symmetric=cfg.symmetric, group_size=cfg.block)
    codes, scales, zeros, grid = [], [], [], None
    err2 = ref2 = 0.0
    for r0 in range(0, max(table.shape[0], 1), ROWS_PER_BLOCK):
        W = torch.from_numpy(np.array(table[r0 : r0 + ROWS_PER_BLOCK], dtype=np.float32, copy=True))
        grid = make_grid(W, wcfg, scale_dtype, name=name)
        part = QuantizedWeight(grid.codes(W), grid)
        err2 += float((part.dequantize(torch.float32) - W).double().square().sum())
        ref2 += float(W.double().square().sum())
        codes.append(part.codes)
        scales.append(grid.scale)
        zeros.append(grid.zero_point)
        del W, part
    grid = dataclasses.replace(grid, scale=torch.cat(scales), zero_point=torch.cat(zeros))
    qw = QuantizedWeight(torch.cat(codes), grid, info={"algorithm": "rtn"})
    # ||Q - W|| / ||W||: what the report shows for a table
    qw.info["rel_error"] = float(np.sqrt(err2) / max(np.sqrt(ref2), 1e-30))
    return qw
