"""Rounding solvers against slow, obviously-right float64 references on small random problems.

The references use the explicit activation matrices X (float) and X~ (partially quantized), never H or G:
- Qronos: the alternating closed forms of qronos_algorithm.md §2.1.1 (error correction with inner products,
  diffusion with an explicit least-squares solve at every step), and its ridge form (§2.2 "checked numerically" 4);
- GPTQ: the same ridge form with X = X~ (damped OBS);
- GPFQ: the running-error form of §3.3.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qronos_onnx.config import RoundingConfig, WeightQuantConfig
from qronos_onnx.errors import SolverError
from qronos_onnx.formats.grid import IntGrid, make_int_grid
from qronos_onnx.rounding import core, gpfq, gptq, qronos, reconstruction_error, round_weights

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------- problems

def make_problem(seed: int, m: int = 160, N: int = 12, K: int = 5, drift: float = 0.3, rank: int = 3):
    """X: correlated float inputs; X~ = X + low-rank drift + noise (mismatched); W: weights. All float64."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, N, generator=g, dtype=F64) @ (torch.randn(N, N, generator=g, dtype=F64) * 0.4
                                                      + torch.eye(N, dtype=F64))
    X = X + 0.5 * torch.randn(m, 1, generator=g, dtype=F64)  # a shared component: strong correlations
    drift_dir = torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, N, generator=g, dtype=F64)
    Xt = X + drift * drift_dir + 0.05 * torch.randn(m, N, generator=g, dtype=F64)
    W = torch.randn(K, N, generator=g, dtype=F64)
    return X, Xt, W


def stats(X: torch.Tensor, Xt: torch.Tensor):
    """H = X~^T X~/n, G = X~^T X/n (paper orientation), F = X^T X/n, each [1, N, N]."""
    n = X.shape[0]
    return (Xt.T @ Xt / n)[None], (Xt.T @ X / n)[None], (X.T @ X / n)[None]


def grid_for(W: torch.Tensor, bits: int = 3, group_size: int = 0, symmetric: bool = False) -> IntGrid:
    return make_int_grid(W.float()[None], WeightQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric))


def grid2d(grid: IntGrid) -> IntGrid:
    """The same grid without the batch axis (for the per-row references)."""
    return dataclasses.replace(grid, scale=grid.scale[0], zero_point=grid.zero_point[0])


def order(H: torch.Tensor, act_order: bool) -> list[int]:
    N = H.shape[-1]
    if not act_order:
        return list(range(N))
    return torch.argsort(torch.diagonal(H[0]), descending=True, stable=True).tolist()


def prep_for(W, grid, H, G, *, W0=None, act_order=False):
    return core.prepare(W[None], grid, H, G, None if W0 is None else W0[None], act_order=act_order, dtype=F64,
                        device="cpu")


def solver_codes(out: core.SolveOutput, prep: core.Prepared) -> torch.Tensor:
    return core.unpermute(out.codes, prep.perm)[0]


# ----------------------------------------------------------------------------------------------------- references

def naive_qronos(W, W0, X, Xt, grid2: IntGrid, perm: list[int], lam: float) -> torch.Tensor:
    """§2.1.1 with explicit matrices. lam = 0: error correction at every step + exact LS diffusion (lstsq).
    lam > 0: undamped correction at t = 1, RTN of the current value after, and ridge diffusion
    argmin ||X w0 - X~_{<=t} q - X~_{>t} v||^2 / n + lam ||v - w0_{>t}||^2 (§2.2 item 4). Returns codes [K, N]."""
    m, N = X.shape
    K = W.shape[0]
    target = X @ W0.T  # [m, K] = X w0 for every row at once
    Xtp = Xt[:, perm]
    w0 = W0[:, perm]
    v = W[:, perm].clone()
    q = torch.zeros(K, N, dtype=F64)
    codes = torch.zeros(K, N)
    for t in range(N):
        col = perm[t]
        if t == 0 or lam == 0:
            r = target - Xtp[:, :t] @ q[:, :t].T - Xtp[:, t + 1:] @ v[:, t + 1:].T
            val = (Xtp[:, t] @ r) / (Xtp[:, t] @ Xtp[:, t])
        else:
            val = v[:, t]
        c = grid2.codes(val[:, None], col)
        codes[:, col] = c[:, 0]
        q[:, t] = grid2.decode(c, col)[:, 0].to(F64)
        if t + 1 < N:
            r = target - Xtp[:, : t + 1] @ q[:, : t + 1].T
            A, b = Xtp[:, t + 1:] / math.sqrt(m), r / math.sqrt(m)
            if lam > 0:
                A = torch.cat([A, math.sqrt(lam) * torch.eye(N - t - 1, dtype=F64)])
                b = torch.cat([b, math.sqrt(lam) * w0[:, t + 1:].T])
            v[:, t + 1:] = torch.linalg.lstsq(A, b, driver="gelsd").solution.T
    return codes


