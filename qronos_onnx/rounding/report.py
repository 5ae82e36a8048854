"""Reconstruction error of a rounded layer, from the second-moment statistics alone (no activations needed)."""
from __future__ import annotations

import torch


@torch.no_grad()
def reconstruction_errors(W: torch.Tensor, Qs: list[torch.Tensor], H: torch.Tensor, G: torch.Tensor,
                          F: torch.Tensor) -> list[torch.Tensor]:
    """Relative errors ||X W^T - X~ Q^T||_F / ||X W^T||_F for several candidate ``Qs`` of one ``W``, each [B].

    W: float reference weights [B, rows, cols]; each Q: dequantized weights; F = X^T X / n, H = X~^T X~ / n and
    G = X~^T X / n (paper orientation, G[i, j] = <x~_i, x_j>), all with the same normalization.

    With E = W - Q, X W^T - X~ Q^T = (X - X~) W^T + X~ E^T, so the squared error is
    tr(W M W^T) + 2 tr(W (G^T - H) E^T) + tr(E H E^T) with M = F - G - G^T + H. Every term is small when the error
    is, so float32 is accurate (the expanded form tr(WFW^T) - 2tr(WG^TQ^T) + tr(QHQ^T) cancels large numbers and
    needs float64, several times slower). The Q-independent products are shared by all candidates.
    """
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W, H, G, F = (t.to(dtype) for t in (W, H, G, F))
    Gt = G.mT
    ref = ((W @ F) * W).sum((-2, -1))
    mismatch = ((W @ (F - G - Gt + H)) * W).sum((-2, -1))
    cross = W @ (Gt - H)
    safe = torch.where(ref > 0, ref, torch.ones_like(ref))
    out = []
    for Q in Qs:
        E = W - Q.to(dtype)
        num = (mismatch + 2.0 * (cross * E).sum((-2, -1)) + ((E @ H) * E).sum((-2, -1))).clamp_min(0.0)
        rel = torch.sqrt(num / safe)
        out.append(torch.where(ref > 0, rel, torch.where(num > 0, torch.full_like(rel, float("inf")),
                                                          torch.zeros_like(rel))))
    return out


def reconstruction_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, G: torch.Tensor,
                         F: torch.Tensor) -> torch.Tensor:
    """Relative error ||X W^T - X~ Q^T||_F / ||X W^T||_F per batch element, shape [B] (see reconstruction_errors)."""
    if W.dim() == 2:
        W, Q, H, G, F = (t.unsqueeze(0) for t in (W, Q, H, G, F))
    return reconstruction_errors(W, [Q], H, G, F)[0]
