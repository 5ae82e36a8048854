"""MagR: weight magnitude reduction before rounding (qronos_algorithm.md §4.5; Zhang et al. 2024, Brevitas magr.py).

Per output row w of a weight with float reference w0 and the float inputs' Gram matrix H = X^T X / n:

    min_w  1/2 (w - w0) H (w - w0)^T + (tau / eta) ||w||_inf

by proximal gradient, ``steps`` (200) iterations of

    v = w - eta (w - w0) H,     w = prox_{tau ||.||_inf}(v) = v - Pi_{||.||_1 <= tau}(v)   (Moreau)

with step eta = 1 / sigma_max(H) (30 power iterations) and threshold tau = alpha sigma_max(H) / ||H||_1
(||H||_1 the largest absolute column sum; Brevitas' choice, alpha = 0.01). The prox of the inf-norm is a clip:
with theta the threshold of the L1-ball projection of v (radius tau), prox(v) = clamp(v, -theta, theta), and 0 when
||v||_1 <= tau. So MagR shrinks each row's largest magnitudes while keeping X w close to X w0: the min-max grid that
is fit afterwards gets a smaller range, i.e. a finer step.

Everything is batched: over rows (one matrix product per step) and over same-shaped weights ([B, rows, cols] with
one H per batch element), on the solver's device. The caller keeps the pre-MagR weights as the rounding reference
W0 (qronos_algorithm.md §2.4): only the grid and the solver's starting point V come from MagR.
"""
from __future__ import annotations

import dataclasses

import torch

DEFAULT_ALPHA = 0.01
DEFAULT_STEPS = 200
POWER_ITERATIONS = 30