def naive_gpfq(W, W0, X, Xt, grid2: IntGrid, perm: list[int]) -> torch.Tensor:
    """Running-error GPFQ: q_t = Q(<x~_t, u + v_t x_t> / ||x~_t||^2), u += w0_t x_t - q_t x~_t."""
    m, N = X.shape
    K = W.shape[0]
    u = torch.zeros(m, K, dtype=F64)
    codes = torch.zeros(K, N)
    for col in perm:
        xt, x = Xt[:, col], X[:, col]
        val = (xt @ (u + x[:, None] * W[:, col][None])) / (xt @ xt)
        c = grid2.codes(val[:, None], col)
        codes[:, col] = c[:, 0]
        q = grid2.decode(c, col)[:, 0].to(F64)
        u += x[:, None] * W0[:, col][None] - xt[:, None] * q[None]
    return codes


# ----------------------------------------------------------------------------------------------------- Qronos

@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("damped", [False, True])
@pytest.mark.parametrize("group_size", [0, 5])  # 5: a partial last group too
@pytest.mark.parametrize("K,N", [(5, 12), (20, 8)])  # both association orders of the step-7 products
def test_qronos_equals_naive_alternating_closed_forms(act_order, damped, group_size, K, N):
    for seed in range(3):
        X, Xt, W = make_problem(seed, K=K, N=N)
        W0 = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(99 + seed), dtype=F64)
        H, G, _ = stats(X, Xt)
        grid = grid_for(W, bits=3, group_size=group_size)
        lam = 0.02 * float(core.mean_diagonal(H)) if damped else 0.0
        prep = prep_for(W, grid, H, G, W0=W0, act_order=act_order)
        out = qronos.solve(prep, torch.tensor([lam], dtype=F64), block=3)
        assert bool(out.ok.all()) and int(out.retries[0]) == 0
        ref = naive_qronos(W, W0, X, Xt, grid2d(grid), order(H, act_order), lam)
        torch.testing.assert_close(solver_codes(out, prep).float(), ref, rtol=0, atol=0)


def test_qronos_is_not_plain_gptq_on_mismatched_data():
    """Guard against a degenerate implementation: with X != X~ the first column and the re-fit must use G."""
    X, Xt, W = make_problem(0, drift=0.8)
    H, G, _ = stats(X, Xt)
    grid = grid_for(W)
    lam = torch.tensor([1e-3 * float(core.mean_diagonal(H))], dtype=F64)
    prep = prep_for(W, grid, H, G)
    a = solver_codes(qronos.solve(prep, lam, block=4), prep)
    b = solver_codes(gptq.solve(prep, lam, block=4), prep)
    assert (a != b).any()


