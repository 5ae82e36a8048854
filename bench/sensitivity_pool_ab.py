#!/usr/bin/env python
"""Seconds per candidate of the --target-bits probe, one pass at a time on ``capture.threads`` onnxruntime threads
(workers=1) against that many passes at once on one thread each (the default), interleaved in one process.

    .venv/bin/python bench/sensitivity_pool_ab.py smollm2 w4a4 16

Arguments: a bench model (bench/run.py's MODELS), a recipe, the number of candidates timed (spread over the graph),
and optionally the samples per pass (default 1). Prints each setting's seconds per candidate and its first three
errors, which should agree. The figures behind docs/mixed_precision.md "Cost" (0.37 against 0.30 s on SmolLM2 W4A4).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import run as benchrun  # noqa: E402
from qronos_onnx.calib.dataset import load_calibration  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from qronos_onnx.export.qdq import upgrade_opset  # noqa: E402
from qronos_onnx.graph.model import load_model  # noqa: E402
from qronos_onnx.graph.targets import find_targets  # noqa: E402
from qronos_onnx.precision import promote, resolve_plan  # noqa: E402
from qronos_onnx.precision import sensitivity as S  # noqa: E402


def main(argv: list[str]) -> int:
    model_name, recipe, n = argv[0], argv[1], int(argv[2])
    samples_per_pass = int(argv[3]) if len(argv) > 3 else 1
    paths = benchrun.MODELS[model_name].paths()
    model = load_model(str(paths["onnx"]))
    upgrade_opset(model, 21)
    targets = find_targets(model)
    tokenizer = str(paths["tokenizer"]) if "tokenizer" in paths else None
    samples = list(load_calibration(str(paths["calib"]), model, samples=4, tokenizer=tokenizer).samples)
    cfg = load_recipe(recipe).override({"precision.sensitivity_samples": samples_per_pass})
    plans = resolve_plan(targets, cfg)
    shared = any(plans[t.name].activations.enabled for t in targets)
    units = S._units(targets, by_tensor=shared)
    units = units[::max(1, len(units) // n)][:n]
    for workers in (1, 2, 1, 2):
        with S._Probe(model, targets, samples, plans, cfg, quiet=True) as probe:
            probe.workers = workers  # before any suffix session is built: 1 = one pass at a time on all threads
            probe.set_context(plans)
            jobs = [(u, {**plans, **{t.name: promote(plans[t.name]) for t in u}}) for u in units]
            for k in range(len(probe.suffixes)):  # sessions built and weights rounded outside the timing
                probe._runner(k)
            for u, p in jobs:
                probe._feeds(u, p)
            t0 = time.perf_counter()
            errs = probe.errors(jobs)
            print(f"workers {workers}: {(time.perf_counter() - t0) / len(jobs):.4f} s per candidate, first errors "
                  f"{errs[:3]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
