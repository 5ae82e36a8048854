"""Helper of tests/test_determinism.py: quantize tiny models with each named config into OUT_DIR.

    python tests/_determinism_run.py OUT_DIR [--set-threads N] CONFIG ...

CONFIG = MODEL:ALGO-RECIPE[-gGROUP][-bBATCH], MODEL = transformer (the tiny transformer, d=128, 64 tokens a
sample), transformer-long (d=64, 128 tokens a sample) or cnn (tests/tiny_models.tall_cnn: tall im2col matrices);
bBATCH sets capture.batch_size (transformer-long with b8: 1024 token rows per statistics GEMM).
``--set-threads N``: the caller sets torch.set_num_threads(N) before quantizing, as a library user might; every
quantize() must hand that count back.

Prints one JSON line: the torch thread count before the first quantize() and, per config, the weight codes written.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from tests import tiny_models as tm  # noqa: E402

D = 128  # wide enough that MKL's Cholesky and onnxruntime's MatMul block their work by thread


def models(out_dir: Path) -> dict:
    """name -> (model file, calibration)."""
    onnx.save(tm.transformer(n_blocks=3, d=D, ffn=2 * D), out_dir / "transformer.onnx")
    onnx.save(tm.transformer(n_blocks=2, d=D // 2, ffn=D), out_dir / "transformer-long.onnx")
    onnx.save(tm.tall_cnn(), out_dir / "cnn.onnx")
    return {"transformer": (out_dir / "transformer.onnx", tm.transformer_inputs(n=8, seq=64, d=D)),
            "transformer-long": (out_dir / "transformer-long.onnx", tm.transformer_inputs(n=8, seq=128, d=D // 2)),
            "cnn": (out_dir / "cnn.onnx", tm.tall_cnn_inputs(n=4))}


def main() -> int:
    args = sys.argv[1:]
    out_dir = Path(args.pop(0))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args[0] == "--set-threads":
        torch.set_num_threads(int(args[1]))
        args = args[2:]
    threads = torch.get_num_threads()
    inputs = models(out_dir)
    n_codes = {}
    for config in args:
        model, spec = config.split(":")
        algo, recipe, *rest = spec.split("-")
        updates = {"rounding.algorithm": algo}
        for opt in rest:
            updates["weights.group_size" if opt[0] == "g" else "capture.batch_size"] = int(opt[1:])
        out = out_dir / f"{config.replace(':', '-')}.onnx"
        quantize(inputs[model][0], inputs[model][1], out, load_recipe(recipe).override(updates), quiet=True)
        assert torch.get_num_threads() == threads, f"quantize() left torch on {torch.get_num_threads()} threads"
        n_codes[config] = int(sum(np.asarray(numpy_helper.to_array(i)).size for i in onnx.load(out).graph.initializer
                                  if i.name.endswith("_quantized")))
    print(json.dumps({"torch_threads": threads, "n_codes": n_codes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