@pytest.mark.parametrize("act_order", [False, True])
def test_qronos_with_x_equal_xt_equals_damped_gptq(act_order):
    for seed in range(3):
        X, _, W = make_problem(seed)
        H, G, _ = stats(X, X)
        grid = grid_for(W, bits=3, group_size=4)
        lam = torch.tensor([0.01 * float(core.mean_diagonal(H))], dtype=F64)
        prep = prep_for(W, grid, H, G, act_order=act_order)
        a = solver_codes(qronos.solve(prep, lam, block=5), prep)
        b = solver_codes(gptq.solve(prep, lam, block=5), prep)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_naive_damped_obs(act_order):
    """GPTQ = the ridge form of the naive closed forms with X = X~ (each step: RTN + ridge LS re-fit)."""
    for seed in range(3):
        X, Xt, W = make_problem(seed)
        H, G, _ = stats(Xt, Xt)
        grid = grid_for(W, bits=4, group_size=4, symmetric=True)
        lam = 0.01 * float(core.mean_diagonal(H))
        prep = prep_for(W, grid, H, None, act_order=act_order)
        out = gptq.solve(prep, torch.tensor([lam], dtype=F64), block=4)
        ref = naive_qronos(W, W, Xt, Xt, grid2d(grid), order(H, act_order), lam)
        torch.testing.assert_close(solver_codes(out, prep).float(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gpfq_lower_triangular_equals_naive_running_error(act_order):
    for seed in range(3):
        X, Xt, W = make_problem(seed)
        W0 = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(7 + seed), dtype=F64)
        H, G, _ = stats(X, Xt)
        grid = grid_for(W, bits=3, group_size=4)
        prep = prep_for(W, grid, H, G, W0=W0, act_order=act_order)
        out = gpfq.solve(prep, block=3)
        ref = naive_gpfq(W, W0, X, Xt, grid2d(grid), order(H, act_order))
        torch.testing.assert_close(solver_codes(out, prep).float(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
def test_lazy_block_size_does_not_change_codes(algorithm):
    X, Xt, W = make_problem(5, N=23, K=7)
    H, G, _ = stats(X, Xt)
    grid = grid_for(W, bits=3, group_size=8)
    results = []
    for bs in (1, 3, 0, 23, 50):
        cfg = RoundingConfig(algorithm=algorithm, block_size=bs, stats_dtype="float64")
        results.append(round_weights(W[None], grid, H, G, cfg).codes)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
@pytest.mark.parametrize("fmt", ["int-g8", "int-pc", "mxfp4"])
def test_row_chunks_of_the_column_loop_give_the_same_bits(monkeypatch, algorithm, fmt):
    """The column loop runs a few rows at a time (cache); rows are independent there, so any chunking gives the same
    bits as the whole block at once, float32 solve included, batched problems and every grid kind."""
    from qronos_onnx.formats import make_grid

    probs = [make_problem(s, m=300, N=64, K=37) for s in (3, 4)]
    W = torch.stack([p[2] for p in probs]).float()
    H = torch.cat([stats(p[0], p[1])[0] for p in probs]).float()
    G = torch.cat([stats(p[0], p[1])[1] for p in probs]).float()
    wcfg = {"int-g8": WeightQuantConfig(bits=3, group_size=8), "int-pc": WeightQuantConfig(bits=4, group_size=0),
            "mxfp4": WeightQuantConfig(format="mxfp4", group_size=32)}[fmt]
    grid = make_grid(W, wcfg)
    cfg = RoundingConfig(algorithm=algorithm, block_size=16)
    monkeypatch.setattr(core, "ROW_CHUNK_ELEMENTS", 1 << 30)  # one chunk: the loop as it was
    whole = round_weights(W, grid, H, G, cfg).codes
    for elements in (1, 16 * 2 * 16):  # 8 rows (the floor; 37 = 4 x 8 + 5), 16 rows (37 = 2 x 16 + 5)
        monkeypatch.setattr(core, "ROW_CHUNK_ELEMENTS", elements)
        assert torch.equal(round_weights(W, grid, H, G, cfg).codes, whole), (algorithm, fmt, elements)


# ----------------------------------------------------------------------------------------------------- the grid

def test_codes_lie_on_the_grid_for_every_algorithm_and_format():
    X, Xt, W = make_problem(1, N=32, K=6)
    H, G, F = stats(X, Xt)
    W32, H32, G32, F32 = W.float()[None], H.float(), G.float(), F.float()
    for algorithm in ("rtn", "gptq", "gpfq", "qronos"):
        for bits in (2, 3, 4, 8):
            for symmetric in (False, True):
                for group_size in (0, 16):
                    grid = make_int_grid(W32, WeightQuantConfig(bits=bits, symmetric=symmetric,
                                                                group_size=group_size))
                    res = round_weights(W32, grid, H32, G32, RoundingConfig(algorithm=algorithm))
                    c = res.codes
                    assert c.shape == (1, 6, 32) and c.dtype == torch.int16
                    assert int(c.min()) >= grid.qmin and int(c.max()) <= grid.qmax, (algorithm, bits, symmetric)
                    assert res.info[0]["status"] == "ok" and res.info[0]["algorithm"] == algorithm
                    if bits == 8:
                        # fine grid: every solver is at least as good as RTN on the objective it sees
                        err = float(reconstruction_error(W32, grid.decode(c), H32, G32, F32)[0])
                        rtn_err = float(reconstruction_error(W32, grid.round(W32), H32, G32, F32)[0])
                        assert err <= rtn_err * 1.001, (algorithm, symmetric, group_size, err, rtn_err)


@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
def test_static_groups_follow_original_columns_under_act_order(algorithm):
    """With diagonal H = G every solver reduces to RTN; act-order shuffles the processing order across groups of
    very different scales, so using the processing index's group instead of the original one changes the codes."""
    N, K = 64, 4
    g = torch.Generator().manual_seed(3)
    W = torch.randn(1, K, N, generator=g)
    W[..., 16:32] *= 30.0  # group 1 has a far larger scale than the others
    d = torch.rand(N, generator=g) + 0.1  # distinct diagonal: act-order permutes columns across groups
    H = torch.diag(d)[None]
    grid = make_int_grid(W, WeightQuantConfig(bits=4, group_size=16))
    res = round_weights(W, grid, H, H.clone(), RoundingConfig(algorithm=algorithm, act_order=True))
    assert res.info[0]["act_order"] is True
    torch.testing.assert_close(res.codes.float(), grid.codes(W), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_give_zero_weight_columns(algorithm, act_order):
    X, Xt, W = make_problem(2, N=16, K=6)
    dead = [0, 5, 11]
    Xt = Xt.clone()
    Xt[:, dead] = 0.0  # the quantized stream never sees these features; the float stream still does
    H, G, _ = stats(X, Xt)
    grid = grid_for(W, bits=4)
    res = round_weights(W.float()[None], grid, H.float(), G.float(),
                        RoundingConfig(algorithm=algorithm, act_order=act_order))
    Q = grid.decode(res.codes)[0]
    assert res.info[0]["status"] == "ok" and res.info[0]["dead_columns"] == 3
    assert (Q[:, dead] == 0).all()
    alive = [c for c in range(16) if c not in dead]
    assert (Q[:, alive] != 0).any()


@pytest.mark.parametrize("algorithm", ["gptq", "qronos"])
def test_cholesky_failure_retries_then_falls_back_to_rtn(algorithm):
    X, Xt, W = make_problem(4, N=10, K=5)
    H, G, _ = stats(X, Xt)
    good_H, good_G = H[0].float(), G[0].float()
    bad = torch.eye(10)
    bad[0, 1] = bad[1, 0] = 1e6  # strongly indefinite: no damping within the retry limit fixes it
    Hb = torch.stack([good_H, bad])
    Gb = torch.stack([good_G, bad])
    Wb = W.float()[None].repeat(2, 1, 1)
    grid = make_int_grid(Wb, WeightQuantConfig(bits=3))
    res = round_weights(Wb, grid, Hb, Gb, RoundingConfig(algorithm=algorithm))
    ok, fb = res.info
    assert ok["status"] == "ok" and ok["retries"] == 0
    assert fb["status"] == "fallback-rtn" and fb["retries"] == core.MAX_RETRIES
    assert "Cholesky" in fb["reason"]
    assert fb["damping"] > 0
    torch.testing.assert_close(res.codes[1].float(), grid.codes(Wb)[1], rtol=0, atol=0)
    # the failing element does not disturb the healthy one
    alone = round_weights(Wb[:1], make_int_grid(Wb[:1], WeightQuantConfig(bits=3)), Hb[:1], Gb[:1],
                          RoundingConfig(algorithm=algorithm))
    torch.testing.assert_close(res.codes[0], alone.codes[0], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
def test_non_finite_statistics_fall_back_with_a_reason(algorithm):
    X, Xt, W = make_problem(4, N=8, K=3)
    H, G, _ = stats(X, Xt)
    H = H.float().clone()
    H[0, 2, 3] = float("nan")
    grid = grid_for(W)
    res = round_weights(W.float()[None], grid, H, G.float(), RoundingConfig(algorithm=algorithm))
    assert res.info[0]["status"] == "fallback-rtn" and "NaN" in res.info[0]["reason"]
    torch.testing.assert_close(res.codes.float(), grid.codes(W.float()[None]), rtol=0, atol=0)


def test_damping_retry_recovers_and_is_recorded():
    """An H that is slightly indefinite (eigenvalue -5e-5 sigma_max) fails at lam = 1e-6 sigma and at 1e-5 sigma,
    then succeeds at 1e-4 sigma: two retries, status ok."""
    N = 12
    g = torch.Generator().manual_seed(0)
    Qm, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    eig = torch.linspace(1.0, 0.2, N, dtype=F64)
    eig[-1] = -5e-5
    H = (Qm * eig) @ Qm.T
    W = torch.randn(1, 4, N, generator=g, dtype=F64)
    grid = grid_for(W[0])
    res = round_weights(W, grid, H[None], H[None].clone(), RoundingConfig(algorithm="qronos", stats_dtype="float64"))
    info = res.info[0]
    assert info["status"] == "ok" and info["retries"] == 2
    sigma = float(core.sigma_max(H[None], seed=0)[0])  # the seeded estimate (30 iterations), close to 1
    assert 0.9 < sigma <= 1.0
    assert info["damping"] == pytest.approx(1e-6 * sigma * 10 ** 2, rel=1e-9)


def test_all_dead_h_zero_gives_zero_weights():
    W = torch.randn(1, 4, 8)
    grid = make_int_grid(W, WeightQuantConfig(bits=4))
    H = torch.zeros(1, 8, 8)
    for algorithm in ("gptq", "gpfq", "qronos"):
        res = round_weights(W, grid, H, H.clone(), RoundingConfig(algorithm=algorithm))
        assert res.info[0]["dead_columns"] == 8
        assert (grid.decode(res.codes) == 0).all(), algorithm


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "gpfq", "qronos"])
@pytest.mark.parametrize("act_order", [False, True])
def test_caller_tensors_are_not_modified(algorithm, act_order):
    X, Xt, W = make_problem(6, N=16, K=4)
    Xt2 = Xt.clone()
    Xt2[:, 3] = 0  # a dead column too, which the solvers zero in their working copy
    H, G, _ = stats(X, Xt2)
    W = W.float()[None]
    W0 = W * 1.1
    H, G = H.float(), G.float()
    grid = make_int_grid(W, WeightQuantConfig(bits=3, group_size=16))
    before = [t.clone() for t in (W, W0, H, G, grid.scale, grid.zero_point)]
    round_weights(W, grid, H, G, RoundingConfig(algorithm=algorithm, act_order=act_order), W0=W0)
    round_weights(W, grid, H, G, RoundingConfig(algorithm=algorithm, act_order=act_order))  # W0 defaults to W
    for a, b in zip((W, W0, H, G, grid.scale, grid.zero_point), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "qronos"])
def test_deterministic_for_a_seed(algorithm):
    X, Xt, W = make_problem(8, N=24, K=6)
    H, G, _ = stats(X, Xt)
    W, H, G = W.float()[None], H.float(), G.float()
    grid = make_int_grid(W, WeightQuantConfig(bits=3))
    cfg = RoundingConfig(algorithm=algorithm)
    torch.manual_seed(1)
    a = round_weights(W, grid, H, G, cfg, seed=5)
    torch.manual_seed(2)  # the global RNG must not matter
    b = round_weights(W, grid, H, G, cfg, seed=5)
    assert torch.equal(a.codes, b.codes)
    assert a.info[0]["damping"] == b.info[0]["damping"]
    if algorithm == "qronos":  # the power-iteration start vector follows the permutation: lam ignores act-order
        c = round_weights(W, grid, H, G, RoundingConfig(algorithm=algorithm, act_order=False), seed=5)
        assert c.info[0]["damping"] == pytest.approx(a.info[0]["damping"], rel=1e-4)


def test_sigma_max_is_seeded_and_accurate():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 40, 40, generator=g, dtype=F64)
    H = A @ A.mT * 1e6  # large scale: normalization by max|H| keeps float32 safe
    torch.manual_seed(0)
    s1 = core.sigma_max(H.float(), seed=3)
    torch.manual_seed(123)
    s2 = core.sigma_max(H.float(), seed=3)
    assert torch.equal(s1, s2)
    true = torch.linalg.eigvalsh(H)[:, -1]
    torch.testing.assert_close(s1.double(), true, rtol=2e-2, atol=0)


@pytest.mark.parametrize("group_size", [0, 4])
def test_batched_problems_are_independent(group_size):
    """B independent problems in one call (each with its own act-order permutation and grid) give the same codes
    as one call each."""
    probs = [make_problem(s, N=14, K=5) for s in (10, 11, 12)]
    W = torch.stack([p[2] for p in probs]).float()
    HGF = [stats(p[0], p[1]) for p in probs]
    H = torch.cat([h[0] for h in HGF]).float()
    G = torch.cat([h[1] for h in HGF]).float()
    grid = make_int_grid(W, WeightQuantConfig(bits=3, group_size=group_size))
    perms = [torch.argsort(torch.diagonal(h), descending=True).tolist() for h in H]
    assert perms[0] != perms[1] != perms[2]
    for algorithm in ("gptq", "gpfq", "qronos"):
        cfg = RoundingConfig(algorithm=algorithm, block_size=4)
        batch = round_weights(W, grid, H, G, cfg).codes
        for b in range(3):
            gb = dataclasses.replace(grid, scale=grid.scale[b:b + 1], zero_point=grid.zero_point[b:b + 1])
            one = round_weights(W[b:b + 1], gb, H[b:b + 1], G[b:b + 1], cfg).codes
            assert torch.equal(batch[b:b + 1], one), (algorithm, b)


def test_float16_weights_and_float32_solve_agree_with_float64():
    X, Xt, W = make_problem(13, N=32, K=8)
    H, G, _ = stats(X, Xt)
    W16 = W.half()[None]
    grid = make_int_grid(W16.float(), WeightQuantConfig(bits=4))
    for algorithm in ("gptq", "gpfq", "qronos"):
        a = round_weights(W16, grid, H.float(), G.float(), RoundingConfig(algorithm=algorithm))
        b = round_weights(W16, grid, H, G, RoundingConfig(algorithm=algorithm))  # float64 stats -> float64 solve
        agree = (a.codes == b.codes).float().mean()
        assert agree > 0.95, (algorithm, float(agree))


def test_missing_statistics_are_refused_clearly():
    W = torch.randn(1, 4, 8)
    grid = make_int_grid(W, WeightQuantConfig(bits=4))
    with pytest.raises(SolverError, match="needs G"):
        round_weights(W, grid, torch.eye(8)[None], None, RoundingConfig(algorithm="qronos"))
    with pytest.raises(SolverError, match="H has shape"):
        round_weights(W, grid, torch.eye(7)[None], None, RoundingConfig(algorithm="gptq"))
    assert round_weights(W, grid, None, None, RoundingConfig(algorithm="rtn")).codes.shape == (1, 4, 8)


# ----------------------------------------------------------------------------------------------------- report

def test_reconstruction_error_equals_direct_computation():
    X, Xt, W = make_problem(9, m=90, N=10, K=4, drift=0.7)
    Q = W + 0.3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    H, G, F = stats(X, Xt)
    direct = torch.linalg.norm(X @ W.T - Xt @ Q.T) / torch.linalg.norm(X @ W.T)
    got = reconstruction_error(W[None], Q[None], H, G, F)
    assert got.shape == (1,)
    torch.testing.assert_close(got[0], direct, rtol=1e-9, atol=0)
    # the orientation matters: the transposed cross-Gram gives a different (wrong) value on mismatched data
    wrong = reconstruction_error(W[None], Q[None], H, G.mT, F)
    assert abs(float(wrong[0]) - float(direct)) > 1e-3
    # float32 inputs are computed in float32 in the cancellation-free form and still match closely,
    # also for a nearly perfect quantizer where the expanded form would cancel large terms
    got32 = reconstruction_error(*(t.float() for t in (W[None], Q[None], H, G, F)))
    torch.testing.assert_close(got32[0].double(), direct, rtol=1e-4, atol=0)
    Q_close = W + 1e-4 * torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    direct_close = torch.linalg.norm(X @ W.T - Xt @ Q_close.T) / torch.linalg.norm(X @ W.T)
    got_close = reconstruction_error(*(t.float() for t in (W[None], Q_close[None], H, G, F)))
    torch.testing.assert_close(got_close[0].double(), direct_close, rtol=1e-3, atol=0)
    H0, G0, F0 = stats(X, X)  # matched streams: the error is tiny, the expanded form's terms are not
    direct_tiny = torch.linalg.norm(X @ W.T - X @ Q_close.T) / torch.linalg.norm(X @ W.T)
    got_tiny = reconstruction_error(*(t.float() for t in (W[None], Q_close[None], H0, G0, F0)))
    torch.testing.assert_close(got_tiny[0].double(), direct_tiny, rtol=1e-2, atol=0)
    # a perfect quantizer with X = X~ has zero error
    H0, G0, F0 = stats(X, X)
    assert float(reconstruction_error(W[None], W[None], H0, G0, F0)[0]) < 1e-6


def test_weights_that_require_grad_are_accepted_without_autograd():
    W = torch.nn.Parameter(torch.randn(1, 4, 8))
    H = torch.eye(8)[None] * 2.0
    grid = make_int_grid(W.detach(), WeightQuantConfig(bits=4))
    res = round_weights(W, grid, H, H.clone(), RoundingConfig(algorithm="qronos"))
    assert not res.codes.requires_grad
    torch.testing.assert_close(res.codes.float(), grid.codes(W.detach()), rtol=0, atol=0)  # diagonal H: RTN


def test_blocked_triangular_product():
    g = torch.Generator().manual_seed(0)
    U = torch.triu(torch.randn(2, 11, 11, generator=g, dtype=F64))
    R = torch.randn(2, 5, 11, generator=g, dtype=F64)
    for block in (1, 3, 256):
        torch.testing.assert_close(core.times_upper_t(R, U, block=block), R @ U.mT, rtol=1e-12, atol=1e-12)


def test_default_damping_rules():
    """GPTQ: 0.01 mean diag H; Qronos: alpha sigma_max(H) with alpha 1e-6, or 1e-3 with activation quantization or
    with fewer than 32 calibration tokens per input; an explicit cfg.damping replaces the relative factor."""
    X, Xt, W = make_problem(3, N=16, K=4)
    H, G, _ = stats(X, Xt)
    W, H, G = W.float()[None], H.float(), G.float()
    grid = make_int_grid(W, WeightQuantConfig(bits=4))
    sigma = float(core.sigma_max(H, seed=0)[0])
    assert sigma == pytest.approx(float(torch.linalg.eigvalsh(H.double())[0, -1]), rel=0.05)
    info = lambda cfg, **kw: round_weights(W, grid, H, G, cfg, **kw).info[0]  # noqa: E731
    assert info(RoundingConfig(algorithm="gptq"))["damping"] == pytest.approx(0.01 * float(H[0].diag().mean()),
                                                                              rel=1e-5)
    assert info(RoundingConfig(algorithm="qronos"))["damping"] == pytest.approx(1e-6 * sigma, rel=1e-4)
    assert info(RoundingConfig(algorithm="qronos"), act_quant=True)["damping"] == pytest.approx(1e-3 * sigma, rel=1e-4)
    assert info(RoundingConfig(algorithm="qronos", damping=0.1))["damping"] == pytest.approx(0.1 * sigma, rel=1e-4)
    # few calibration tokens per input (< 32 per column): the weight-only ridge rises to 1e-3; at 32 it does not
    assert info(RoundingConfig(algorithm="qronos"), n_tokens=[31 * 16])["damping"] == pytest.approx(1e-3 * sigma,
                                                                                                 rel=1e-4)
    assert info(RoundingConfig(algorithm="qronos"), n_tokens=[32 * 16])["damping"] == pytest.approx(1e-6 * sigma,
                                                                                                 rel=1e-4)
    assert info(RoundingConfig(algorithm="qronos", damping=1e-5), n_tokens=[1])["damping"] == pytest.approx(
        1e-5 * sigma, rel=1e-4)
    with pytest.raises(SolverError, match="n_tokens"):
        info(RoundingConfig(algorithm="qronos"), n_tokens=[1, 2])
    assert info(RoundingConfig(algorithm="gptq", act_order=False), act_quant=True)["damping"] == pytest.approx(
        0.01 * float(H[0].diag().mean()), rel=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 16])
