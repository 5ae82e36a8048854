"""Solver time per layer, GPTQ vs Qronos side by side (and optionally RTN/GPFQ), on Llama-shaped weights.

Run by hand, not a test:

    .venv/bin/python bench/bench_solver.py --quick            # 2048-wide Llama-3.2-1B shapes, a few minutes on CPU
    .venv/bin/python bench/bench_solver.py --shapes 4096x4096,4096x14336 --device cuda

Shapes are ROWSxCOLS in solver layout (rows = output features, cols = input features = the size of H). H and G are
synthetic but shaped like real statistics: H = Z^T Z / r + diag(d) is the Gram of r low-rank "tokens" plus
independent per-feature noise of random strength (SPD, condition number ~1e3), and G = H + a low-rank drift
(X~ != X). The time is the whole ``round_weights`` call: copies, ordering, damping (power iteration for Qronos),
factorization and the column loop. Results are appended as markdown to bench/results/solver.md with the command
line and the machine, unless --no-write.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qronos_onnx.config import RoundingConfig, WeightQuantConfig  # noqa: E402
from qronos_onnx.formats.grid import make_int_grid  # noqa: E402
from bench.machine_info import cpu_name  # noqa: E402
from qronos_onnx.rounding import core, round_weights  # noqa: E402

LLAMA_1B = ["2048x2048", "8192x2048", "2048x8192"]  # q/o_proj, up/gate_proj, down_proj
LLAMA_8B = ["4096x4096", "14336x4096", "4096x14336"]
QUICK = ["2048x2048"]


def synthetic_stats(cols: int, rank: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(rank, cols, generator=g).to(device)
    d = (0.01 + torch.rand(cols, generator=g)).to(device)
    H = Z.T @ Z / rank
    H.diagonal().add_(d)
    Y = torch.randn(rank // 8, cols, generator=g).to(device)
    G = H + 0.05 * (Y.T @ Z[: rank // 8]) / rank
    return H[None], G[None]


def time_call(W, grid, H, G, cfg, device) -> tuple[float, float, dict]:
    """Wall seconds and process CPU seconds of one call (CPU time is robust to other jobs on a shared box when
    torch runs one thread; with several threads it also counts OpenMP spin-waits)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    c0, t0 = time.process_time(), time.perf_counter()
    res = round_weights(W, grid, H, G, cfg, device=device)  # returns CPU codes: includes the sync
    return time.perf_counter() - t0, time.process_time() - c0, res.info[0]


