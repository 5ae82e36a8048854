"""Helper of tests/test_distributed.py, run by ``torchrun --nproc-per-node 2``: every case of CASES, distributed.

    torchrun --standalone --nproc-per-node 2 tests/_dist_run.py DIR [fail]

DIR holds the models (written by the test); outputs go to DIR/dist/CASE.onnx (rank 0 only). Each rank prints one
JSON line: its rank and what it wrote under DIR (Python's audit events). ``fail``: rank 1 raises in its first wave's capture, to check that rank 0 stops.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from qronos_onnx.dist import init_distributed  # noqa: E402
from qronos_onnx.config import normalize_layer_rules  # noqa: E402
from tests import tiny_models as tm  # noqa: E402

# name -> (model file, calibration, recipe, overrides). Sample counts make uneven shards and batched chunks.
CASES = {
    "transformer-qronos": ("transformer.onnx", lambda: tm.transformer_inputs(n=8, seq=16, d=32), "w4",
                           {"rounding.algorithm": "qronos", "capture.batch_size": 2}),
    # k_proj on its own plan: wave 0 is two solver batches (q+v stacked, k), so rank 1 solves one and broadcasts it
    "transformer-gptq": ("transformer.onnx", lambda: tm.transformer_inputs(n=5, seq=16, d=32), "w4",
                         {"rounding.algorithm": "gptq", "weights.group_size": 16,
                          "precision.layers": normalize_layer_rules({"k_proj": "int8"}, "test")}),
    "cnn-qronos": ("cnn.onnx", lambda: tm.cnn_inputs(n=5), "w4",
                   {"rounding.algorithm": "qronos", "rounding.stats_dtype": "float64"}),
    "cnn-gptq": ("cnn.onnx", lambda: tm.cnn_inputs(n=6), "w4", {"rounding.algorithm": "gptq"}),
}


def run_case(name: str, root: Path, out: Path, dist=None):
    model, calib, recipe, updates = CASES[name]
    return quantize(root / model, calib(), out, load_recipe(recipe).override(updates), quiet=True,
                    overwrite=True, distributed=dist)


def main() -> int:
    # torch starts on one thread here (OMP_NUM_THREADS=1), the one-process reference on another count: quantize()
    # pins both to capture.threads (threads.py), so nothing is set here
    root = Path(sys.argv[1])
    dist = init_distributed("cpu", timeout=60)
    if len(sys.argv) > 2 and sys.argv[2] == "fail" and dist.rank == 1:
        import qronos_onnx.capture.runner as runner  # rank 1 fails in its first wave's capture
        runner.tokens = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected failure on rank 1"))
    out_dir = root / "dist"  # made by the test
    wrote: list[str] = []

    def audit(event: str, args: tuple) -> None:  # every file this rank creates, changes or removes under root
        if event == "open" and isinstance(args[0], (str, Path)) and (args[1] or "r") != "r" and "r" not in \
                str(args[1]).replace("+", "") or event in ("os.rename", "os.remove", "os.mkdir", "os.link",
                                                           "shutil.rmtree", "os.truncate"):
            for path in map(str, args[: 2 if event in ("os.rename", "os.link") else 1]):
                if path.startswith(str(root)):
                    wrote.append(f"{event} {Path(path).relative_to(root)}")

    sys.addaudithook(audit)
    try:
        for name in CASES:
            run_case(name, root, out_dir / f"{name}.onnx", dist)
    finally:
        dist.close()
    print(json.dumps({"rank": dist.rank, "wrote": wrote}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
