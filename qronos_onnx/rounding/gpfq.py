"""GPFQ, greedy path following (qronos_algorithm.md §3.3), in Brevitas' lower-triangular form (PR #1172).

Rule: q_t = Q(<x~_t, sum_{j<=t} w_j x_j - sum_{j<t} q_j x~_j> / ||x~_t||^2): a correction step with no diffusion.
With G[i, j] = <x~_i, x_j> (paper orientation) and D = diag(H) this is

    y_t = s_t v_t + (sum_{j<t} w0_j G[t, j] - sum_{j<t} q_j H[t, j]) / H_tt,   s_t = G_tt / H_tt,

where the current column comes from V and the history from W0 (§2.4). The W0 part is one matrix product; the q
history is the shared lazy-block loop with d_t = q_t and P[t, j] = H[j, t] / H_jj (j > t). No damping, no
Cholesky.
"""
from __future__ import annotations

import torch

from . import core


def solve(prep: core.Prepared, block: int) -> core.SolveOutput:
    if prep.G is None:
        raise ValueError("GPFQ needs G")
    H, G = prep.H, prep.G
    d = torch.diagonal(H, dim1=-2, dim2=-1)
    dinv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    s = torch.diagonal(G, dim1=-2, dim2=-1) * dinv
    Y = s[:, None, :] * prep.V + (prep.W0 @ torch.tril(G, -1).mT) * dinv[:, None, :]
    P = torch.triu(H.mT, 1) * dinv[:, None, :]
    codes = core.lazy_round(Y, P, prep.grid, start=0, block=block, err_scale=None)
    B = H.shape[0]
    zeros = torch.zeros(B, dtype=H.dtype, device=H.device)
    return core.SolveOutput(codes=codes, lam=zeros, retries=torch.zeros(B, dtype=torch.int64), ok=prep.usable.clone(),
                            reasons=list(prep.reasons))