def test_mse_scale_search_matches_a_naive_search(monkeypatch, symmetric, group_size):
    """The MSE clipping search (blocked rows, in-place error) picks, per group, the candidate a plain float64 loop
    over the same 80 clipping factors picks; blocks of a few rows change nothing."""
    from qronos_onnx.formats import grid as G

    w = torch.randn(3, 37, 48, generator=torch.Generator().manual_seed(3)) * torch.rand(1, 1, 48)
    cfg = WeightQuantConfig(bits=4, symmetric=symmetric, scale_method="mse", group_size=group_size)
    got = make_int_grid(w, cfg)
    monkeypatch.setattr(G, "_MSE_BLOCK", 100)  # 2 rows of 48 per block
    blocked = make_int_grid(w, cfg)
    assert torch.equal(got.scale, blocked.scale) and torch.equal(got.zero_point, blocked.zero_point)

    qmin, qmax = G.int_range(4, symmetric, False)
    wg = G._grouped(w.float(), got.group_size)
    lo, hi = wg.amin(-1).clamp_max(0.0), wg.amax(-1).clamp_min(0.0)
    best = torch.full(lo.shape, math.inf, dtype=torch.float64)
    want_s, want_z = torch.zeros_like(lo), torch.zeros_like(lo)
    for p in G._MSE_GRID:
        s, z = G._fit(lo * p, hi * p, qmin, qmax, symmetric, torch.float32)
        q = (torch.clamp(torch.round(wg / s[..., None]) + z[..., None], qmin, qmax) - z[..., None]) * s[..., None]
        err = (q.double() - wg.double()).pow(2).sum(-1)
        better = err < best
        best, want_s, want_z = torch.where(better, err, best), torch.where(better, s, want_s), torch.where(better, z, want_z)
    # float32 sums may order two nearly equal candidates differently from float64: allow a rare tie, no more
    same = (got.scale == want_s) & (got.zero_point == want_z)
    assert same.float().mean() > 0.97


