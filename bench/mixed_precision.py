#!/usr/bin/env python
"""--target-bits against the rules users apply today, at the same bits, on an image classifier.

    .venv/bin/python bench/mixed_precision.py --model M.onnx --calib calib.npz --images test.npz \
        --recipe w4a4 --target-bits 5 --name ppocr_cls-w4a4

Rows: float; the uniform recipe; "first/last at 8": the first and the last target promoted (int4 -> int8 weights,
and their activation quantizer with them); "depthwise at 8": every depthwise Conv promoted; --target-bits at the
budget asked for and at each rule's own average bits (same bits, measured sensitivity instead of the rule), with
the first of --methods; the other methods at the first budget only.
Each quantization runs in this process; the table (top-1, average weight bits counted as precision/plan.py counts
them, quantization time, sensitivity time) goes to bench/results/mixed_<name>.md and .json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from qronos_onnx.eval.report import EvalData, EvalOptions, evaluate  # noqa: E402
from qronos_onnx.graph.model import load_model  # noqa: E402
from qronos_onnx.graph.targets import find_targets  # noqa: E402
from qronos_onnx.precision import promote, resolve_plan  # noqa: E402


def rule_for(names: list[str], plan) -> list[dict]:
    up = promote(plan)
    if up is None:
        raise SystemExit(f"the recipe's format {plan.weight_label()} has no promotion")
    return [{"match": f"^{re.escape(n)}$", "float": False, "weights": dataclasses.asdict(up.weights),
             "activations": dataclasses.asdict(up.activations)} for n in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--images", help=".npz with input and label (the classify task test set; default MNIST test)")
    p.add_argument("--recipe", required=True)
    p.add_argument("--algo", default="qronos")
    p.add_argument("--target-bits", type=float, action="append", required=True)
    p.add_argument("--samples", type=int)
    p.add_argument("--methods", default="in-context",
                   help="comma-separated precision.sensitivity methods for the --target-bits rows "
                        "(in-context, isolated); the first runs at every budget, the others at the first budget")
    p.add_argument("--name", required=True)
    args = p.parse_args(argv)

    base = load_recipe(args.recipe).override({"rounding.algorithm": args.algo,
                                              **({"capture.samples": args.samples} if args.samples else {})})
    model = load_model(args.model)
    targets = find_targets(model)
    plan = resolve_plan(targets, base)[targets[0].name]
    depthwise = [t.name for t in targets if t.op_type == "Conv" and t.conv.group > 1 and t.weight_shape[1] == 1]
    rows: list[dict] = []
    data = EvalData(EvalOptions(images=args.images))

    def score(path: str) -> float:
        res = evaluate(path, ["classify"], data.options, data)
        return float(res["classify"]["metrics"]["top1"])

    rows.append({"setting": "float", "top1": score(args.model), "bits": 32.0})
    print(f"float: {rows[-1]['top1']:.4f}", flush=True)
    settings = [("uniform " + args.recipe, base)]
    settings.append(("rule: first/last at 8", base.override({"precision.layers": rule_for(
        [targets[0].name, targets[-1].name], plan)})))
    if depthwise:
        settings.append((f"rule: depthwise at 8 ({len(depthwise)})",
                         base.override({"precision.layers": rule_for(depthwise, plan)})))
    budgets = list(args.target_bits)
    with tempfile.TemporaryDirectory() as tmp:
        def run(label: str, cfg) -> dict:
            out = Path(tmp) / "q.onnx"
            t0 = time.perf_counter()
            res = quantize(args.model, args.calib, out, cfg, overwrite=True, quiet=True, checkpoint=False)
            seconds = time.perf_counter() - t0
            row = {"setting": label, "top1": score(str(out)), "bits": res.precision["weight_bits_average"],
                   "seconds": round(seconds, 1), "sensitivity_seconds": round(res.timings.get("sensitivity", 0), 1),
                   "promoted": res.precision.get("promoted", []), "bytes": res.output_bytes}
            print(f"{label}: top1 {row['top1']:.4f} at {row['bits']:.3f} bits, {seconds:.1f}s", flush=True)
            return row

        for label, cfg in settings:
            rows.append(run(label, cfg))
            if label.startswith("rule"):
                budgets.append(rows[-1]["bits"] + 1e-6)
        methods = args.methods.split(",")
        for b in budgets:
            for i, method in enumerate(methods):
                if i and b != budgets[0]:
                    continue
                label = f"--target-bits {b:.3f}" + (f" ({method})" if len(methods) > 1 else "")
                rows.append(run(label, base.override({"precision.target_bits": b,
                                                      "precision.sensitivity": method})))

    out_md = REPO / "bench" / "results" / f"mixed_{args.name}.md"
    lines = [f"# Mixed precision on {Path(args.model).name}: {args.recipe} ({args.algo})", "",
             "Command: `.venv/bin/python bench/mixed_precision.py " + " ".join(argv or sys.argv[1:]) + "`", "",
             f"Calibration {args.calib}, test {args.images}; bits = average storage bits per target weight (scales "
             "and zero points counted); promotions to the next precision of the family (int4 -> int8, MXFP4 -> MXFP8) "
             "with the activation quantizer promoted too. Top-1 on the whole test set through onnxruntime. "
             f"Written {time.strftime('%Y-%m-%d %H:%M')}, load average at the end {os.getloadavg()[0]:.1f} "
             f"on {os.cpu_count()} cores.", "",
             "| setting | top-1 | bits/weight | quant. time (s) | of which sensitivity (s) | promoted |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['top1']:.4f} | {r['bits']:.3f} | {r.get('seconds', '')} | "
                     f"{r.get('sensitivity_seconds', '')} | {len(r.get('promoted', []))} |")
    out_md.write_text("\n".join(lines) + "\n")
    out_md.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(out_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
