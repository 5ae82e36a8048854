"""onnxruntime CPU latency of a quantized causal LM against its float model, measured side by side.

Both sessions are created once; calls alternate between the models (interleaved) so that drift on a shared machine
hits both equally, and the table reports min and median over the repeats with the quantized/float ratio.
Full-sequence forward passes (no KV cache: the exported SmolLM2 takes input_ids only) of 1 and 64 tokens.

    .venv/bin/python bench/bench_latency.py FLOAT.onnx QUANT.onnx [--tokens 1 64] [--repeats 30] [--accuracy-level 4]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path: str, accuracy_level: str | None, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("float_model")
    p.add_argument("quant_model")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--accuracy-level", default="4", help="MatMulNBits accuracy level of the quantized session "
                                                          "(4 = int8 activations, onnxruntime's default; 0 = exact)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    sessions = {"float": session(args.float_model, None, args.threads),
                "quant": session(args.quant_model, args.accuracy_level, args.threads)}
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime "
          f"{ort.__version__}, {args.threads} intra-op threads, quant accuracy_level {args.accuracy_level}")
    print(f"float: {args.float_model}\nquant: {args.quant_model}\n")
    print("| tokens | float min ms | float median ms | quant min ms | quant median ms | ratio min | ratio median |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.tokens:
        ids = rng.integers(0, 49152, size=(1, n), dtype=np.int64)
        times = {k: [] for k in sessions}
        for k, s in sessions.items():  # warm-up
            s.run(None, {"input_ids": ids})
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"input_ids": ids})
                times[k].append((time.perf_counter() - t0) * 1e3)
        f, q = times["float"], times["quant"]
        print(f"| {n} | {min(f):.1f} | {statistics.median(f):.1f} | {min(q):.1f} | {statistics.median(q):.1f} | "
              f"{min(q) / min(f):.2f} | {statistics.median(q) / statistics.median(f):.2f} |")


if __name__ == "__main__":
    main()
