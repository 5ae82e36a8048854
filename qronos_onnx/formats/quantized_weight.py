"""QuantizedWeight: the single source of truth between the solver, the quant stream and every export dialect."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grid import IntGrid, _group_parts, _replace


def _as_dtype(grid: IntGrid, dtype: torch.dtype) -> IntGrid:
    """The grid with its scale in ``dtype`` and its zero point as int32 (dequantize's operands)."""
    return _replace(grid, scale=grid.scale.to(dtype), zero_point=grid.zero_point.to(torch.int32))


def compact_codes(codes: torch.Tensor, grid) -> torch.Tensor:
    """Integer grid codes in one byte each when every code fits (int8 for signed grids, uint8 for unsigned ones),
    int16 otherwise: every quantized weight of a run is held until the export, and a byte per weight instead of two
    halves that. Codes outside the grid's type keep int16 so that the export can still name them."""
    dtype = torch.int16
    if isinstance(grid, IntGrid) and codes.numel():
        for cand, lo, hi in ((torch.int8, -128, 127), (torch.uint8, 0, 255)):
            if lo <= grid.qmin and grid.qmax <= hi:
                cmin, cmax = torch.aminmax(codes)
                if lo <= int(cmin) and int(cmax) <= hi:
                    dtype = cand
                break
    return codes.to(dtype)


@dataclass
class QuantizedWeight:
    """Integer codes on a frozen grid, in solver layout ``[rows, cols]`` (rows = output channels).

    ``dequantize()`` is exactly what the quant stream computes with and what the exported DequantizeLinear
    reproduces; export packs ``codes``, ``grid.scale`` and ``grid.zero_point`` and never re-derives them.
    """

    codes: torch.Tensor  # [rows, cols] in [grid.qmin, grid.qmax]: int8 / uint8 when they fit, else int16
    grid: IntGrid  # per-row scales and zero points, [rows, n_groups]; or an ElementGrid (MX / FP8 formats)
    info: dict = field(default_factory=dict)  # algorithm, damping, retries, errors: for the report

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"QuantizedWeight codes must be 2-D [rows, cols], got shape {tuple(self.codes.shape)}")
        self.codes = compact_codes(self.codes, self.grid)

    def __getattr__(self, name: str):
        # codes moved to disk by formats/spill.py: read them back (only called when ``codes`` is not an attribute)
        if name == "codes" and "_codes_file" in self.__dict__:
            from .spill import load_codes

            return load_codes(self.__dict__["_codes_file"])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def format(self) -> str:
        """'int', or the ElementGrid's format: 'mxfp4', 'mxfp8', 'mxint8', 'fp8'."""
        return getattr(self.grid, "format", "int")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(codes - zero_point) * scale`` in the scale's dtype (float32, or float16 for fp16 models).

        Element grids (MX / FP8): exactly ``grid.decode(codes)`` (an exact float32 product), cast to ``dtype``.
        """
        dtype = dtype or self.grid.scale_dtype
        if not isinstance(self.grid, IntGrid):
            return self.grid.decode(self.codes).to(dtype)
        # one scale per group, broadcast instead of gathered into full-size copies: the same int32 differences and
        # products as (codes - zero[:, gi]).to(dtype) * scale[:, gi], so the same bits
        grid = _as_dtype(self.grid, dtype)
        codes = self.codes.to(torch.int32)
        out = torch.empty(codes.shape, dtype=dtype)
        for c, o, s, z in _group_parts(codes, out, grid):
            o.copy_(c - z)
            o.mul_(s)
        return out
