"""Helper of tests/test_determinism.py: quantize the tiny transformer with each named config into OUT_DIR.

    python tests/_determinism_run.py OUT_DIR qronos-w4 gptq-w4a8-g32 ...   (config = ALGO-RECIPE[-gGROUP])

Prints one JSON line: the torch thread count and, per config, the number of weight codes written.
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


def main() -> int:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / "tiny.onnx"
    onnx.save(tm.transformer(n_blocks=3, d=D, ffn=2 * D), model)
    calib = tm.transformer_inputs(n=8, seq=64, d=D)
    n_codes = {}
    for config in sys.argv[2:]:
        algo, recipe, *rest = config.split("-")
        updates = {"rounding.algorithm": algo}
        if rest:
            updates["weights.group_size"] = int(rest[0].lstrip("g"))
        out = out_dir / f"{config}.onnx"
        quantize(model, calib, out, load_recipe(recipe).override(updates), quiet=True)
        n_codes[config] = int(sum(np.asarray(numpy_helper.to_array(i)).size for i in onnx.load(out).graph.initializer
                                  if i.name.endswith("_quantized")))
    print(json.dumps({"torch_threads": torch.get_num_threads(), "n_codes": n_codes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
