#!/usr/bin/env python
"""Perplexity of a quantized SmolLM2 file with onnxruntime's *basic* graph optimizations (no QDQ fusion).

    .venv/bin/python bench/ppl_basic_opt.py ~/.cache/qronos-onnx/bench/smollm2/smollm2-w4a4-rot-tb4.5-qronos.onnx

The anchors protocol of bench/run.py (the first 64 windows of 256 tokens of the wiki-leads test split), for a file
that onnxruntime's default optimizations turned into a kernel that refuses to run: before per-token activation codes
were written signed, 8-bit weights behind per-token uint8 activations were fused into MatMulIntegerToFloat, which
takes one activation scale only (docs/activations.md). Such files now get refused at validation; files written since
run at the default level and bench/run.py evaluates them as usual. The figure is the math the file encodes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import onnxruntime as ort  # noqa: E402

from qronos_onnx.eval.perplexity import perplexity  # noqa: E402
from qronos_onnx.eval.report import EvalData, EvalOptions, _ppl_ids  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--tokenizer", default=str(Path.home() / ".cache/qronos-onnx/smollm2"))
    args = p.parse_args(argv)
    ids = _ppl_ids(EvalData(EvalOptions(tokenizer=args.tokenizer)), [args.model])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    print(perplexity(args.model, ids, seq_len=256, max_windows=64, session_options=so, quiet=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
