"""Rounding solvers: RTN, GPTQ, GPFQ and Qronos on a frozen integer grid (qronos_algorithm.md §2-§3).

One entry point, :func:`round_weights`, batched over independent problems; the solvers share one code path
(:mod:`.core`): dead inputs, act-order, damping, guarded Cholesky with retries, and the lazy-block column loop.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..config import ALGORITHMS, RoundingConfig
from ..errors import SolverError
from ..formats.grid import IntGrid
from . import core, gpfq, gptq, qronos, rtn
from .core import RoundingResult
from .report import reconstruction_error, reconstruction_errors

__all__ = ["RoundingResult", "reconstruction_error", "reconstruction_errors", "round_weights"]


@torch.no_grad()
def round_weights(W: torch.Tensor, grid: IntGrid, H: torch.Tensor | None, G: torch.Tensor | None,
                  cfg: RoundingConfig, *, W0: torch.Tensor | None = None, act_quant: bool = False, seed: int = 0,
                  n_tokens: list[int] | None = None, device: torch.device | str = "cpu") -> RoundingResult:
    """Round ``W`` [B, rows, cols] onto ``grid`` with ``cfg.algorithm``; returns int16 codes [B, rows, cols] on CPU.

    H = X~^T X~ / n and G = X~^T X / n ([B, cols, cols], paper orientation G[i, j] = <x~_i, x_j>, same
    normalization). ``W0`` is the reference (pre-transform) weight for Qronos step 1 and GPFQ's history (default W).
    ``cfg.damping`` is relative: GPTQ lam = damping * mean diag H (default 0.01); Qronos lam = damping * sigma_max(H)
    (default 1e-6, or 1e-3 with ``act_quant`` or fewer than 32 calibration tokens per input column, counted from
    ``n_tokens`` [B]); GPFQ and RTN use none. The caller's tensors are never modified.
    A batch element whose factorization fails even after the damping retries is rounded with RTN and reported as
    ``status: fallback-rtn`` with a reason.
    """
    algo = cfg.algorithm
    if algo not in ALGORITHMS:
        raise SolverError(f"rounding.algorithm must be one of {', '.join(ALGORITHMS)}; got {algo!r}")
    if W.dim() != 3:
        raise SolverError(f"round_weights: W must be [B, rows, cols], got shape {tuple(W.shape)}")
    B, K, N = W.shape
    if n_tokens is not None and len(n_tokens) != B:
        raise SolverError(f"round_weights: n_tokens has {len(n_tokens)} entries, expected one per problem ({B})")
    if W0 is not None and W0.shape != W.shape:
        raise SolverError(f"round_weights: W0 has shape {tuple(W0.shape)}, expected {tuple(W.shape)} like W")
    needs = {"rtn": (), "gptq": ("H",), "gpfq": ("H", "G"), "qronos": ("H", "G")}[algo]
    for name, M in (("H", H), ("G", G)):
        if name in needs:
            if M is None:
                raise SolverError(f"round_weights: algorithm {algo!r} needs {name} ([B, cols, cols]); got None")
            if tuple(M.shape) != (B, N, N):
                raise SolverError(f"round_weights: {name} has shape {tuple(M.shape)}, expected {(B, N, N)}")
    device = torch.device(device)
    t0 = time.perf_counter()
    if algo == "rtn":
        codes = rtn.solve(W.to(device), core.batched_grid(grid, B, K, N, device)).to(torch.int16).cpu()
        seconds = (time.perf_counter() - t0) / B
        info = [{"algorithm": "rtn", "damping": 0.0, "retries": 0, "seconds": seconds, "status": "ok"}
                for _ in range(B)]
        return RoundingResult(codes=codes, info=info)

    dtype = core.solve_dtype(H, cfg.stats_dtype)
    prep = core.prepare(W, grid, H, G if algo in ("gpfq", "qronos") else None, W0, act_order=cfg.act_order,
                        dtype=dtype, device=device)
    block = core.block_size(cfg.block_size, N)
    if algo == "gptq":
        out = gptq.solve(prep, gptq.damping(prep, cfg.damping), block)
    elif algo == "qronos":
        alpha = qronos.alphas(B, N, cfg.damping, act_quant=act_quant, n_tokens=n_tokens)
        out = qronos.solve(prep, qronos.damping(prep, alpha, seed=seed), block)
    else:
        out = gpfq.solve(prep, block)
    codes = core.unpermute(out.codes, prep.perm)
    if not bool(out.ok.all()):
        bad = ~out.ok
        W_bad = W[bad.to(W.device)].to(device=device, dtype=torch.float32, copy=True)
        W_bad.masked_fill_(prep.dead_orig[bad][:, None, :], 0.0)
        codes[bad] = core.rtn_codes(W_bad, _rows_of(prep.grid_orig, bad)).to(codes.dtype)
    codes = codes.to(torch.int16).cpu()
    seconds = (time.perf_counter() - t0) / B
    dead = prep.dead.sum(-1).tolist()
    info = []
    for b in range(B):
        entry = {"algorithm": algo, "damping": float(out.lam[b]), "retries": int(out.retries[b]),
                 "seconds": seconds, "status": "ok", "dead_columns": int(dead[b]), "block_size": block,
                 "act_order": bool(cfg.act_order)}
        if algo == "qronos":
            entry["alpha"] = alpha[b]  # lam relative to sigma_max(H), before any retry
        if not bool(out.ok[b]):
            entry["status"] = "fallback-rtn"
            entry["reason"] = out.reasons[b] or "solver failed"
        info.append(entry)
    return RoundingResult(codes=codes, info=info)


def _rows_of(grid: IntGrid, mask: torch.Tensor) -> IntGrid:
    return dataclasses.replace(grid, scale=grid.scale[mask], zero_point=grid.zero_point[mask])