def sigma_max(H: torch.Tensor, iters: int = POWER_ITERATIONS, seed: int = 0) -> torch.Tensor:
    """Largest eigenvalue of each symmetric PSD H [B, N, N] by power iteration from a seeded random start; [B]."""
    B, N, _ = H.shape
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(B, N, 1, generator=gen, dtype=torch.float64).to(device=H.device, dtype=H.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    for _ in range(iters):
        u = H @ v
        v = u / u.norm(dim=1, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
    return (v.mT @ H @ v).reshape(B).clamp_min(0.0)


PROX_TOP = 16  # entries per row the prox looks at first (linf_prox)


def _soft_threshold(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """theta >= 0 with sum_j max(u_j - theta, 0) = t for rows ``u`` sorted in descending order (Duchi et al. 2008);
    only right when every entry above theta is among the columns given (the caller checks)."""
    cs = torch.cumsum(u, dim=-1)
    j = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    rho = ((u * j > cs - t) * j).amax(dim=-1, keepdim=True).clamp_min(1.0)  # last index where u_j > (cs_j - t)/j
    return (cs.gather(-1, rho.long() - 1) - t) / rho


def linf_prox(V: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """prox_{tau ||.||_inf} of every row of V [B, rows, cols] (tau [B], >= 0): v - Pi_{||.||_1 <= tau}(v), which is
    the clip of v to [-theta, theta] with theta the soft threshold of the L1-ball projection (0 inside the ball).

    With MagR's small tau only a row's few largest magnitudes exceed theta, so theta is solved on the top
    PROX_TOP of them; where that is not enough (theta not above the smallest of them, or the row inside the ball)
    the row is solved again on all its entries. A full sort of every row was three quarters of MagR's time."""
    a = V.abs()
    t = tau.to(V.dtype)[:, None, None].expand(*V.shape[:-1], 1)
    k = min(PROX_TOP, V.shape[-1])
    top = torch.topk(a, k, dim=-1).values
    theta = _soft_threshold(top, t)
    if k < V.shape[-1]:
        redo = (theta <= top[..., -1:]) | (theta <= 0)
        if bool(redo.any()):
            idx = redo.squeeze(-1)
            full = torch.sort(a[idx], dim=-1, descending=True).values
            theta[idx] = _soft_threshold(full, t[idx])
    theta = theta.clamp_min(0.0)  # inside the ball: the projection is v itself and the prox 0
    return torch.minimum(torch.maximum(V, -theta), theta)


def thresholds(H: torch.Tensor, alpha: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(eta, tau) per batch element: eta = 1 / sigma_max(H), tau = alpha sigma_max(H) / ||H||_1."""
    sig = sigma_max(H, seed=seed)
    norm1 = H.abs().sum(dim=-2).amax(dim=-1)
    ok = sig > 0
    safe = torch.where(ok, sig, torch.ones_like(sig))
    eta = torch.where(ok, 1.0 / safe, torch.zeros_like(sig))
    tau = torch.where(ok, alpha * sig / torch.where(norm1 > 0, norm1, torch.ones_like(norm1)), torch.zeros_like(sig))
    return eta, tau


def objective(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor, eta: torch.Tensor,
              tau: torch.Tensor) -> torch.Tensor:
    """The MagR objective summed over rows, per batch element [B]: 1/2 tr(E H E^T) + tau/eta sum_rows ||w||_inf."""
    E = W - W0
    fit = 0.5 * ((E @ H) * E).sum((-2, -1))
    safe = torch.where(eta > 0, eta, torch.ones_like(eta))
    return fit + torch.where(eta > 0, tau / safe, torch.zeros_like(tau)) * W.abs().amax(-1).sum(-1)


@torch.no_grad()
def magr(W: torch.Tensor, H: torch.Tensor, alpha: float = DEFAULT_ALPHA, steps: int = DEFAULT_STEPS, *,
         seed: int = 0, dtype: torch.dtype = torch.float32, history: list | None = None) -> torch.Tensor:
    """MagR-processed copy of ``W`` [B, rows, cols] (or [rows, cols]) given the float Gram ``H`` [B, cols, cols];
    computed in ``dtype`` on W's device, returned in W's dtype. ``history``, when given, receives the objective
    (a [B] tensor) before the first step and after every step."""
    squeeze = W.dim() == 2
    if squeeze:
        W, H = W[None], H[None]
    W0 = W.to(dtype)
    H = H.to(device=W.device, dtype=dtype)
    eta, tau = thresholds(H, alpha, seed=seed)
    w = W0.clone()
    e3 = eta[:, None, None]
    if history is not None:
        history.append(objective(w, W0, H, eta, tau))
    for _ in range(steps):
        v = w - e3 * ((w - W0) @ H)
        w = linf_prox(v, tau)
        if history is not None:
            history.append(objective(w, W0, H, eta, tau))
    w = torch.where((eta > 0)[:, None, None], w, W0)  # an all-zero H: nothing to fit, keep the weight
    out = w.to(W.dtype)
    return out[0] if squeeze else out


def magr_batch(units: list, W: torch.Tensor, F: torch.Tensor, cfg, device: torch.device) -> tuple:
    """api._round_wave's hook: MagR of one batch of same-shaped weights ``W`` [B, rows, cols] (the concatenation of
    ``units``, each with ``W``, ``targets`` and ``names``) on the float Gram ``F``, then each unit's grid fit again on
    its MagR'd rows. Returns (V on CPU, the concatenated grid)."""
    from ..formats import make_grid  # late: formats imports config, which must not import transforms

    V = magr(W.to(device), F.to(device), alpha=float(cfg.transforms.magr), seed=cfg.seed).cpu()
    grids, b0 = [], 0
    for u in units:
        g = u.W.shape[0]
        grids.append(make_grid(V[b0 : b0 + g], cfg.weights, u.grid.scale_dtype,
                               force_per_channel=(u.targets[0].op_type == "Conv"), name=u.names[0]))
        b0 += g
    grid = dataclasses.replace(grids[0], scale=torch.cat([x.scale for x in grids]),
                               zero_point=torch.cat([x.zero_point for x in grids]))
    return V, grid
