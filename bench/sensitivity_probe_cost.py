#!/usr/bin/env python
"""Seconds per pass of the --target-bits sensitivity probe on a CNN, per recipe (the figures behind
docs/mixed_precision.md "Cost" and the probe's `If` switches).

    .venv/bin/python bench/sensitivity_probe_cost.py --model ~/.cache/qronos-onnx/ppocr/ppocr_cls.onnx \
        --calib ~/.cache/qronos-onnx/ppocr/calib.npz --recipes w4 w4a4 mxfp4

Per recipe, in this process: building the probe, one whole-model pass in float (every switch off), one with every
target at its format (the first includes rounding every weight once, cached), and the mean of one partial pass per
candidate for the first 20 candidates (what each in-context measurement costs). Each pass runs
``precision.sensitivity_samples`` samples (unset: from the output size; 4 on the PP-OCR classifier). Printed, not
stored: compare recipes or commits side by side.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qronos_onnx.calib.dataset import load_calibration  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from qronos_onnx.export.qdq import upgrade_opset  # noqa: E402
from qronos_onnx.graph.model import load_model  # noqa: E402
from qronos_onnx.graph.targets import find_targets  # noqa: E402
from qronos_onnx.precision import promote, resolve_plan  # noqa: E402
from qronos_onnx.precision.sensitivity import _Probe, _units  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--samples", type=int, default=16, help="calibration samples loaded (default 16)")
    p.add_argument("--recipes", nargs="+", default=["w4", "w4a4", "mxfp4"])
    p.add_argument("--candidates", type=int, default=20)
    args = p.parse_args(argv)
    for recipe in args.recipes:
        model = load_model(args.model)
        upgrade_opset(model, 24 if recipe.startswith("mx") else 21)
        targets = find_targets(model)
        samples = list(load_calibration(args.calib, model, samples=args.samples).samples)
        cfg = load_recipe(recipe)
        plans = resolve_plan(targets, cfg)
        t0 = time.perf_counter()
        with _Probe(model, targets, samples, plans, cfg, quiet=True) as probe:
            t1 = time.perf_counter()
            probe.set_context(None)
            t2 = time.perf_counter()
            probe.set_context(plans)
            t3 = time.perf_counter()
            units = _units(targets)[: args.candidates]
            for u in units:
                probe.error(u, {**plans, **{t.name: promote(plans[t.name]) for t in u}})
            t4 = time.perf_counter()
        print(f"{recipe}: build {t1 - t0:.2f} s, float pass {t2 - t1:.3f} s, quantized pass (first, with rounding) "
              f"{t3 - t2:.3f} s, per candidate {(t4 - t3) / max(len(units), 1):.4f} s "
              f"({len(probe.samples)} samples, {len(units)} candidates)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
