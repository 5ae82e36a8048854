#!/usr/bin/env python
"""Per-wave capture and rounding seconds of a run, grouped by wave kind, and a whole-model estimate from them.

    .venv/bin/python bench/wave_costs.py OUT.report.json
    .venv/bin/python bench/wave_costs.py OUT.report.json --layers 32 --head-rows 128256

A wave's kind is the list of its weights' shapes (a decoder block has four: q/k/v, o, gate/up, down). Kinds seen
once per measured layer are per-layer costs; the estimate multiplies their mean by ``--layers``. A kind seen once
in the whole run (the lm_head) is counted once; with ``--head-rows`` its rounding seconds are scaled linearly by
output rows (the solve's row-proportional part dominates there; its capture, which depends on the input width
only, is kept as measured). The report's ``waves`` list comes from ``quantize`` (api.py).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def kinds(report: dict) -> dict[tuple, list[dict]]:
    shape_of = {n: tuple(lay["shape"]) for lay in report["layers"] for n in lay["nodes"]}
    out: dict[tuple, list[dict]] = defaultdict(list)
    for w in report["waves"]:
        out[tuple(sorted({shape_of[n] for n in w["targets"]}))].append(w)
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--layers", type=int, help="decoder layers of the model to estimate")
    ap.add_argument("--head-rows", type=int, help="output rows of that model's head (e.g. its vocabulary)")
    args = ap.parse_args(argv)
    report = json.loads(args.report.read_text())
    if not report.get("waves"):
        raise SystemExit(f"{args.report}: no per-wave timings (a data-free run, or a report written before "
                         f"'waves' existed)")
    groups = kinds(report)
    per_layer = max(len(v) for v in groups.values())
    print("| wave kind (weight shapes) | waves | capture s (mean) | rounding s (mean) |")
    print("|---|---|---|---|")
    for k, ws in groups.items():
        cap = sum(w["capture_s"] for w in ws) / len(ws)
        rnd = sum(w["round_s"] for w in ws) / len(ws)
        print(f"| {' + '.join('x'.join(map(str, s)) for s in k)} | {len(ws)} | {cap:.1f} | {rnd:.1f} |")
    if args.layers:
        total_cap = total_rnd = 0.0
        for k, ws in groups.items():
            cap = sum(w["capture_s"] for w in ws) / len(ws)
            rnd = sum(w["round_s"] for w in ws) / len(ws)
            if len(ws) == per_layer:
                total_cap += cap * args.layers
                total_rnd += rnd * args.layers
            elif len(ws) == 1:
                rows = max(s[-1] for s in k)  # MatMul weights are [in, out]: the head's rows are its outputs
                scale = args.head_rows / rows if args.head_rows else 1.0
                total_cap += cap
                total_rnd += rnd * scale
            else:
                raise SystemExit(f"wave kind {k} occurs {len(ws)} times, neither once nor once per layer "
                                 f"({per_layer}); cannot extrapolate")
        print(f"\nestimate for {args.layers} layers"
              + (f" and a {args.head_rows}-row head" if args.head_rows else "")
              + f": capture {total_cap:.0f} s, rounding {total_rnd:.0f} s, together {total_cap + total_rnd:.0f} s "
              f"({(total_cap + total_rnd) / 3600:.2f} h) on this machine (export and validation not included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
