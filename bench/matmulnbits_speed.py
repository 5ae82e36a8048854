#!/usr/bin/env python
"""onnxruntime CPU time of one MatMulNBits node at decode (M = 1 row) against the fp32 MatMul of the same weight, for
block sizes, symmetric (no zero points) or not, and accuracy levels 0 / 4: which int4 layout decodes fastest.

    .venv/bin/python bench/matmulnbits_speed.py [--shapes 576x1536,1536x576,576x49152] [--repeats 200] [--threads 2]

Every configuration of a shape is timed in one interleaved loop (medians in microseconds), so drift on a shared
machine hits all of them alike. Weights are random: the kernels' speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper


def _session(model: ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def float_model(k: int, n: int, rng) -> ModelProto:
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    node = helper.make_node("MatMul", ["a", "w"], ["y"])
    g = helper.make_graph([node], "mm", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def nbits_model(k: int, n: int, block: int, sym: bool, level: int, rng) -> ModelProto:
    blocks = k // block
    b = numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), "b")
    s = numpy_helper.from_array((0.01 * rng.random(n * blocks) + 0.001).astype(np.float32), "s")
    inits, inputs = [b, s], ["a", "b", "s"]
    if not sym:
        zp = numpy_helper.from_array(rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8), "zp")
        inits.append(zp)
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=level)
    g = helper.make_graph([node], "mmnb", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="576x1536,1536x576,576x49152", help="KxN, comma-separated")
    p.add_argument("--blocks", default="32,64,128")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, M = 1, medians of {args.repeats} "
          f"interleaved runs (us)\n")
    print("| K x N | layout | accuracy_level | median us | vs fp32 |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        k, n = (int(x) for x in shape.split("x"))
        configs = {("fp32 MatMul", "-"): float_model(k, n, rng)}
        for block in (int(x) for x in args.blocks.split(",")):
            if k % block:
                continue
            for sym in (True, False):
                for level in (0, 4):
                    configs[(f"int4 block {block} {'sym' if sym else 'asym'}", level)] = \
                        nbits_model(k, n, block, sym, level, rng)
        sessions = {key: _session(m, args.threads) for key, m in configs.items()}
        a = rng.standard_normal((1, k)).astype(np.float32)
        times = {key: [] for key in sessions}
        for i in range(args.repeats + 5):
            for key, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, {"a": a})
                if i >= 5:
                    times[key].append((time.perf_counter() - t0) * 1e6)
        base = statistics.median(times[("fp32 MatMul", "-")])
        for (layout, level), ts in times.items():
            med = statistics.median(ts)
            print(f"| {k}x{n} | {layout} | {level} | {med:.0f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
