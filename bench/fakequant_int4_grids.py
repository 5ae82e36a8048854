#!/usr/bin/env python
"""Two symmetric int4 grids compared on the same model: every MatMul weight fake-quantized (blocks of 32 along K)
with scale amax/7 (qronos-onnx's plain symmetric grid) or extreme/-8 (onnxruntime's own int4 quantizer, our
``weights.full_range``), written as float copies of an onnxruntime-genai folder for `qronos-onnx eval --task ppl`.

    .venv/bin/python bench/fakequant_int4_grids.py GENAI_FP32_DIR OUT_DIR
    .venv/bin/python -m qronos_onnx eval OUT_DIR/fq-amax7 --task ppl     # and OUT_DIR/fq-signed8

The figures behind bench/results/latency.md (SmolLM2: 24.09 against 21.67). Nothing but the weights changes.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def fake_quant(W: np.ndarray, mode: str, block: int = 32) -> np.ndarray:
    K, N = W.shape
    if K % block:
        raise SystemExit(f"K = {K} is not a multiple of {block}")
    Wb = W.T.reshape(N, K // block, block).astype(np.float32)
    if mode == "amax7":
        s = np.abs(Wb).max(-1, keepdims=True) / 7.0
    else:
        s = np.take_along_axis(Wb, np.abs(Wb).argmax(-1)[..., None], -1) / -8.0
    s[s == 0] = 1
    q = np.clip(np.round(Wb / s), -8, 7)
    return (q * s).reshape(N, K).T.astype(W.dtype)


def main(argv: list[str]) -> int:
    src, out_root = Path(argv[0]), Path(argv[1])
    model = onnx.load(str(src / "model.onnx"))
    inits = {i.name for i in model.graph.initializer}
    targets = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    print(f"{len(targets)} MatMul weights")
    for mode in ("amax7", "signed8"):
        out = out_root / f"fq-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("model.onnx"):
                shutil.copy(f, out / f.name)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for init in copy.graph.initializer:
            if init.name in targets:
                init.CopyFrom(numpy_helper.from_array(fake_quant(numpy_helper.to_array(init), mode), init.name))
        onnx.save(copy, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