@pytest.mark.parametrize("scale_method", ["minmax", "mse"])
def test_full_range_grid_puts_each_groups_extreme_on_the_lowest_code(scale_method):
    """weights.full_range (symmetric): scale = extreme / -2^(b-1) with the extreme's sign, so min-max maps the extreme
    to the lowest code exactly and its step is amax/8 at 4 bits, not amax/7; its error is lower than the plain
    symmetric grid's on Gaussian weights; MSE only shrinks it."""
    from qronos_onnx.formats import grid as G

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    full = make_int_grid(w, WeightQuantConfig(bits=4, symmetric=True, group_size=32, full_range=True,
                                              scale_method=scale_method))
    plain = make_int_grid(w, WeightQuantConfig(bits=4, symmetric=True, group_size=32, scale_method=scale_method))
    wg = G._grouped(w, 32)
    extreme = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    if scale_method == "minmax":
        assert torch.equal(full.scale, -extreme / 8)  # powers of two: exact in float32
        codes = full.codes(w)
        assert codes.min() == -8 and codes.max() <= 7
        assert torch.equal(G._grouped(codes, 32).gather(-1, wg.abs().argmax(-1, keepdim=True)),
                           torch.full(extreme.shape + (1,), -8.0))
    else:
        assert (full.scale.abs() <= extreme.abs() / 8 + 1e-7).all()
    assert torch.sign(full.scale).eq(-torch.sign(extreme)).all()
    err = lambda g: float((g.round(w) - w).pow(2).sum())  # noqa: E731
    assert err(full) < err(plain)
    with pytest.raises(Exception, match="full_range applies to symmetric"):
        WeightQuantConfig(bits=4, symmetric=False, full_range=True).validate()
