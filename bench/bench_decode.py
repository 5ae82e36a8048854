#!/usr/bin/env python
"""onnxruntime CPU latency of one decode step (1 new token after PAST cached tokens), float vs quantized, interleaved.

    .venv/bin/python bench/bench_decode.py FLOAT QUANT [--past 255] [--repeats 30] [--accuracy-level 4]

FLOAT and QUANT are KV-cache graphs (optimum with-past, the onnxruntime-genai builder's GQA graph, dynamo exports with a
cache) or onnxruntime-genai folders. The feeds are what a decode step gets: the new token, a mask of PAST + 1 ones,
its position, a past of PAST random key/values per layer, and genai's seqlens_k / total_sequence_length. The calls
alternate between the models so that drift on a shared machine hits both equally; min and median are reported with
the quantized/float ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qronos_onnx.calib.kv_cache import plan_prefill, specs_from_ort  # noqa: E402
from bench.bench_latency import session  # noqa: E402
from qronos_onnx.genai import is_genai_folder, kv_dims, resolve_model  # noqa: E402


def decode_feed(sess: ort.InferenceSession, model_file: str, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    plan = plan_prefill(specs_from_ort(sess.get_inputs()), [o.name for o in sess.get_outputs()],
                        what="decode feed", dims=kv_dims(model_file))
    rng = np.random.default_rng(seed)
    total = past + 1
    feed = {}
    for e in plan.entries:
        dt = e.spec.dtype
        if e.role == "input_ids":
            feed[e.name] = rng.integers(0, 1000, (1, 1)).astype(dt)
        elif e.role == "attention_mask":
            feed[e.name] = np.ones((1, total), dtype=dt)
        elif e.role == "position_ids":
            feed[e.name] = np.full((1, 1) if e.spec.rank in (None, 2) else (1,), past, dtype=dt)
        elif e.role == "cache_position":
            feed[e.name] = np.array([past], dtype=dt)
        elif e.role == "seqlens_k":
            feed[e.name] = np.array([total - 1], dtype=dt)
        elif e.role == "total_sequence_length":
            feed[e.name] = np.full([] if e.spec.rank == 0 else [1], total, dtype=dt)
        elif e.role == "past":
            shape = e.shape_for(1, 1)
            shape[e.past_axis] = past
            feed[e.name] = (0.1 * rng.standard_normal(shape)).astype(dt)
        else:
            feed[e.name] = e.build(np.zeros((1, 1), dtype=np.int64))
    return feed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("float_model")
    p.add_argument("quant_model")
    p.add_argument("--past", type=int, default=255)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--accuracy-level", default=None, help="session.qdq_matmulnbits_accuracy_level for QUANT")
    args = p.parse_args()
    files = [resolve_model(m) if is_genai_folder(m) else m for m in (args.float_model, args.quant_model)]
    sessions = [session(files[0], None, args.threads), session(files[1], args.accuracy_level, args.threads)]
    feeds = [decode_feed(s, f, args.past) for s, f in zip(sessions, files)]
    times: list[list[float]] = [[], []]
    for i in range(args.warmup + args.repeats):
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            if i >= args.warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    sizes = [sum(f.stat().st_size for f in Path(x).parent.glob(Path(x).name + "*")) for x in files]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, {args.threads} "
          f"intra-op threads, quant accuracy_level {args.accuracy_level or 'default'}")
    for name, x, size in zip(("float", "quant"), files, sizes):
        print(f"{name}: {x} ({size / 1e6:.1f} MB with its data)")
    fmin, fmed = min(times[0]), statistics.median(times[0])
    qmin, qmed = min(times[1]), statistics.median(times[1])
    print("\n| step | float min ms | float median ms | quant min ms | quant median ms | ratio min | ratio median |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| decode 1 token, {args.past} past | {fmin:.1f} | {fmed:.1f} | {qmin:.1f} | {qmed:.1f} | "
          f"{qmin / fmin:.2f} | {qmed / fmed:.2f} |")


if __name__ == "__main__":
    main()
