#!/usr/bin/env python
"""Where a decode step's time goes: onnxruntime's profiler over N decode steps (1 new token after PAST cached), summed
per operator type, for one KV-cache graph or genai folder.

    .venv/bin/python bench/decode_profile.py MODEL [--past 255] [--steps 30] [--threads 2]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_decode import decode_feed  # noqa: E402
from qronos_onnx.genai import is_genai_folder, resolve_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--past", type=int, default=255)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    path = resolve_model(args.model) if is_genai_folder(args.model) else args.model
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = decode_feed(sess, path, args.past)
        for _ in range(3 + args.steps):  # the first 3 are warm-up, left out below
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][3:]
    total_us = sum(e["dur"] for e in runs)
    first = min(e["ts"] for e in runs)
    per_op: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"]
            count[op] += 1
    steps = len(runs)
    print(f"{path}: {steps} decode steps, {total_us / steps / 1e3:.2f} ms per step (model_run), "
          f"{sum(per_op.values()) / steps / 1e3:.2f} ms in kernels")
    print("| op | ms per step | share | nodes per step |")
    print("|---|---:|---:|---:|")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"| {op} | {us / steps / 1e3:.3f} | {us / total_us:.1%} | {count[op] // steps} |")


if __name__ == "__main__":
    main()
