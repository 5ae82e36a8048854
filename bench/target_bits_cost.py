#!/usr/bin/env python
"""What --target-bits costs against a uniform run of the same recipe, side by side in one process.

    .venv/bin/python bench/target_bits_cost.py ppocr --recipe w4a4 --algo gptq --target-bits 5 \
        --variant r3:precision.sensitivity_rounds=3 --variant r1:precision.sensitivity_rounds=1

For one bench model (bench/run.py's MODELS: its calibration protocol and its primary metric), each repeat runs the
uniform recipe and then each variant of the --target-bits run (a name and ``key=value`` config overrides), all in
this process and interleaved, so the box's load falls on both alike. Printed per run: wall seconds of
``quantize()``, of which sensitivity, the forward passes of the probe, average weight bits and (with --eval) the
metric; at the end, per variant, the median wall against the median uniform wall of the same invocation. Printed,
and written with --out as JSON; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import run as benchrun  # noqa: E402
from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: expected NAME:key=value[,key=value...]")
        overrides[key.strip()] = _value(val.strip())
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(benchrun.MODELS))
    p.add_argument("--recipe", required=True)
    p.add_argument("--algo", default="qronos")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, uniform included (e.g. transforms.rotate=online)")
    p.add_argument("--target-bits", type=float, required=True)
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a --target-bits run with these overrides (default: one variant with the defaults)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--eval", action="store_true", help="evaluate each output on the model's primary metric")
    p.add_argument("--out", help="write the runs as JSON here")
    args = p.parse_args(argv)

    bm = benchrun.MODELS[args.model]
    paths = bm.paths()
    common = {f"capture.{k}": v for k, v in bm.capture.items()}
    for s in args.set:
        common.update(parse_variant("set:" + s)[1])
    common["rounding.algorithm"] = args.algo
    base = load_recipe(args.recipe).override(common)
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    tokenizer = str(paths["tokenizer"]) if "tokenizer" in paths else None

    data = None
    if args.eval:
        from qronos_onnx.eval.report import EvalData, EvalOptions, evaluate

        data = EvalData(EvalOptions(**{**bm.eval, "tokenizer": tokenizer}))

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        for rep in range(args.repeat):
            for name, cfg in [("uniform", base)] + [(n, base.override({"precision.target_bits": args.target_bits,
                                                                        **o})) for n, o in variants]:
                t0 = time.perf_counter()
                res = quantize(str(paths["onnx"]), str(paths["calib"]), out, cfg, tokenizer=tokenizer,
                               overwrite=True, quiet=True, checkpoint=False)
                wall = time.perf_counter() - t0
                row = {"run": name, "repeat": rep, "wall_s": round(wall, 2),
                       "sensitivity_s": round(res.timings.get("sensitivity", 0.0), 2),
                       "passes": res.precision.get("forward_passes", 0),
                       "bits": res.precision.get("weight_bits_average"), "load": round(os.getloadavg()[0], 2),
                       "timings": {k: round(v, 2) for k, v in res.timings.items()}}
                if data is not None:
                    task, metric = bm.primary
                    row[metric] = evaluate(str(out), [task], data.options, data)[task]["metrics"][metric]
                runs.append(row)
                print(json.dumps(row), flush=True)

    uniform = statistics.median(r["wall_s"] for r in runs if r["run"] == "uniform")
    print(f"\n{args.model} {args.recipe} {args.algo}, --target-bits {args.target_bits:g}; median uniform wall "
          f"{uniform:.1f} s")
    for name, _ in variants:
        mine = [r for r in runs if r["run"] == name]
        wall = statistics.median(r["wall_s"] for r in mine)
        sens = statistics.median(r["sensitivity_s"] for r in mine)
        print(f"  {name}: wall {wall:.1f} s = {wall / uniform:.2f}x uniform (sensitivity {sens:.1f} s, "
              f"{mine[0]['passes']} passes)")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": argv or sys.argv[1:], "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