def breakdown(W, grid, H, G, device) -> list[str]:
    """Process CPU seconds of each phase of Qronos (the GPTQ phases are the same minus the marked ones)."""
    K, N = W.shape[-2:]
    rows = []

    def timed(name, fn):
        c0 = time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append(f"| {name} | {time.process_time() - c0:.2f} |")
        return out

    prep = timed("prepare: copies, dead inputs, act-order permutation of H", lambda: core.prepare(
        W, grid, H, G, None, act_order=True, dtype=torch.float32, device=device))
    lam = timed("Qronos only: sigma_max power iteration (30 steps)",
                lambda: 1e-6 * core.sigma_max(prep.H, perm=prep.perm))
    fac = timed("factor: chol(H + lam I), cholesky_inverse, chol(c M)/sqrt(c)",
                lambda: core.damped_inverse(prep.H, lam))
    if K > N:
        C = timed("Qronos only: (G^T + lam I) U^T (triangular, N^3)", lambda: core.times_upper_t(prep.G.mT, fac.U))
        y = timed("Qronos only: W0 C (dense, 2 K N^2)", lambda: prep.W0 @ C)
    else:
        r = timed("Qronos only: W0 G^T (dense, 2 K N^2)", lambda: prep.W0_orig @ prep.G_orig.mT)
        y = timed("Qronos only: r U^T (triangular, K N^2)", lambda: core.times_upper_t(r, fac.U))
    diag = torch.diagonal(fac.U, dim1=-2, dim2=-1)
    timed(f"column loop, lazy blocks of {core.block_size(0, N)} (GPTQ form)", lambda: core.lazy_round(
        prep.V.clone(), fac.U, prep.grid, start=0, block=core.block_size(0, N), err_scale=1.0 / diag))
    timed("column loop, Qronos form (offset, first value)", lambda: core.lazy_round(
        y * diag[:, None, :], fac.U, prep.grid, start=0, block=core.block_size(0, N), err_scale=1.0 / diag,
        offset=y, first_value=y[..., 0]))
    return rows


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} visible cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", help="comma-separated ROWSxCOLS (default: the Llama-3.2-1B shapes; "
                                     "'all' adds the Llama-3.1-8B ones, which need ~6 GB RAM per matrix set)")
    ap.add_argument("--quick", action="store_true", help="only 2048x2048, one repeat")
    ap.add_argument("--groups", default="0,128", help="comma-separated group sizes (0 = per channel)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--algorithms", default="gptq,qronos")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per algorithm (the minimum is reported)")
    ap.add_argument("--rank", type=int, default=256, help="tokens of the synthetic low-rank part of H")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "solver.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time each solver phase (first shape, per channel)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        shapes = QUICK
    elif args.shapes == "all":
        shapes = LLAMA_1B + LLAMA_8B
    elif args.shapes:
        shapes = args.shapes.split(",")
    else:
        shapes = LLAMA_1B
    groups = [int(g) for g in args.groups.split(",")]
    algorithms = args.algorithms.split(",")

    header = "| shape (rows x cols) | grid | " + " | ".join(f"{a} wall s | {a} cpu s" for a in algorithms)
    has_ratio = "gptq" in algorithms and "qronos" in algorithms
    header += " | qronos/gptq wall | qronos/gptq cpu |" if has_ratio else " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    phases: list[str] = []  # the --breakdown table, written after the main one
    print(header, flush=True)
    for shape in shapes:
        rows, cols = (int(v) for v in shape.lower().split("x"))
        H, G = synthetic_stats(cols, args.rank, device)
        W = torch.randn(1, rows, cols, generator=torch.Generator().manual_seed(1)) * 0.02
        for gs in groups:
            grid = make_int_grid(W, WeightQuantConfig(bits=args.bits, group_size=gs))
            wall, cpu = {}, {}
            for _ in range(max(1, 1 if args.quick else args.repeats)):
                for a in algorithms:  # interleaved, so load changes hit both alike
                    t, c, info = time_call(W, grid, H, G, RoundingConfig(algorithm=a), device)
                    assert info["status"] == "ok", info
                    wall[a] = min(wall.get(a, float("inf")), t)
                    cpu[a] = min(cpu.get(a, float("inf")), c)
            label = f"int{args.bits} " + ("per-channel" if gs == 0 else f"group {gs}")
            row = f"| {rows}x{cols} | {label} | " + " | ".join(f"{wall[a]:.2f} | {cpu[a]:.2f}" for a in algorithms)
            if has_ratio:
                row += f" | {wall['qronos'] / wall['gptq']:.2f} | {cpu['qronos'] / cpu['gptq']:.2f} |"
            else:
                row += " |"
            print(row, flush=True)
            lines.append(row)
        if args.breakdown and shape == shapes[0]:
            grid = make_int_grid(W, WeightQuantConfig(bits=args.bits))
            extra = breakdown(W, grid, H, G, device)
            print("\n".join(extra), flush=True)
            phases = ["", f"Phases of one {rows}x{cols} per-channel solve (process CPU seconds):", "",
                      "| phase | cpu s |", "|---|---|", *extra]
        del H, G, W

    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        args_given = argv if argv is not None else sys.argv[1:]
        cmd = " ".join([".venv/bin/python", "bench/bench_solver.py", *args_given])
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        block = [f"## {stamp}: `{cmd}`", "", f"Machine: {machine(device)}; torch {torch.__version__}; "
                 f"device {device}; best of {1 if args.quick else args.repeats} run(s).", "", *lines, *phases, ""]
        new = not out.exists()
        with out.open("a") as fh:
            if new:
                fh.write("# Solver benchmark (bench/bench_solver.py)\n\nSeconds per layer for one `round_weights` "
                         "call (B = 1), synthetic SPD statistics; see the script's docstring.\n\n")
            fh.write("\n".join(block) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
