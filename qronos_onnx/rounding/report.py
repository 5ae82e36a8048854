"""Reconstruction error of a rounded layer, from the second-moment statistics alone (no activations needed)."""
from __future__ import annotations

import torch


@torch.no_grad()
def reconstruction_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, G: torch.Tensor,
                         F: torch.Tensor) -> torch.Tensor:
    """Relative error ||X W^T - X~ Q^T||_F / ||X W^T||_F per batch element, shape [B].

    W: float reference weights [B, rows, cols]; Q: dequantized weights; F = X^T X / n, H = X~^T X~ / n and
    G = X~^T X / n (paper orientation, G[i, j] = <x~_i, x_j>), all with the same normalization. Expanding the
    Frobenius norm gives tr(W F W^T) - 2 tr(W G^T Q^T) + tr(Q H Q^T); it is computed in float64 because the
    three terms nearly cancel for a good quantizer. A zero reference output gives 0 (or inf if X~ Q^T is not 0).
    """
    if W.dim() == 2:
        W, Q, H, G, F = (t.unsqueeze(0) for t in (W, Q, H, G, F))
    W, Q, H, G, F = (t.to(torch.float64) for t in (W, Q, H, G, F))
    ref = ((W @ F) * W).sum((-2, -1))
    cross = ((W @ G.mT) * Q).sum((-2, -1))
    quant = ((Q @ H) * Q).sum((-2, -1))
    num = (ref - 2.0 * cross + quant).clamp_min(0.0)
    safe = torch.where(ref > 0, ref, torch.ones_like(ref))
    rel = torch.sqrt(num / safe)
    return torch.where(ref > 0, rel, torch.where(num > 0, torch.full_like(rel, float("inf")), torch.zeros_like(rel)))
