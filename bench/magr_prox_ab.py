#!/usr/bin/env python
"""MagR's proximal step: solving the soft threshold on each row's top entries (transforms/magr.py) against sorting
every row in full (the code before), side by side in one process, on SmolLM2-135M's weight shapes.

    .venv/bin/python bench/magr_prox_ab.py [--steps 50] [--repeats 3]

Random weights (N(0, 1/cols)) and a Gram matrix of 2048 random correlated inputs per shape; the same magr() call
runs with each prox, interleaved. Prints seconds per call and the largest difference between the two outputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qronos_onnx.transforms.magr as M  # noqa: E402

SHAPES = {"q/o_proj": (576, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536)}  # [rows, cols]


def full_sort_prox(V: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    a = V.abs()
    u = torch.sort(a, dim=-1, descending=True).values
    theta = M._soft_threshold(u, tau.to(V.dtype)[:, None, None].expand(*V.shape[:-1], 1)).clamp_min(0.0)
    return torch.minimum(a, theta) * torch.sign(V)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} MagR steps per call")
    print("| shape | full sort s | top entries s | ratio | max abs diff |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, (rows, cols) in SHAPES.items():
        W = torch.randn(1, rows, cols, generator=g) / cols ** 0.5
        mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
        X = torch.randn(2048, cols, generator=g) @ mix
        H = (X.T @ X / 2048)[None]
        times = {"full": [], "top": []}
        outs = {}
        for _ in range(args.repeats):
            for key, prox in (("full", full_sort_prox), ("top", M.linf_prox)):
                saved, M.linf_prox = M.linf_prox, prox
                try:
                    t0 = time.perf_counter()
                    outs[key] = M.magr(W, H, steps=args.steps)
                    times[key].append(time.perf_counter() - t0)
                finally:
                    M.linf_prox = saved
        f, t = statistics.median(times["full"]), statistics.median(times["top"])
        diff = float((outs["full"] - outs["top"]).abs().max())
        print(f"| {name} [{rows}, {cols}] | {f:.2f} | {t:.2f} | {f / t:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
