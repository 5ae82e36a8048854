"""OCP MX v1.0 weight grids (MXFP4, MXFP8, MXINT8): blocks of 32 along the input dimension, one E8M0 scale each.

Scale rule (OCP MX §6.3, the Brevitas rule of qronos_algorithm.md §5.3): X = 2^(floor(log2 amax) - emax_elem) per
block, emax_elem = 2 (E2M1), 8 (E4M3), 0 (INT8 with its implicit 2^-6); elements above the largest magnitude saturate.
``scale_method="mse"`` also tries the neighbouring exponents (one smaller, one larger) and keeps, per block, the
one with the least squared error (ties keep the OCP exponent).

Edge choices: an all-zero block gets the smallest exponent allowed (E8M0 byte 0x00 = 2^-127 for float32 MXFP4 /
MXFP8 scales; 2^-121 for MXINT8, whose canonical scale X * 2^-6 must stay in E8M0),
so every element decodes to exactly 0 (as in the microxcaling reference); exponents are clamped to the E8M0 range and
to what the scale dtype can hold exactly (float16 models: every decoded value must stay a finite, exact float16).
"""
from __future__ import annotations

import math

import torch

from ..config import WeightQuantConfig
from .elements import E8M0_MAX_EXP, E8M0_MIN_EXP, FORMAT_ELEMENTS, MX_BLOCK, ElementGrid, ElementType, _floor_log2

_MIN_SUBNORMAL_LOG2 = {torch.float32: -149, torch.float16: -24}


def exponent_range(element: ElementType, scale_dtype: torch.dtype) -> tuple[int, int]:
    """Allowed shared exponents e (X = 2^e): X and the canonical DQ's scale inside E8M0, every decoded value exact
    and finite in ``scale_dtype``."""
    if scale_dtype not in _MIN_SUBNORMAL_LOG2:
        raise ValueError(f"MX scales must be float32 or float16, got {scale_dtype}")
    fold = element.e8m0_shift - element.shift  # canonical E8M0 exponent = e + fold (-6 for MXINT8)
    lo = max(E8M0_MIN_EXP, E8M0_MIN_EXP - fold, _MIN_SUBNORMAL_LOG2[scale_dtype] - element.min_log2)
    hi = min(E8M0_MAX_EXP, E8M0_MAX_EXP - fold,
             math.floor(math.log2(torch.finfo(scale_dtype).max / element.max_value)))
    return lo, hi


def _blocks(w: torch.Tensor, group: int) -> torch.Tensor:
    """[..., rows, cols] -> [..., rows, n_groups, group], the ragged last block padded with zeros (|0| adds nothing)."""
    cols = w.shape[-1]
    n_groups = -(-cols // group)
    pad = n_groups * group - cols
    if pad:
        w = torch.cat([w, w.new_zeros(*w.shape[:-1], pad)], dim=-1)
    return w.reshape(*w.shape[:-1], n_groups, group)


def _block_err(wb: torch.Tensor, el: ElementType, e: torch.Tensor) -> torch.Tensor:
    """Squared error of each block [..., rows, G] rounded with shared exponent ``e``."""
    s = _scale_of(e, el).unsqueeze(-1)
    q = el.values(el.encode(wb / s)) * s
    return (q - wb).pow(2).sum(-1)


def _scale_of(e: torch.Tensor, element: ElementType) -> torch.Tensor:
    """Grid scale 2^(e - shift) as float32, built from float64 exponent bits (exact; may be a float32 subnormal)."""
    return (((e - element.shift).to(torch.int64) + 1023) << 52).view(torch.float64).to(torch.float32)


def make_mx_grid(w: torch.Tensor, cfg: WeightQuantConfig, scale_dtype: torch.dtype = torch.float32,
                 force_per_channel: bool = False) -> ElementGrid:
    """MX grid for ``w`` [..., rows, cols]. ``force_per_channel`` (Conv weights, whose im2col columns DQ cannot
    block) gives one power-of-two scale per row with the same element type: not OCP blocks, but the same rule."""
    element = FORMAT_ELEMENTS[cfg.format]
    w = w.float()
    cols = w.shape[-1]
    group = cols if force_per_channel else MX_BLOCK
    wb = _blocks(w, group)  # [..., rows, G, g]
    amax = wb.abs().amax(-1) * float(cfg.minmax_scale)
    lo, hi = exponent_range(element, scale_dtype)
    e0 = torch.where(amax > 0, _floor_log2(amax) - element.emax, torch.full_like(amax, lo, dtype=torch.int32))
    e = e0.clamp(lo, hi)
    if cfg.scale_method == "mse":
        best = _block_err(wb, element, e)
        for d in (-1, 1):
            cand = (e0 + d).clamp(lo, hi)
            err = _block_err(wb, element, cand)
            better = err < best
            best = torch.where(better, err, best)
            e = torch.where(better, cand, e)
    scale = _scale_of(e, element)
    return ElementGrid(scale=scale, zero_point=torch.zeros_like(scale), format=cfg.format, group_size=group,
                       cols=cols, scale_dtype=scale_dtype)
