"""GPTQ/OPTQ (qronos_algorithm.md §3.1): RTN of each column plus the OBS update of the not-yet-quantized ones.

Solves the *matched* surrogate min ||X~(w - q)||^2 from H alone: factor U = chol_up((H + lam I)^-1), then the
shared lazy-block loop from column 0.
"""
from __future__ import annotations

import torch

from . import core

DEFAULT_PERCDAMP = 0.01  # lam = 0.01 * mean diag(H)


def damping(prep: core.Prepared, rel: float | None) -> torch.Tensor:
    """Absolute lam per batch element: rel (default 0.01) times the mean diagonal of H (dead entries filled)."""
    rel = DEFAULT_PERCDAMP if rel is None else float(rel)
    return rel * core.mean_diagonal(core.fill_dead_diagonal(prep.H, prep.dead))


def solve(prep: core.Prepared, lam: torch.Tensor, block: int) -> core.SolveOutput:
    Hf = core.fill_dead_diagonal(prep.H, prep.dead)  # Brevitas sets dead H_ii = 1; see fill_dead_diagonal
    fac = core.damped_inverse(Hf, lam)
    del Hf
    fac.M = None  # only U is needed; free N^2 memory early
    U = fac.U
    err_scale = 1.0 / torch.diagonal(U, dim1=-2, dim2=-1)
    codes = core.lazy_round(prep.V, U, prep.grid, start=0, block=block, err_scale=err_scale)
    reasons = [r if r else (None if good else f"Cholesky of H + lam I failed after {n} retries (last lam {l:.3g})")
               for r, good, n, l in zip(prep.reasons, fac.ok.tolist(), fac.retries.tolist(), fac.lam.tolist())]
    return core.SolveOutput(codes=codes, lam=fac.lam, retries=fac.retries, ok=fac.ok & prep.usable, reasons=reasons)
