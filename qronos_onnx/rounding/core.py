"""Shared machinery of the rounding solvers (qronos_algorithm.md §3.4): one code path for GPTQ, GPFQ and Qronos.

Every solver works on a *prepared* problem: working copies of the weights in the solve dtype, dead input columns
zeroed, and everything (weights, H, G, grid lookup) permuted into processing order. The solvers differ only in the
starting weights, the propagation matrix handed to :func:`lazy_round` and the damping rule.

Shapes: ``W`` is ``[B, rows, cols]`` (rows = output neurons, cols = input features); ``H``/``G`` are
``[B, cols, cols]``; ``B`` batches independent problems (conv groups, same-shaped targets of one wave).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import SolverError
from ..formats.grid import IntGrid
from ..threads import torch_threads

POWER_ITERATIONS = 30  # Brevitas magr.py::_power_iteration
CHOL_GUARD = 1e4  # chol(c*A)/sqrt(c), Brevitas gptq.py / qronos.py
ROW_CHUNK_ELEMENTS = 1 << 16  # rows x block columns (x batch) per pass of lazy_round's column loop: 256 KB
MAX_RETRIES = 5  # Cholesky retries, damping x10 each
DAMPING_GROWTH = 10.0
RETRY_FLOOR = 1e-6  # first retry damping (relative to mean diag H) when the initial damping is 0


@dataclass
class RoundingResult:
    """Integer codes ``[B, rows, cols]`` (int16, CPU) and one info dict per batch element."""

    codes: torch.Tensor
    info: list[dict] = field(default_factory=list)


@dataclass
class Prepared:
    """A problem ready for a solver; every tensor is in processing (permuted) order unless named ``*_orig``."""

    V: torch.Tensor  # [B, K, N] working weights, dead columns zeroed (a private copy; a solver may consume it)
    W0: torch.Tensor  # [B, K, N] reference weights (not zeroed: X may still see those features)
    H: torch.Tensor  # [B, N, N] undamped
    dead: torch.Tensor  # [B, N] bool
    perm: torch.Tensor  # [B, N] original column index of each processing position
    grid: "ColumnGrid"
    usable: torch.Tensor  # [B] bool: finite statistics
    reasons: list[str | None]  # why an element is not usable
    dead_orig: torch.Tensor  # [B, N] bool, original column order (for the RTN fallback)
    grid_orig: IntGrid
    W0_orig: torch.Tensor  # [B, K, N] reference weights in original column order
    G_orig: torch.Tensor | None  # [B, N, N] paper orientation, G[i, j] = <x~_i, x_j>, original order
    permuted: bool = False
    _G: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.V.dtype

    @property
    def G(self) -> torch.Tensor | None:
        """G in processing order, permuted on first use (Qronos mostly works from ``G_orig``: an N x N copy saved)."""
        if self.G_orig is None or not self.permuted:
            return self.G_orig
        if self._G is None:
            self._G = permute_sym(self.G_orig, self.perm)
        return self._G


@dataclass
class SolveOutput:
    codes: torch.Tensor  # [B, K, N] float codes in processing order
    lam: torch.Tensor  # [B] damping actually used
    retries: torch.Tensor  # [B] int
    ok: torch.Tensor  # [B] bool; False = caller falls back to RTN
    reasons: list[str | None]


# ----------------------------------------------------------------------------------------------------- grid access

class ColumnGrid:
    """The frozen grid seen in processing order: column ``t`` uses the group of original column ``perm[:, t]``.

    Groups are static and follow the *original* column order (Brevitas PR #1040: index with ``perm[i]``).
    :meth:`block` gathers only a block's scales, so nothing is re-quantized or re-fitted per column.
    """

    def __init__(self, grid: IntGrid, perm: torch.Tensor):
        self.grid = grid
        self.group_of = None if grid.per_channel else torch.div(perm, grid.group_size, rounding_mode="floor")

    def block(self, i0: int, i1: int) -> IntGrid:
        """An IntGrid whose column ``j`` is processing column ``i0 + j`` (use ``codes(v, j)``)."""
        if self.group_of is None:
            return self.grid
        g = self.grid
        B, K = g.scale.shape[0], g.scale.shape[1]
        idx = self.group_of[:, None, i0:i1].expand(B, K, i1 - i0)
        return dataclasses.replace(g, scale=g.scale.gather(-1, idx), zero_point=g.zero_point.gather(-1, idx),
                                   group_size=1, cols=i1 - i0)


def batched_grid(grid: IntGrid, B: int, rows: int, cols: int, device) -> IntGrid:
    """The grid with a leading batch axis, on ``device``; checks that it matches W."""
    scale, zero = grid.scale, grid.zero_point
    if scale.dim() == 2:
        scale, zero = scale.unsqueeze(0), zero.unsqueeze(0)
    if scale.dim() != 3 or scale.shape[0] not in (1, B) or scale.shape[1] != rows or grid.cols != cols:
        raise SolverError(
            f"grid scale has shape {tuple(grid.scale.shape)} for {grid.cols} columns; expected [{B}, {rows}, "
            f"n_groups] for weights [{B}, {rows}, {cols}]"
        )
    scale = scale.expand(B, *scale.shape[1:]).to(device)
    zero = zero.expand(B, *zero.shape[1:]).to(device)
    return dataclasses.replace(grid, scale=scale, zero_point=zero)


# ----------------------------------------------------------------------------------------------------- preparation

def solve_dtype(H: torch.Tensor | None, stats_dtype: str) -> torch.dtype:
    """float64 when the statistics are float64 (or asked for), float32 otherwise, whatever the model dtype."""
    if (H is not None and H.dtype == torch.float64) or stats_dtype == "float64":
        return torch.float64
    return torch.float32


def block_size(configured: int, cols: int) -> int:
    """0 means ceil(N/100), Brevitas' 100 lazy blocks."""
    return configured if configured > 0 else max(1, math.ceil(cols / 100))


def prepare(W: torch.Tensor, grid: IntGrid, H: torch.Tensor, G: torch.Tensor | None, W0: torch.Tensor | None, *,
            act_order: bool, dtype: torch.dtype, device: torch.device | str) -> Prepared:
    """Copy to the solve dtype/device, find dead inputs, zero them, order by diag(H) (act-order) and permute.

    Elements whose H or G are not finite are marked unusable (they fall back to RTN) and get a harmless identity
    H so that batched operations on the other elements are unaffected. H, G and W0 may stay read-only aliases of
    the caller's tensors (no solver writes to them); V is always a private copy. On one torch thread: copies,
    masks and gathers only, memory-bound, the same bits on any thread count (threads.py).
    """
    with torch_threads(1):
        return _prepare(W, grid, H, G, W0, act_order=act_order, dtype=dtype, device=device)


def _prepare(W: torch.Tensor, grid: IntGrid, H: torch.Tensor, G: torch.Tensor | None, W0: torch.Tensor | None, *,
             act_order: bool, dtype: torch.dtype, device: torch.device | str) -> Prepared:
    B, K, N = W.shape
    V = W.to(device=device, dtype=dtype, copy=True)
    W0 = W.to(device=device, dtype=dtype) if W0 is None else W0.to(device=device, dtype=dtype)
    H = H.to(device=device, dtype=dtype)
    G = None if G is None else G.to(device=device, dtype=dtype)
    finite = torch.isfinite(H).all(-1).all(-1)
    if G is not None:
        finite &= torch.isfinite(G).all(-1).all(-1)
    reasons: list[str | None] = [None if f else "H or G has NaN/inf values" for f in finite.tolist()]
    if not bool(finite.all()):
        eye = torch.eye(N, dtype=dtype, device=device)
        H = H.clone()
        H[~finite] = eye
        if G is not None:
            G = G.clone()
            G[~finite] = eye
    d = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = d == 0
    V.masked_fill_(dead[:, None, :], 0.0)
    dead_orig = dead
    W0_orig = W0
    if act_order:
        perm = torch.argsort(d, dim=-1, descending=True, stable=True)
        V = permute_cols(V, perm)
        W0 = permute_cols(W0, perm)
        H = permute_sym(H, perm)
        dead = dead.gather(-1, perm)
    else:
        perm = torch.arange(N, device=device).expand(B, N).clone()
    grid_b = batched_grid(grid, B, K, N, device)
    return Prepared(V=V, W0=W0, H=H, dead=dead, perm=perm, grid=ColumnGrid(grid_b, perm), usable=finite,
                    reasons=reasons, dead_orig=dead_orig, grid_orig=grid_b, W0_orig=W0_orig, G_orig=G,
                    permuted=act_order)


def permute_cols(M: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Columns of ``M`` [B, K, N] by ``perm`` [B, N]."""
    return M.gather(-1, perm[:, None, :].expand(*M.shape[:-1], perm.shape[-1]))


def permute_sym(M: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Rows and columns of ``M`` [B, N, N] by ``perm`` [B, N]."""
    M = M.gather(-2, perm[:, :, None].expand_as(M))
    return M.gather(-1, perm[:, None, :].expand_as(M))


def unpermute(codes: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Processing order back to original column order."""
    out = torch.empty_like(codes)
    out.scatter_(-1, perm[:, None, :].expand_as(codes), codes)
    return out


def fill_dead_diagonal(H: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """H with dead diagonal entries set to the mean live diagonal (1 if none is alive): a copy if any input is dead,
    else H itself (never modify the result in place).

    A dead input is decoupled from the others (its row and column are zero), so any positive value keeps H
    positive definite without touching the live block; the mean live diagonal keeps the scale of H (Brevitas uses 1).
    """
    Hf = H
    if bool(dead.any()):
        Hf = H.clone()
        d = torch.diagonal(Hf, dim1=-2, dim2=-1)
        live = (~dead).to(H.dtype)
        n_live = live.sum(-1)
        mean_live = torch.where(n_live > 0, (d * live).sum(-1) / n_live.clamp_min(1), torch.ones_like(n_live))
        mean_live = torch.where(mean_live > 0, mean_live, torch.ones_like(mean_live))
        d.copy_(torch.where(dead, mean_live[:, None], d))
    return Hf


def mean_diagonal(H: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)


# ----------------------------------------------------------------------------------------------------- damping

def sigma_max(H: torch.Tensor, seed: int = 0, iters: int = POWER_ITERATIONS,
              perm: torch.Tensor | None = None) -> torch.Tensor:
    """Largest |eigenvalue| of each H [B, N, N] by seeded power iteration (Brevitas PR #1519).

    H is divided by max|H| first (and the estimate rescaled) so float32 never overflows; the start vector comes from
    a local CPU generator seeded with ``seed``, so the result is reproducible and independent of the global RNG.
    If H is already permuted by ``perm`` [B, N], the start vector is permuted the same way, so the estimate does
    not depend on act-order.

    On one torch thread: matrix-vector products, memory-bound; a second thread only waits, and the estimate has the
    same bits on one and two threads (checked for B x N x N from 1 x 1280 x 1280 to 1152 x 25 x 25).
    """
    with torch_threads(1):
        return _power_iteration(H, seed, iters, perm)


def _power_iteration(H: torch.Tensor, seed: int, iters: int, perm: torch.Tensor | None) -> torch.Tensor:
    B, N, _ = H.shape
    scale = H.abs().amax(dim=(-2, -1))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    Hn = H / safe[:, None, None]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    v = torch.randn(B, N, 1, generator=gen, dtype=torch.float64).to(device=H.device, dtype=H.dtype)
    if perm is not None:
        v = v.gather(-2, perm[:, :, None])
    for _ in range(iters):
        v = Hn @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
    num = (v * (Hn @ v)).sum((-2, -1))
    den = (v * v).sum((-2, -1))
    rq = torch.where(den > 0, num / den.clamp_min(torch.finfo(H.dtype).tiny), torch.zeros_like(num))
    return rq.abs() * torch.where(scale > 0, scale, torch.zeros_like(scale))


@dataclass
class Factor:
    M: torch.Tensor | None  # [B, N, N] (H + lam I)^-1, only with keep_inverse=True
    U: torch.Tensor  # [B, N, N] upper Cholesky factor of M: M = U^T U
    lam: torch.Tensor  # [B] damping actually used
    retries: torch.Tensor  # [B] int
    ok: torch.Tensor  # [B] bool


def damped_inverse(H: torch.Tensor, lam: torch.Tensor, *, max_retries: int = MAX_RETRIES,
                   growth: float = DAMPING_GROWTH, guard: float = CHOL_GUARD, keep_inverse: bool = False) -> Factor:
    """M = (H + lam I)^-1 and its upper Cholesky factor U = chol(c M)/sqrt(c), batched.

    A failed factorization is never silently accepted: the element is retried with lam x ``growth`` (or, if lam is
    0, a floor of 1e-6 mean diag H), up to ``max_retries`` times; elements that still fail get ``ok = False`` and
    identity factors so the batch can proceed (the caller falls back to RTN for them). Peak memory is about four
    N x N matrices per element (H, H + lam I, its inverse, U); no identity matrix is materialized on success.
    """
    B, N, _ = H.shape
    lam = lam.to(device=H.device, dtype=H.dtype).clone()
    retries = torch.zeros(B, dtype=torch.int64, device=H.device)
    floor = RETRY_FLOOR * mean_diagonal(H).abs()
    M, U, ok = _factor(H, lam, guard, keep_inverse)
    pending = (~ok).nonzero().flatten()
    for _ in range(max_retries):
        if pending.numel() == 0:
            break
        retries[pending] += 1
        lam_p = lam[pending]
        lam[pending] = torch.where(lam_p > 0, lam_p * growth, floor[pending])
        m, u, good = _factor(H[pending], lam[pending], guard, keep_inverse)
        done = pending[good]
        U[done] = u[good]
        ok[done] = True
        if keep_inverse:
            M[done] = m[good]
        pending = pending[~good]
    if pending.numel():
        eye = torch.eye(N, dtype=H.dtype, device=H.device)
        U[pending] = eye
        if keep_inverse:
            M[pending] = eye
    return Factor(M=M, U=U, lam=lam, retries=retries, ok=ok)


@contextmanager
def lapack_one_thread(device: torch.device):
    """Run CPU LAPACK calls on one thread: MKL's Cholesky (potrf) and inverse (potri) split their blocks by thread
    count, so their last bits (and, after rounding, up to a fifth of the codes) would depend on OMP_NUM_THREADS.
    GEMMs are left alone: MKL partitions their outputs, never their inner sums, so they are thread-count invariant
    (tests/test_determinism.py checks the whole pipeline). On a 2-core CPU the Cholesky of a 1536 x 1536 H costs
    about the same on one thread."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _factor(H: torch.Tensor, lam: torch.Tensor, guard: float,
            keep_inverse: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    with lapack_one_thread(H.device):
        return _factor_lapack(H, lam, guard, keep_inverse)


def _factor_lapack(H: torch.Tensor, lam: torch.Tensor, guard: float,
                   keep_inverse: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    Hd = H.clone()
    Hd.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd
    good = (info == 0) & _finite(L)
    if not bool(good.all()):
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        L = torch.where(good[:, None, None], L, eye)
    M = torch.cholesky_inverse(L)
    del L
    M.mul_(guard)
    U, info = torch.linalg.cholesky_ex(M, upper=True)
    U.div_(math.sqrt(guard))
    good &= (info == 0) & _finite(U)
    if keep_inverse:
        M.div_(guard)
        good &= _finite(M)
        return M, U, good
    return None, U, good


def _finite(A: torch.Tensor) -> torch.Tensor:
    """[B] bool: no NaN/inf in A [B, N, N]. One reduction pass (NaN and inf survive a sum), no N x N mask."""
    return torch.isfinite(A.sum(dim=(-2, -1), dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------- the loop

def lazy_round(Y: torch.Tensor, P: torch.Tensor, grid: ColumnGrid, *, start: int, block: int,
               err_scale: torch.Tensor | None, offset: torch.Tensor | None = None,
               first_value: torch.Tensor | None = None) -> torch.Tensor:
    """The GPTQ-style column loop with lazy block updates, shared by GPTQ, Qronos and GPFQ.

    For each processing column t >= start: q_t = Q(y_t); d_t = (y_t - q_t) * err_scale_t - offset_t (GPTQ/Qronos,
    err_scale = 1/U_tt) or d_t = q_t (GPFQ, ``err_scale=None``); then y_j -= d_t P[t, j] for every j > t. Updates
    inside a block are applied column by column to a small copy; updates to later columns are deferred to one
    matrix product per block, which is exact (block size does not change the result beyond round-off).
    ``offset`` [B, K, N] lets Qronos run on its re-targeted weights in factored form (see qronos.py);
    ``first_value`` [B, K] replaces y at column ``start`` for the rounding only (Qronos' step-1 correction).

    ``Y`` [B, K, N] is consumed (updated in place). Returns float codes [B, K, N]; columns < start are left 0.
    """
    B, K, N = Y.shape
    codes = torch.zeros_like(Y)
    for i0 in range(start, N, block):
        i1 = min(i0 + block, N)
        Yb = Y[..., i0:i1].clone()  # contiguous copies of the block
        Db = torch.empty_like(Yb)
        Cb = torch.empty_like(Yb)
        Ob = None if offset is None else offset[..., i0:i1].clone()
        Pb = P[:, i0:i1, i0:i1]
        g = grid.block(i0, i1)
        # rows are independent in the column loop: a few at a time keeps each column's strided reads in cache
        # (a whole 32000-row lm_head block is 16 MB). Elementwise work, on one thread (threads.py): every element
        # sees the same operations whatever the chunks or threads, so the same bits
        rows = max(8, ROW_CHUNK_ELEMENTS // (B * (i1 - i0)))
        with torch_threads(1):
            for r0 in range(0, K, rows):
                r = slice(r0, min(r0 + rows, K))
                fv = None if first_value is None or i0 != start else first_value[:, r, None]
                _round_columns(Yb[:, r], Db[:, r], Cb[:, r], None if Ob is None else Ob[:, r], Pb,
                               g if r0 == 0 and r.stop == K else g.slice_rows(r), err_scale, i0, fv)
        codes[..., i0:i1] = Cb
        if i1 < N:  # in place, no K x N temporary: this update is most of the loop's memory traffic
            Y[..., i1:].baddbmm_(Db, P[:, i0:i1, i1:], alpha=-1.0)
    return codes


def _round_columns(Yb: torch.Tensor, Db: torch.Tensor, Cb: torch.Tensor, Ob: torch.Tensor | None, Pb: torch.Tensor,
                   g, err_scale: torch.Tensor | None, i0: int, first: torch.Tensor | None) -> None:
    """The per-column loop of :func:`lazy_round` over one block (and some of its rows), in place on the views."""
    for j in range(Yb.shape[-1]):
        y = Yb[..., j : j + 1]
        x = first if (first is not None and j == 0) else y
        c = g.codes(x, j)
        q = g.decode(c, j).to(Yb.dtype)
        Cb[..., j : j + 1] = c
        if err_scale is None:
            d = q
        else:
            d = (y - q) * err_scale[:, i0 + j, None, None]
            if Ob is not None:
                d = d - Ob[..., j : j + 1]
        Db[..., j : j + 1] = d
        if j + 1 < Yb.shape[-1]:
            Yb[..., j + 1 :].addcmul_(d, Pb[:, j : j + 1, j + 1 :], value=-1.0)


def times_upper_t(R: torch.Tensor, U: torch.Tensor, block: int = 256) -> torch.Tensor:
    """R @ U^T for upper-triangular U [B, N, N], in column blocks that skip the zero triangle (half the flops)."""
    N = U.shape[-1]
    out = torch.empty(*R.shape[:-1], N, dtype=R.dtype, device=R.device)
    for i0 in range(0, N, block):
        i1 = min(i0 + block, N)
        out[..., i0:i1] = R[..., i0:] @ U[:, i0:i1, i0:].mT
    return out


def rtn_codes(W: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Round to nearest on the frozen grid, every column with its own (original-order) group."""
    return grid.codes(W)
