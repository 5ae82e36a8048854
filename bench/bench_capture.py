"""Capture cost vs depth: the segment engine against a naive prefix re-run, in the same run, on synthetic decoders.

Run by hand, not a test:

    .venv/bin/python bench/bench_capture.py                      # 6, 12, 24, 48 blocks, d=256: a few minutes on 2 cores
    .venv/bin/python bench/bench_capture.py --blocks 6 12 --no-write

The model is a pre-norm decoder stack built with onnx.helper (RMSNorm, single-head causal attention with an additive
mask read by every block, SiLU-gated MLP, final norm and an untied head that the capture prunes). Both captures see
the same calibration set and the same 4-bit RTN rounding after every wave, in float reference mode:

- engine: CaptureEngine (segments; each stream advances one segment per wave).
- naive: for each wave, one session for the whole prefix from the graph inputs to the wave's inputs, run with the
  quantized weights (X~) and with the float weights (X), as whole-model GPxQ or per-layer sub-model extraction do.

Reported: wall time per block, node executions relative to two plain forward passes over the calibration set, and
the largest relative difference between the two captures' H (they compute the same thing). Results are appended as
markdown to bench/results/capture.md with the command line and the machine, unless --no-write.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qronos_onnx.capture import CaptureEngine, SegmentRunner, StatsAccumulator  # noqa: E402
from qronos_onnx.capture.runner import make_chunks, value_map  # noqa: E402
from qronos_onnx.capture.stats import finalize, tokens  # noqa: E402
from qronos_onnx.config import CaptureConfig  # noqa: E402
from qronos_onnx.graph.model import read_initializer  # noqa: E402
from qronos_onnx.graph.schedule import build_schedule, closure_segment  # noqa: E402
from qronos_onnx.graph.targets import find_targets  # noqa: E402


def decoder(n_blocks: int, d: int, ffn: int, vocab: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def w(name, shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32),
                                             name))
        return name

    def rmsnorm(x, p):
        inits.append(numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), p + "g"))
        nodes.extend([
            helper.make_node("Mul", [x, x], [p + "sq"], name=p + "sq"),
            helper.make_node("ReduceMean", [p + "sq", "axes_last"], [p + "ms"], keepdims=1, name=p + "ms"),
            helper.make_node("Add", [p + "ms", "eps"], [p + "mse"], name=p + "mse"),
            helper.make_node("Sqrt", [p + "mse"], [p + "rms"], name=p + "rms"),
            helper.make_node("Div", [x, p + "rms"], [p + "n"], name=p + "div"),
            helper.make_node("Mul", [p + "n", p + "g"], [p + "out"], name=p + "scale"),
        ])
        return p + "out"

    inits += [numpy_helper.from_array(np.array(1.0 / np.sqrt(d), np.float32), "inv_sqrt_d"),
              numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
              numpy_helper.from_array(np.array([-1], np.int64), "axes_last")]
    h = "x"
    for b in range(n_blocks):
        p = f"b{b}_"
        a = rmsnorm(h, p + "ln1_")
        nodes += [
            helper.make_node("MatMul", [a, w(p + "wq", (d, d))], [p + "q"], name=p + "q_proj"),
            helper.make_node("MatMul", [a, w(p + "wk", (d, d))], [p + "k"], name=p + "k_proj"),
            helper.make_node("MatMul", [a, w(p + "wv", (d, d))], [p + "v"], name=p + "v_proj"),
            helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 2, 1], name=p + "kt"),
            helper.make_node("MatMul", [p + "q", p + "kt"], [p + "s0"], name=p + "scores"),
            helper.make_node("Mul", [p + "s0", "inv_sqrt_d"], [p + "s1"], name=p + "scale"),
            helper.make_node("Add", [p + "s1", "mask"], [p + "s2"], name=p + "mask_add"),
            helper.make_node("Softmax", [p + "s2"], [p + "att"], axis=-1, name=p + "softmax"),
            helper.make_node("MatMul", [p + "att", p + "v"], [p + "ctx"], name=p + "attn"),
            helper.make_node("MatMul", [p + "ctx", w(p + "wo", (d, d))], [p + "o"], name=p + "o_proj"),
            helper.make_node("Add", [h, p + "o"], [p + "h1"], name=p + "res1"),
        ]
        m = rmsnorm(p + "h1", p + "ln2_")
        nodes += [
            helper.make_node("MatMul", [m, w(p + "wg", (d, ffn))], [p + "g"], name=p + "gate_proj"),
            helper.make_node("MatMul", [m, w(p + "wu", (d, ffn))], [p + "u"], name=p + "up_proj"),
            helper.make_node("Sigmoid", [p + "g"], [p + "gs"], name=p + "sig"),
            helper.make_node("Mul", [p + "g", p + "gs"], [p + "silu"], name=p + "silu"),
            helper.make_node("Mul", [p + "silu", p + "u"], [p + "gu"], name=p + "glu"),
            helper.make_node("MatMul", [p + "gu", w(p + "wd", (ffn, d))], [p + "dn"], name=p + "down_proj"),
            helper.make_node("Add", [p + "h1", p + "dn"], [p + "out"], name=p + "res2"),
        ]
        h = p + "out"
    f = rmsnorm(h, "final_")
    nodes.append(helper.make_node("MatMul", [f, w("lm_head_w", (d, vocab))], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["seq", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="bench")
    model.ir_version = 8
    return model


def calibration(n: int, seq: int, d: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    mask = np.triu(np.full((seq, seq), -1e4, np.float32), k=1)
    return [{"x": rng.standard_normal((1, seq, d)).astype(np.float32), "mask": mask} for _ in range(n)]


def rtn4(w: np.ndarray, target) -> np.ndarray:
    """4-bit asymmetric per-output-channel RTN in ONNX layout (what the quantized stream needs, cheaply)."""
    m = target.to_matrix(w)
    lo, hi = m.amin(-1, keepdim=True), m.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / 15
    q = torch.round((m - lo) / scale).clamp(0, 15) * scale + lo
    return target.from_matrix(q).numpy().astype(w.dtype)


def engine_capture(model, targets, samples, cfg):
    by_weight = {t.weight_name: t for t in targets}
    H = {}
    t0 = time.perf_counter()
    t_round = 0.0
    with CaptureEngine(model, targets, samples, cfg, quiet=True) as engine:
        for _, stats in engine.waves():
            tic = time.perf_counter()
            new = {n: rtn4(read_initializer(model.graph.initializers[n]), by_weight[n]) for n in stats}
            t_round += time.perf_counter() - tic
            engine.set_weights(new)
            H.update({n: s.H for n, s in stats.items()})
    seconds = time.perf_counter() - t0 - t_round  # capture only: the rounding is the same in both arms
    execs = sum(engine.node_executions.values())
    return seconds, execs, engine.forward_pass_nodes, H, dict(engine.seconds)


def naive_capture(model, targets, samples, cfg):
    """Whole quantized prefix and whole float prefix from the graph inputs, for every wave."""
    t0 = time.perf_counter()
    sched = build_schedule(model, targets)  # only for the wave grouping
    values = value_map(model.graph)
    by_weight = {t.weight_name: t for t in targets}
    weight_names = set(by_weight)
    chunks = make_chunks(samples, sched.graph_inputs, values, cfg.batch_size)
    graph_inputs = {v.name for v in model.graph.inputs}
    quant_w: dict[str, np.ndarray] = {}
    execs, H, t_round, t_ort = 0, {}, 0.0, 0.0
    for wave in sched.waves:
        if not wave:
            continue
        names = sorted({t.input_name for t in wave} - graph_inputs)
        seg = closure_segment(model, names, weight_names) if names else None
        runner = SegmentRunner(model, seg, chunks[0].feeds) if seg else None
        w_float = {n: read_initializer(values[n]) for n in (seg.weights if seg else [])}
        w_quant = {n: quant_w.get(n, a) for n, a in w_float.items()}
        groups: dict[tuple, list] = {}
        for t in wave:
            groups.setdefault((t.input_name, t.conv), []).append(t)
        accs = {k: StatsAccumulator(ts[0].groups, ts[0].in_features) for k, ts in groups.items()}
        for chunk in chunks:
            q = dict(chunk.feeds)
            f = dict(chunk.feeds)
            if runner is not None:
                tic = time.perf_counter()
                q.update(runner.run(chunk.feeds, w_quant))
                f.update(runner.run(chunk.feeds, w_float))
                t_ort += time.perf_counter() - tic
                execs += 2 * len(seg.nodes)
            for (name, _), ts in groups.items():
                accs[(name, ts[0].conv)].add(tokens(q[name], ts[0], "cpu", torch.float32),
                                             tokens(f[name], ts[0], "cpu", torch.float32))
        for key, ts in groups.items():
            stats = finalize([accs[key]])
            for t in ts:
                H[t.weight_name] = stats.H
        tic = time.perf_counter()
        for t in wave:
            quant_w[t.weight_name] = rtn4(read_initializer(values[t.weight_name]), t)
        t_round += time.perf_counter() - tic
    return time.perf_counter() - t0 - t_round, execs, H, t_ort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[6, 12, 24, 48])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads for the statistics (1 by default: on an oversubscribed 2-core box every "
                         "small multi-threaded torch op waits ~10 ms at its OpenMP barrier)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)

    samples = calibration(args.samples, args.seq, args.d)
    cfg = CaptureConfig(batch_size=args.batch_size)
    rows = []
    for n in args.blocks:
        proto = decoder(n, args.d, args.ffn, args.vocab)
        model = ir.serde.deserialize_model(proto)
        targets = [t for t in find_targets(model) if t.name != "lm_head"]
        e_s, e_execs, fwd, e_H, parts = engine_capture(model, targets, samples, cfg)
        n_s, n_execs, n_H, n_ort = naive_capture(model, targets, samples, cfg)
        diff = max(float((e_H[k] - n_H[k]).abs().max() / n_H[k].abs().max()) for k in e_H)
        rows.append((n, len(targets), e_s, e_execs / (2 * fwd), n_s, n_execs / (2 * fwd), diff, parts, n_ort))
        print(f"{n:3d} blocks: engine {e_s:7.2f} s ({e_s / n:.3f} s/block, {e_execs / (2 * fwd):.2f}x two forwards; "
              f"build {parts['build']:.1f} s, ort {parts['ort']:.1f} s, stats {parts['stats']:.1f} s) | naive "
              f"{n_s:7.2f} s ({n_s / n:.3f} s/block, {n_execs / (2 * fwd):.2f}x, ort {n_ort:.1f} s) | speedup "
              f"{n_s / e_s:5.1f}x | "
              f"max rel diff of H {diff:.1e}", flush=True)

    lines = [
        f"## capture vs naive prefix re-run, {datetime.date.today().isoformat()}",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; CPU execution provider; "
        f"d={args.d}, ffn={args.ffn}, {args.samples} samples x {args.seq} tokens, batch {args.batch_size}, "
        f"{args.torch_threads} torch thread(s); "
        "4-bit RTN after every wave (its time is excluded from both arms); float reference. "
        f"Load average at the end: {os.getloadavg()[0]:.1f} (the machine is shared; times are noisy, the node "
        "execution ratios are exact).",
        "",
        "| blocks | targets | engine s | engine s/block | engine onnxruntime s | engine node execs / 2 fwd "
        "| naive s | naive s/block | naive onnxruntime s | naive node execs / 2 fwd | naive / engine time "
        "| max rel diff H |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, nt, e_s, e_r, n_s, n_r, diff, parts, n_ort in rows:
        lines.append(f"| {n} | {nt} | {e_s:.2f} | {e_s / n:.3f} | {parts['ort']:.2f} | {e_r:.2f} | {n_s:.2f} | "
                     f"{n_s / n:.3f} | {n_ort:.2f} | {n_r:.2f} | {n_s / e_s:.1f}x | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        out = Path(__file__).resolve().parent / "results" / "capture.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        header = "" if out.exists() else (
            "# Capture benchmark\n\nWritten by `bench/bench_capture.py`; see its docstring for what is measured.\n\n")
        with out.open("a") as fh:
            fh.write(header + text + "\n")
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
