"""Single-rank figures behind docs/scaling.md: per-wave statistics and solve times on Llama-like layer shapes.

    python bench/bench_dist.py [--tokens 256] [--sizes 1024 2048 4096] [--solve-sizes 2048 4096]

Statistics: one StatsAccumulator.add (X~ᵀX~, X~ᵀX, XᵀX of one chunk of T tokens) per width N, float32 and float64.
Solve: round_weights on a [1, N, N] weight (rows = cols = N) with H, G from random correlated inputs, GPTQ and
Qronos, 4-bit per-channel. Prints one JSON line per measurement (best of --repeat); docs/scaling.md extrapolates.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qronos_onnx.capture.stats import StatsAccumulator  # noqa: E402
from qronos_onnx.config import RoundingConfig, WeightQuantConfig  # noqa: E402
from qronos_onnx.formats import make_grid  # noqa: E402
from qronos_onnx.rounding import round_weights  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--solve-sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    g = torch.Generator().manual_seed(0)
    for n in args.sizes:
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(1, args.tokens, n, generator=g).to(dtype)
            xq = x + 0.01 * torch.randn(1, args.tokens, n, generator=g).to(dtype)
            acc = StatsAccumulator(1, n, dtype=dtype)
            s = best(lambda: acc.add(xq, x), args.repeat)
            print(json.dumps({"what": "stats", "N": n, "tokens": args.tokens, "dtype": str(dtype)[6:],
                              "seconds": round(s, 4)}), flush=True)
            del acc, x, xq
    for n in args.solve_sizes:
        t = 4 * n  # enough tokens for a well-posed H
        mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
        x = torch.randn(t, n, generator=g) @ mix
        xq = x + 0.01 * torch.randn(t, n, generator=g)
        H = (xq.T @ xq / t)[None]
        G = (xq.T @ x / t)[None]
        W = (torch.randn(1, n, n, generator=g) / n ** 0.5)
        grid = make_grid(W, WeightQuantConfig(bits=4, group_size=0))
        for algo in ("gptq", "qronos"):
            cfg = RoundingConfig(algorithm=algo)
            s = best(lambda: round_weights(W, grid, H, G, cfg, n_tokens=[t]), 1)
            print(json.dumps({"what": "solve", "algo": algo, "rows": n, "cols": n, "dtype": "float32",
                              "seconds": round(s, 3)}), flush=True)
        del x, xq, H, G, mix
    return 0


if __name__ == "__main__":
    sys.exit(main())
