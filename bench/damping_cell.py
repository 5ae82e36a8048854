#!/usr/bin/env python
"""One cell of the Qronos damping study (bench/results/qronos_investigation.md).

    python bench/damping_cell.py TAG RECIPE ALGO ALPHA|default REFERENCE [--out DIR]

Quantizes SmolLM2-135M on the anchors protocol (32 x 256-token calibration windows) with ``rounding.damping = ALPHA``,
then scores wiki-leads ppl on the first 64 test windows of 256 tokens and on the 32 calibration windows themselves
(the in-sample fit), and writes DIR/TAG.json (default DIR: /tmp/qronos-damping).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.calib import load_calibration  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from qronos_onnx.eval import cache  # noqa: E402
from qronos_onnx.eval.perplexity import perplexity  # noqa: E402
from qronos_onnx.eval.wikileads import split_text, tokenize  # noqa: E402
from qronos_onnx.graph.model import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("tag", "recipe", "algo", "alpha", "reference"):
        p.add_argument(name)
    p.add_argument("--out", default="/tmp/qronos-damping")
    a = p.parse_args()
    model, wl = cache.smollm2_paths(), cache.wikileads_paths()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    over = {"rounding.algorithm": a.algo, "capture.reference": a.reference, "capture.samples": 32,
            "capture.seq_len": 256}
    if a.alpha != "default":
        over["rounding.damping"] = float(a.alpha)
    cfg = load_recipe(a.recipe).override(over)
    out = out_dir / f"{a.tag}.onnx"
    t0, c0 = time.perf_counter(), time.process_time()
    res = quantize(model.onnx, wl.calib, out, cfg, tokenizer=model.tokenizer, overwrite=True, quiet=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    test = perplexity(out, tokenize(split_text("test"), model.tokenizer), seq_len=256, max_windows=64)
    cs = load_calibration(wl.calib, load_model(model.onnx), samples=32, seed=0, seq_len=256,
                          tokenizer=model.tokenizer)
    cal_ids = np.concatenate([np.asarray(cs[i]["input_ids"]).reshape(-1) for i in range(len(cs))])
    cal = perplexity(out, cal_ids, seq_len=256, max_windows=32)
    rec = {"tag": a.tag, "recipe": a.recipe, "algo": a.algo, "damping": a.alpha, "reference": a.reference,
           "ppl": test.ppl, "calib_ppl": cal.ppl, "quant_wall_s": wall, "quant_cpu_s": cpu, "timings": res.timings,
           "torch_threads": torch.get_num_threads(),
           "mean_rel_error": sum(r.rel_error for r in res.layers) / len(res.layers),
           "mean_rtn_rel_error": sum(r.rtn_rel_error for r in res.layers) / len(res.layers),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (out_dir / f"{a.tag}.json").write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
