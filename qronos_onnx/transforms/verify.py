"""Run a whole float model in onnxruntime without serializing its weights: the check every transform ends with."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ..graph.schedule import Segment


def run_float_model(model: ir.Model, feeds: Mapping[str, np.ndarray], extra: Sequence[str] = ()
                    ) -> dict[str, np.ndarray]:
    """Graph outputs of ``model`` on ``feeds``, and the intermediate values named in ``extra``, through the capture's
    SegmentRunner (large constants are handed to onnxruntime by reference, so models over 2 GB work and nothing is
    written to disk)."""
    from ..capture.runner import SegmentRunner

    graph = model.graph
    used = {v.name for node in graph for v in node.inputs if v is not None}
    inits = [n for n in graph.initializers if n in used]
    inputs = [v.name for v in graph.inputs if v.name not in graph.initializers and v.name in feeds]
    outputs = list(dict.fromkeys([v.name for v in graph.outputs] + list(extra)))
    seg = Segment(index=-1, nodes=[n.name for n in graph], inputs=inputs, outputs=outputs, initializers=inits)
    runner = SegmentRunner(model, seg, {n: feeds[n] for n in inputs}, providers=["CPUExecutionProvider"])
    return runner.run({n: feeds[n] for n in inputs}, {})
