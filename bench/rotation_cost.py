#!/usr/bin/env python
"""What a rotation costs at run time: file size, float rotation MatMuls and onnxruntime CPU latency of one format
written unrotated, with online rotations and with fused rotations, measured side by side.

    .venv/bin/python bench/rotation_cost.py --recipe w4a4 [--recipe mxfp4 ...] [--modes none online fused] \
        [--samples 4] [--tokens 1 64] [--repeats 30] [--out bench/results/rotation_cost.md]

Each (recipe, mode) output is written by RTN from a few calibration windows of SmolLM2-135M (latency and size do
not depend on the rounding algorithm or on how much data is used). Then every output and the float model get one
onnxruntime CPU session each (default optimizations, MatMulNBits accuracy level 0 as in the bench grid) and the calls
alternate between them, so the box's load falls on all alike; min and median milliseconds over the repeats are
printed with the ratio to the float model. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import run as benchrun  # noqa: E402
from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402


def _session(path: str, threads: int, accuracy_level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", required=True)
    p.add_argument("--modes", nargs="+", default=["none", "online", "fused"])
    p.add_argument("--samples", type=int, default=4, help="calibration windows of 256 tokens")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--accuracy-level", default="0")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="also write the tables here (markdown)")
    args = p.parse_args(argv)

    bm = benchrun.MODELS["smollm2"]
    paths = bm.paths()
    import onnxruntime as ort

    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime "
             f"{ort.__version__}, {args.threads} intra-op threads, accuracy_level {args.accuracy_level}, "
             f"{args.repeats} interleaved repeats",
             f"command: bench/rotation_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        outputs: dict[str, dict] = {"float": {"path": str(paths["onnx"]), "bytes": _size(paths["onnx"]),
                                              "rotations": 0, "fell_back": ""}}
        for recipe in args.recipe:
            for mode in args.modes:
                cfg = load_recipe(recipe).override({"capture.samples": args.samples, "capture.seq_len": 256,
                                                    "rounding.algorithm": "rtn", "transforms.rotate": mode,
                                                    "transforms.magr": None})
                out = Path(tmp) / f"{recipe}-{mode}.onnx"
                t0 = time.perf_counter()
                res = quantize(str(paths["onnx"]), str(paths["calib"]), out, cfg, tokenizer=str(paths["tokenizer"]),
                               overwrite=True, quiet=True, checkpoint=False)
                notes = " ".join(str(n) for n in res.transforms.get("notes", []))
                outputs[f"{recipe}/{mode}"] = {"path": str(out), "bytes": res.output_bytes,
                                               "rotations": res.transforms.get("float_rotation_nodes", 0),
                                               "fell_back": "yes" if "fall" in notes.lower() else ""}
                print(f"{recipe}/{mode}: {time.perf_counter() - t0:.0f} s, {res.output_bytes / 1e6:.1f} MB, "
                      f"{outputs[f'{recipe}/{mode}']['rotations']} float rotation MatMuls", flush=True)
        sessions = {k: _session(v["path"], args.threads, args.accuracy_level) for k, v in outputs.items()}
        rng = np.random.default_rng(0)
        lines += ["| output | MB | float rotation MatMuls | " + " | ".join(
            f"{n} tok min ms | {n} tok median ms | {n} tok ratio (median)" for n in args.tokens) + " |",
            "|---|---:|---:|" + "---:|---:|---:|" * len(args.tokens)]
        timings: dict[int, dict[str, list[float]]] = {}
        for n in args.tokens:
            ids = rng.integers(0, 49152, size=(1, n), dtype=np.int64)
            t = {k: [] for k in sessions}
            for s in sessions.values():
                s.run(None, {"input_ids": ids})
            for _ in range(args.repeats):
                for k, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, {"input_ids": ids})
                    t[k].append((time.perf_counter() - t0) * 1e3)
            timings[n] = t
        for k, v in outputs.items():
            cells = []
            for n in args.tokens:
                t, f = timings[n][k], timings[n]["float"]
                cells.append(f"{min(t):.1f} | {statistics.median(t):.1f} | "
                             f"{statistics.median(t) / statistics.median(f):.2f}")
            lines.append(f"| {k}{' (fell back to online)' if v['fell_back'] else ''} | {v['bytes'] / 1e6:.1f} | "
                         f"{v['rotations']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _size(path) -> int:
    path = Path(path)
    data = [f for f in path.parent.iterdir() if f.name.startswith(path.name) and f != path]
    return path.stat().st_size + sum(f.stat().st_size for f in data if f.suffix == ".data")


if __name__ == "__main__":
    sys.exit(main())
