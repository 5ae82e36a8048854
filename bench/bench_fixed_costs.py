#!/usr/bin/env python
"""Fixed costs on small CNNs: wall and process-CPU seconds of ``quantize()`` per model and algorithm.

    .venv/bin/python bench/bench_fixed_costs.py                      # ppocr + effnet-lite0, rtn + qronos
    .venv/bin/python bench/bench_fixed_costs.py --models ppocr --algos rtn --profile /tmp/prof
    .venv/bin/python bench/bench_fixed_costs.py --out-dir /tmp/fc     # keep the outputs (byte comparisons)

Models: the PP-OCR text-direction classifier (``tools/assets.py ppocr``; 16 samples of 8 lines = 128 images, the
bench grid's protocol) and a random-weight EfficientNet-Lite0-shaped CNN built here with torch (stem, 16 MBConv
blocks with ReLU6 and depthwise 3x3/5x5, 1x1 head to 1280, FC 1000: 49 Conv + 1 Gemm, 4.65 M weights; 224x224 input;
8 samples of 8 random images). Each run is one subprocess (``--worker``) so its CPU time is its own; the process CPU
time (all threads) is taken around ``quantize()`` only, after imports and model building. The output's SHA-256 is
printed so that runs before and after a change can be compared byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EFFNET_CACHE = Path(os.environ.get("QRONOS_BENCH_CACHE", Path.home() / ".cache" / "qronos-onnx" / "bench-effnet"))

# EfficientNet-Lite0 stages: (expand ratio, kernel, stride, out channels, repeats); no squeeze-excitation, ReLU6
LITE0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
         (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def build_effnet(dst: Path) -> tuple[Path, Path]:
    """A random-weight EfficientNet-Lite0-shaped CNN exported to ONNX, and an .npz of 8 x 8 random images."""
    import numpy as np
    import torch
    from torch import nn

    onnx_path, calib = dst / "effnet_lite0.onnx", dst / "calib.npz"
    if onnx_path.exists() and calib.exists():
        return onnx_path, calib
    dst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    def conv(cin, cout, k, s=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups)]
        return nn.Sequential(*layers, nn.ReLU6()) if act else layers[0]

    class MBConv(nn.Module):
        def __init__(self, cin, cout, e, k, s):
            super().__init__()
            mid = cin * e
            self.body = nn.Sequential(*([conv(cin, mid, 1)] if e != 1 else []), conv(mid, mid, k, s, groups=mid),
                                      conv(mid, cout, 1, act=False))
            self.skip = s == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.skip else y

    blocks, cin = [conv(3, 32, 3, 2)], 32
    for e, k, s, cout, n in LITE0:
        for i in range(n):
            blocks.append(MBConv(cin, cout, e, k, s if i == 0 else 1))
            cin = cout
    blocks += [conv(cin, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    net = nn.Sequential(*blocks).eval()
    x = torch.randn(1, 3, 224, 224)
    tmp = onnx_path.with_suffix(".tmp.onnx")
    torch.onnx.export(net, (x,), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    tmp.replace(onnx_path)
    rng = np.random.default_rng(0)
    np.savez(calib, input=rng.standard_normal((8, 8, 3, 224, 224), dtype=np.float32))
    return onnx_path, calib


def model_paths(name: str) -> tuple[Path, Path, int]:
    """(onnx, calibration .npz, samples) of a bench model."""
    if name == "ppocr":
        from qronos_onnx.eval.cache import ppocr_paths

        p = ppocr_paths()
        if not p.onnx.exists():
            raise SystemExit(f"{p.onnx} is missing: run `python tools/assets.py ppocr`")
        return p.onnx, p.dir / "calib.npz", 16
    if name == "effnet":
        onnx_path, calib = build_effnet(EFFNET_CACHE)
        return onnx_path, calib, 8
    raise SystemExit(f"unknown model {name!r}")


def worker(model: str, algo: str, out: Path, profile: str | None) -> dict:
    """One quantize() call; wall and process CPU seconds around it only."""
    from qronos_onnx import quantize
    from qronos_onnx.config import load_recipe

    onnx_path, calib, samples = model_paths(model)
    cfg = load_recipe("w4").override({"rounding.algorithm": algo, "capture.samples": samples})
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    res = quantize(onnx_path, str(calib), out, cfg, quiet=True, overwrite=True, checkpoint=False)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if prof:
        prof.dump_stats(profile)
    return {"model": model, "algo": algo, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "timings": {k: round(v, 2) for k, v in res.timings.items()},
            "sha256": hashlib.sha256(Path(out).read_bytes()).hexdigest(), "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ppocr", "effnet"], choices=["ppocr", "effnet"])
    ap.add_argument("--algos", nargs="+", default=["rtn", "qronos"], choices=["rtn", "gptq", "gpfq", "qronos"])
    ap.add_argument("--profile", metavar="DIR", help="write a cProfile dump per run into DIR")
    ap.add_argument("--out-dir", help="where the quantized models go (default: a temporary folder, deleted)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "ALGO", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker[:2], Path(args.worker[2]), args.profile_file)))
        return 0
    for m in args.models:  # build outside the timed workers
        model_paths(m)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for m in args.models:
            for a in args.algos:
                cmd = [sys.executable, __file__, "--worker", m, a, str(out_dir / f"{m}-{a}.onnx")]
                if args.profile:
                    Path(args.profile).mkdir(parents=True, exist_ok=True)
                    cmd += ["--profile-file", str(Path(args.profile) / f"{m}-{a}.prof")]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                row = json.loads(line)
                rows.append(row)
                print(json.dumps(row), flush=True)
        print("\n| model | algo | wall s | CPU s | stages (s) | load | sha256 |\n|---|---|---|---|---|---|---|")
        for r in rows:
            stages = ", ".join(f"{k} {v}" for k, v in r["timings"].items() if k != "total")
            print(f"| {r['model']} | {r['algo']} | {r['wall_s']} | {r['cpu_s']} | {stages} | {r['load']:.1f} | "
                  f"{r['sha256'][:12]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
