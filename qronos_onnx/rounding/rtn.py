"""Round to nearest on the frozen grid: the baseline, and the fallback when a factorization cannot be made."""
from __future__ import annotations

import torch

from ..formats.grid import IntGrid
from .core import rtn_codes


def solve(W: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Float codes [B, K, N] of RTN(W); H and G are not needed."""
    return rtn_codes(W.float(), grid)
