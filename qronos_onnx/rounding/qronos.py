"""Qronos (qronos_algorithm.md §2.1.4 and §2.2 steps 0-10): correct the past, shape the future.

Step 1 is the only place X enters: the first column is the closed-form error correction against the mismatched
target Xw0, then every remaining column is re-fitted by ridge least squares pulled toward W0. From column 2 on,
the alternating updates collapse to RTN plus the damped OBS update, i.e. the shared GPTQ loop with
U = chol_up((H + lam I)^-1) restricted to the trailing block (its rows >= 1 are exactly the factor of the
Schur-downdated inverse A, so no second factorization is needed). The re-fit itself is folded into that loop
in factored form (see ``solve``); the tests check every step against the explicit closed forms.

Paper orientation: G[i, j] = <x~_i, x_j> (Brevitas keeps the transpose).
"""
from __future__ import annotations

import torch

from . import core

ALPHA_WEIGHT_ONLY = 1e-6
ALPHA_ACT_QUANT = 1e-3
# The paper's alpha = 1e-6 was tuned at 262k calibration tokens, i.e. >= 32 tokens per input column even for the
# 8192-wide down projections of Llama-3.2-1B. Below that the ridge re-fit of step 1 overfits the calibration
# windows: on SmolLM2-135M at the anchors protocol (5-14 tokens per input) alpha = 1e-3 gives wiki-leads ppl 19.65
# vs 21.06 at W4 and 44.95 vs 64.20 at W3 (bench/results/qronos_investigation.md), so the default rises to the
# activation-quantization value there.
FEW_TOKENS_PER_INPUT = 32


def default_alpha(*, act_quant: bool, n_tokens: int | None, cols: int) -> float:
    """The relative ridge when the user gave none (see FEW_TOKENS_PER_INPUT for the data rule)."""
    if act_quant or (n_tokens is not None and n_tokens < FEW_TOKENS_PER_INPUT * cols):
        return ALPHA_ACT_QUANT
    return ALPHA_WEIGHT_ONLY


def alphas(B: int, cols: int, rel: float | None, *, act_quant: bool, n_tokens: "list[int] | None") -> list[float]:
    """The relative ridge of each batch element: ``rel`` when given, else :func:`default_alpha`."""
    if rel is not None:
        return [float(rel)] * B
    return [default_alpha(act_quant=act_quant, n_tokens=None if n_tokens is None else n_tokens[b], cols=cols)
            for b in range(B)]


def damping(prep: core.Prepared, alpha: list[float], *, seed: int) -> torch.Tensor:
    """lam = alpha * sigma_max(H), per batch element."""
    a = torch.tensor(alpha, dtype=prep.H.dtype, device=prep.H.device)
    return a * core.sigma_max(prep.H, seed=seed, perm=prep.perm)


def solve(prep: core.Prepared, lam: torch.Tensor, block: int) -> core.SolveOutput:
    if prep.G_orig is None:
        raise ValueError("Qronos needs G")
    H, V, W0 = prep.H, prep.V, prep.W0
    W0o, Go = prep.W0_orig, prep.G_orig  # products with G are taken in original order, then permuted
    B, K, N = V.shape
    # steps 3-4: the upper factor U of M = (H + lam I)^-1 (retries inside; M itself is not needed below)
    fac = core.damped_inverse(core.fill_dead_diagonal(H, prep.dead), lam)
    U, lam = fac.U, fac.lam
    ok = fac.ok & prep.usable
    reasons = [r if r else (None if good else f"Cholesky of H + lam I failed after {n} retries (last lam {l:.3g})")
               for r, good, n, l in zip(prep.reasons, fac.ok.tolist(), fac.retries.tolist(), fac.lam.tolist())]

    # step 5: error correction of the first column with the undamped H_00
    h00 = H[:, 0, 0]
    inv_h00 = torch.where(h00 > 0, 1.0 / torch.where(h00 > 0, h00, torch.ones_like(h00)), torch.zeros_like(h00))
    g_row = Go.gather(-2, prep.perm[:, :1, None].expand(B, 1, N))  # G[p_0, :], original column order
    u = (W0o @ g_row.mT).squeeze(-1)  # = W0 (permuted) . G (permuted)[0, :]
    if N > 1:
        u = u - (V[..., 1:] @ H[:, 0, 1:, None]).squeeze(-1)
    u = u * inv_h00[:, None]  # [B, K]
    finite_u = torch.isfinite(u).all(-1) & (u.abs() <= torch.finfo(torch.float32).max).all(-1)
    for b in (~finite_u & ok).nonzero().flatten().tolist():
        reasons[b] = "the step-1 error correction is not finite"
    ok &= finite_u
    u = torch.where(ok[:, None], u, torch.zeros_like(u))
    if N == 1:
        codes = prep.grid.block(0, 1).codes(u[..., None], 0)
        return core.SolveOutput(codes=codes, lam=lam, retries=fac.retries, ok=ok, reasons=reasons)

    # steps 6-9. Brevitas forms the Schur complement A = ((H + lam I)_{>1,>1})^-1, re-fits every remaining column
    # by ridge LS, v_{>1} = (W0 (G^T + lam I)_{:,>1} - q1 H_{0,>1}) A, then runs the GPTQ loop from column 1 with
    # chol_up(A) = U_{>1,>1}. The same numbers come out of one loop from column 0 over the unconstrained ridge
    # solution z = W0 (G^T + lam I) M, rounding column 0 from u instead of z_0 (pinning coordinate 0 to q1 moves
    # the rest by -(z_0 - q1) M_{0,>1} / M_00, exactly the loop's first OBS update). With M = U^T U and
    # y' = W0 (G^T + lam I) U^T we have z = y' U, so the loop runs on Y_t = y'_t U_tt and propagates d_t - y'_t:
    # the re-fit costs one triangular product instead of a second dense one (qronos_algorithm.md §2.2 / §2.6).
    lam3 = lam[:, None, None]
    if K > N:  # W0 ((G^T + lam I) U^T): N^3 + 2 K N^2 flops
        C = core.times_upper_t(prep.G.mT, U)
        C += lam3 * U.mT
        y = W0 @ C
        del C
    else:  # (W0 G^T + lam W0) U^T: 2 K N^2 + K N^2 flops; W0 G^T in original order, then its columns permuted
        r = core.permute_cols(W0o @ Go.mT, prep.perm) if prep.permuted else W0o @ Go.mT
        r += lam3 * W0
        y = core.times_upper_t(r, U)
        del r
    y.masked_fill_(prep.dead[:, None, :], 0.0)  # the ridge would pull dead inputs back to W0; keep them zero
    diag = torch.diagonal(U, dim1=-2, dim2=-1)
    Y = y * diag[:, None, :]
    codes = core.lazy_round(Y, U, prep.grid, start=0, block=block, err_scale=1.0 / diag, offset=y, first_value=u)
    return core.SolveOutput(codes=codes, lam=lam, retries=fac.retries, ok=ok, reasons=reasons)
