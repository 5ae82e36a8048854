#!/usr/bin/env python
"""Data-free weight-only RTN beside onnxruntime's own MatMulNBits quantizer, on SmolLM2-135M.

    .venv/bin/python bench/bench_rtn.py                  # the table of bench/results/rtn_datafree.md
    .venv/bin/python bench/bench_rtn.py --only qronos-g128 --profile /tmp/rtn.prof

Each row is one subprocess (``--worker``): wall and process CPU seconds (all threads) of the quantizer call alone,
from the float file on disk to the quantized file on disk (loading, quantizing, writing; qronos-onnx also runs its
preflight onnxruntime load and its validation of the written file). The rows:

- ``ort-b128``: ``MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=False)``, its default
  ``DefaultWeightOnlyQuantConfig`` (MatMul only), then ``save_model_to_file``.
- ``qronos-g128``: ``quantize(model, None, out, w4 + algo rtn, group_size 128, dialect matmulnbits, embeddings
  float, lm_head float)``: the same set of weights in the same form as onnxruntime's.
- ``qronos-w4``: the deployment defaults of ``--w4 --algo rtn`` without ``--calib`` (per-channel QDQ, the tied head
  untied and quantized, 8-bit embedding table).
"""
from __future__ import annotations

import argparse
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

ROWS = ("ort-b128", "qronos-g128", "qronos-w4")


def _file_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def worker(row: str, model: Path, out: Path, profile: str | None) -> dict:
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    if row == "ort-b128":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        wall0, cpu0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        q = MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=128, is_symmetric=False)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
    else:
        from qronos_onnx import quantize
        from qronos_onnx.config import load_recipe

        over = {"rounding.algorithm": "rtn"}
        if row == "qronos-g128":
            over.update({"weights.group_size": 128, "export.dialect": "matmulnbits", "embeddings.bits": "float",
                         "embeddings.lm_head": "float"})
        cfg = load_recipe("w4").override(over)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        quantize(model, None, out, cfg, quiet=True, overwrite=True)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if prof:
        prof.dump_stats(profile)
    return {"row": row, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "output_mb": round(_file_mb(out), 1),
            "load": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="float ONNX model (default: the SmolLM2 of tools/assets.py smollm2)")
    ap.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each row (the table gives each)")
    ap.add_argument("--profile", metavar="FILE", help="cProfile dump of the (single) row run")
    ap.add_argument("--worker", nargs=3, metavar=("ROW", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        row, model, out = args.worker
        print(json.dumps(worker(row, Path(model), Path(out), args.profile)))
        return 0
    if args.model:
        model = Path(args.model)
    else:
        from qronos_onnx.eval.cache import smollm2_paths

        model = smollm2_paths().onnx
    if not model.exists():
        raise SystemExit(f"{model} is missing: run `python tools/assets.py smollm2`")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for row in args.only:
                cmd = [sys.executable, __file__, "--worker", row, str(model), str(Path(tmp) / f"{row}.onnx")]
                if args.profile:
                    cmd += ["--profile", args.profile]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{row} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| row | wall s | CPU s | output MB | load avg (1 min) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['wall_s']} | {r['cpu_s']} | {r['output_mb']} | {r['load']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
